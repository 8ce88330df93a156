"""libnftables through ctypes: run an nft script in the calling thread's network namespace, without a fork.

Per pod setup, `nsenter … nft -f` costs two execs (~10 ms); the library call costs well under a
millisecond. A context is made per call: its netlink socket opens in the namespace the thread is in
at that moment, which is what lets a thread that has entered a pod's netns program that pod.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class LibnftError(RuntimeError):
    pass


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                raise LibnftError(f"libnftables not loadable ({name}): {e}; install the nftables package") from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            _lib = lib
        return _lib


def run(script: str) -> str:
    """Run `script` as one transaction (like `nft -f`); returns nft's output, raises with nft's error text."""
    lib = _library()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise LibnftError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)
    if rc != 0:
        raise LibnftError(err.strip()[:4000] or f"nft failed ({rc})")
    return out
