"""The libbpf binding (cffi, ABI mode against Debian's libbpf1): every BPF syscall noded makes goes through here."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from typing import Generic, TypeVar

import cffi
import structlog

log = structlog.get_logger("noded.bpf")

ffi = cffi.FFI()
ffi.cdef(
    """
    struct bpf_object; struct bpf_program; struct bpf_map; struct bpf_link;
    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
    const char *bpf_program__name(const struct bpf_program *prog);
    const char *bpf_program__section_name(const struct bpf_program *prog);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
    int bpf_map__fd(const struct bpf_map *map);
    _Bool bpf_map__is_internal(const struct bpf_map *map);
    unsigned int bpf_map__key_size(const struct bpf_map *map);
    unsigned int bpf_map__value_size(const struct bpf_map *map);
    int bpf_map__type(const struct bpf_map *map);
    unsigned int bpf_map__max_entries(const struct bpf_map *map);
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, unsigned int *info_len);
    struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
    int bpf_link__pin(struct bpf_link *link, const char *path);
    struct bpf_link *bpf_link__open(const char *path);
    int bpf_link__update_program(struct bpf_link *link, struct bpf_program *prog);
    int bpf_link__destroy(struct bpf_link *link);
    int bpf_link__fd(const struct bpf_link *link);
    struct bpf_link *bpf_program__attach_iter(const struct bpf_program *prog, const void *opts);
    int bpf_iter_create(int link_fd);
    int bpf_obj_get(const char *pathname);
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
    int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
    int bpf_map_update_elem(int fd, const void *key, const void *value, unsigned long long flags);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values, unsigned int *count,
                             const void *opts);
    int bpf_map_delete_batch(int fd, const void *keys, unsigned int *count, const void *opts);
    int bpf_map_update_batch(int fd, const void *keys, const void *values, unsigned int *count, const void *opts);
    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    int vsnprintf(char *str, size_t size, const char *format, void *ap);
    """
)
lib = ffi.dlopen("libbpf.so.1")
libc = ffi.dlopen(None)

_LIBBPF_WARN = 0


@ffi.callback("int(int, const char *, void *)")
def _print(level: int, fmt, args) -> int:
    if level != _LIBBPF_WARN:
        return 0
    buf = ffi.new("char[65536]")  # a verifier log, when a load fails
    libc.vsnprintf(buf, 65536, fmt, args)
    text = ffi.string(buf).decode(errors="replace").rstrip()
    if level == _LIBBPF_WARN:
        log.warning("libbpf", msg=text)
    return 0


lib.libbpf_set_print(_print)


class BpfError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else ffi.errno
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _check_ptr(ptr, what: str):
    if ptr == ffi.NULL:
        err = ffi.errno or errno.EINVAL
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


K = TypeVar("K", bound=ctypes.Structure | ctypes.c_uint32)
V = TypeVar("V", bound=ctypes.Structure)

BPF_ANY = 0


class Map(Generic[K, V]):
    """A BPF map by fd, with ctypes key and value types."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], name: str = "") -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name

    @classmethod
    def open_pinned(cls, path: str, key_type: type[K], value_type: type[V]) -> Map[K, V]:
        fd = _check(lib.bpf_obj_get(path.encode()), f"open pinned map {path}")
        return cls(fd, key_type, value_type, os.path.basename(path))

    def pin(self, path: str) -> None:
        _check(lib.bpf_obj_pin(self.fd, path.encode()), f"pin map {path}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update(self, key: K, value: V) -> None:
        _check(
            lib.bpf_map_update_elem(self.fd, ffi.from_buffer(key), ffi.from_buffer(value), BPF_ANY),
            f"update {self.name}",
        )

    def lookup(self, key: K) -> V | None:
        value = self.value_type()
        if lib.bpf_map_lookup_elem(self.fd, ffi.from_buffer(key), ffi.from_buffer(value)) < 0:
            if ffi.errno == errno.ENOENT:
                return None
            raise BpfError(ffi.errno, f"lookup {self.name}: {os.strerror(ffi.errno)}")
        return value

    def delete(self, key: K) -> bool:
        if lib.bpf_map_delete_elem(self.fd, ffi.from_buffer(key)) < 0:
            if ffi.errno == errno.ENOENT:
                return False
            raise BpfError(ffi.errno, f"delete {self.name}: {os.strerror(ffi.errno)}")
        return True

    def keys(self) -> Iterator[K]:
        prev = ffi.NULL
        while True:
            nxt = self.key_type()
            if lib.bpf_map_get_next_key(self.fd, prev, ffi.from_buffer(nxt)) < 0:
                if ffi.errno == errno.ENOENT:
                    return
                raise BpfError(ffi.errno, f"iterate {self.name}: {os.strerror(ffi.errno)}")
            yield nxt
            prev = ffi.from_buffer(nxt)

    def raw_batches(self, size: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, count) of every entry, `size` at a time, as the kernel lays them out (one syscall
        per batch: a whole hash map without a syscall or two per entry)."""
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        keys, values = ffi.new("char[]", ksize * size), ffi.new("char[]", vsize * size)
        token_in, token_out = ffi.new("unsigned int *"), ffi.new("unsigned int *")
        first = True
        while True:
            count = ffi.new("unsigned int *", size)
            ret = lib.bpf_map_lookup_batch(
                self.fd, ffi.NULL if first else token_in, token_out, keys, values, count, ffi.NULL
            )
            err = ffi.errno if ret < 0 else 0
            if ret < 0 and err != errno.ENOENT:
                raise BpfError(err, f"batch lookup {self.name}: {os.strerror(err)}")
            if count[0]:
                yield ffi.buffer(keys, ksize * count[0])[:], ffi.buffer(values, vsize * count[0])[:], count[0]
            if ret < 0:  # ENOENT: that was the last batch
                return
            token_in[0], first = token_out[0], False

    def update_raw(self, keys: bytes | memoryview, values: bytes | memoryview, count: int) -> None:
        """Write `count` packed keys and values in one syscall."""
        if not count:
            return
        n = ffi.new("unsigned int *", count)
        if lib.bpf_map_update_batch(self.fd, ffi.from_buffer(keys), ffi.from_buffer(values), n, ffi.NULL) < 0:
            err = ffi.errno
            raise BpfError(err, f"batch update {self.name} ({n[0]} of {count} written): {os.strerror(err)}")

    def delete_raw(self, keys: bytes, count: int) -> int:
        """Delete `count` packed keys in one syscall (those already gone are skipped one by one)."""
        if not count:
            return 0
        n = ffi.new("unsigned int *", count)
        if lib.bpf_map_delete_batch(self.fd, ffi.from_buffer(keys), n, ffi.NULL) == 0:
            return count
        ksize = ctypes.sizeof(self.key_type)  # one was gone meanwhile (ENOENT stops the batch): one by one
        deleted = 0
        for i in range(count):
            if lib.bpf_map_delete_elem(self.fd, ffi.from_buffer(keys[i * ksize : (i + 1) * ksize])) == 0:
                deleted += 1
        return deleted

    def items(self) -> Iterator[tuple[K, V]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value


class Object:
    """An opened (then loaded) BPF object file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._obj = _check_ptr(lib.bpf_object__open_file(path.encode(), ffi.NULL), f"open {path}")

    def maps(self) -> Iterator[tuple[str, object]]:
        m = lib.bpf_object__next_map(self._obj, ffi.NULL)
        while m != ffi.NULL:
            yield ffi.string(lib.bpf_map__name(m)).decode(), m
            m = lib.bpf_object__next_map(self._obj, m)

    def programs(self) -> Iterator[tuple[str, str, object]]:
        """(name, section, handle) of every program."""
        p = lib.bpf_object__next_program(self._obj, ffi.NULL)
        while p != ffi.NULL:
            name = ffi.string(lib.bpf_program__name(p)).decode()
            section = ffi.string(lib.bpf_program__section_name(p)).decode()
            yield name, section, p
            p = lib.bpf_object__next_program(self._obj, p)

    def pin_maps_under(self, directory: str) -> None:
        """Reuse maps pinned in directory, or pin new ones there, at load. A pinned map whose kind, key or
        value layout or size differs from this object's (left by an older noded) is unpinned, so a new one
        replaces it."""
        for name, m in self.maps():
            if lib.bpf_map__is_internal(m):  # the object's own .rodata/.bss: private to it
                continue
            path = f"{directory}/{name}"
            pinned = pinned_map_layout(path)
            wanted = (
                lib.bpf_map__type(m),
                lib.bpf_map__key_size(m),
                lib.bpf_map__value_size(m),
                lib.bpf_map__max_entries(m),
            )
            if pinned is not None and pinned != wanted:
                log.warning(
                    "pinned map has another layout: replaced, its entries are lost",
                    map=path,
                    pinned=pinned,
                    wanted=wanted,
                )
                os.unlink(path)
            _check(lib.bpf_map__set_pin_path(m, path.encode()), f"pin path {name}")

    def load(self) -> None:
        _check(lib.bpf_object__load(self._obj), f"load {self.path}")

    def map_fd(self, name: str) -> int:
        for mname, m in self.maps():
            if mname == name:
                return os.dup(_check(lib.bpf_map__fd(m), f"fd of {name}"))
        raise KeyError(name)

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None


def _map_info(fd: int, path: str) -> tuple[int, int, int, int]:
    """(type, key size, value size, max entries) of an open map (struct bpf_map_info's first fields)."""
    info = ffi.new("unsigned int[32]")  # struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
    size = ffi.new("unsigned int *", ffi.sizeof(info))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"info of {path}")
    return int(info[0]), int(info[2]), int(info[3]), int(info[4])


def pinned_map_layout(path: str) -> tuple[int, int, int, int] | None:
    """(type, key size, value size, max entries) of the map pinned at path, or None when nothing is pinned."""
    if not os.path.exists(path):
        return None
    fd = _check(lib.bpf_obj_get(path.encode()), f"open pinned map {path}")
    try:
        return _map_info(fd, path)
    finally:
        os.close(fd)


def pinned_map_sizes(path: str) -> tuple[int, int] | None:
    """(key size, value size) of the map pinned at path, or None when nothing is pinned there."""
    layout = pinned_map_layout(path)
    return layout[1:3] if layout is not None else None


HASH_MAPS = (1, 9)  # BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH: the ones whose fill level varies
ARRAY_MAPS = (2,)  # BPF_MAP_TYPE_ARRAY: always full


def pinned_map_fill(path: str, batch: int = 4096) -> tuple[int, int] | None:
    """(entries, max entries) of the hash or array map pinned at path (`noded_bpf_map_entries`): a hash map
    counted by batch lookups (a syscall per `batch` entries); None for other kinds (per-CPU: not counted)."""
    fd = _check(lib.bpf_obj_get(path.encode()), f"open pinned map {path}")
    try:
        kind, ksize, vsize, max_entries = _map_info(fd, path)
        if kind in ARRAY_MAPS:
            return max_entries, max_entries
        if kind not in HASH_MAPS:
            return None
        m = Map(fd, ctypes.c_char * ksize, ctypes.c_char * vsize, os.path.basename(path))
        return sum(count for _k, _v, count in m.raw_batches(batch)), max_entries
    finally:
        os.close(fd)


def attach_cgroup_pinned(prog, cgroup_path: str, pin_path: str) -> str:
    """Attach prog to a cgroup with a BPF link pinned at pin_path.

    An existing pinned link is updated in place (atomic program replacement),
    so the hook never has a gap across daemon restarts. Returns what happened.
    """
    if os.path.exists(pin_path):
        link = lib.bpf_link__open(pin_path.encode())
        if link != ffi.NULL:
            try:
                _check(lib.bpf_link__update_program(link, prog), f"update link {pin_path}")
                return "updated"
            finally:
                lib.bpf_link__destroy(link)  # closes our fd; the pin keeps the link
        os.unlink(pin_path)
    cg_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = _check_ptr(lib.bpf_program__attach_cgroup(prog, cg_fd), f"attach to {cgroup_path}")
    finally:
        os.close(cg_fd)
    try:
        _check(lib.bpf_link__pin(link, pin_path.encode()), f"pin link {pin_path}")
    except BpfError:
        lib.bpf_link__destroy(link)
        raise
    lib.bpf_link__destroy(link)  # closes our fd; the pin keeps the attachment
    return "attached"


BPF_TCX_INGRESS = 46  # enum bpf_attach_type (Linux 6.6); Debian's libbpf 1.1 predates tcx helpers
BPF_TCX_EGRESS = 47


def attach_tcx_pinned(prog, ifindex: int, attach_type: int, pin_path: str) -> str:
    """Attach a tc program to an interface with a tcx link pinned at pin_path (updated in place if there)."""
    prog_fd = _check(lib.bpf_program__fd(prog), "program fd")
    if os.path.exists(pin_path):
        fd = lib.bpf_obj_get(pin_path.encode())
        if fd >= 0:
            try:
                if lib.bpf_link_update(fd, prog_fd, ffi.NULL) == 0:
                    return "updated"
            finally:
                os.close(fd)
        os.unlink(pin_path)  # a link whose interface is gone cannot be updated: attach afresh
    fd = _check(lib.bpf_link_create(prog_fd, ifindex, attach_type, ffi.NULL), f"tcx attach to ifindex {ifindex}")
    try:
        _check(lib.bpf_obj_pin(fd, pin_path.encode()), f"pin link {pin_path}")
    finally:
        os.close(fd)
    return "attached"


class IterLink:
    """A BPF iterator attached in memory (never pinned: it lives as long as the daemon holds it)."""

    def __init__(self, prog, name: str) -> None:
        self.name = name
        self._link = _check_ptr(lib.bpf_program__attach_iter(prog, ffi.NULL), f"attach iterator {name}")

    def run(self) -> None:
        """Create an iterator in the calling thread's network namespace and read it to the end."""
        fd = _check(lib.bpf_iter_create(lib.bpf_link__fd(self._link)), f"create iterator {self.name}")
        try:
            while os.read(fd, 4096):
                pass
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._link is not None:
            lib.bpf_link__destroy(self._link)
            self._link = None
