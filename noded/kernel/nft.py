"""Every nft call noded makes, two ways, for two sizes of work:

- `run(script)`: libnftables through ctypes, in the calling thread's network namespace, without a fork. Per
  pod setup, `nsenter … nft -f` costs two execs (~10 ms); the library call costs well under a millisecond.
  A context is made per call: its netlink socket opens in the namespace the thread is in at that moment,
  which is what lets a thread that has entered a pod's netns program that pod (kernel/podns.py) and the
  DNS listener's NOTRACK table (kernel/dnslisten.py).
- `NftCommand`: the nft binary, for the services table (services/nftables.py). Measured at 10,000 services
  x 10 endpoints (a scratch netns, the proxier with each executor): the same speed (full sync 1.72 s both;
  one endpoint replaced 16.0 / 28.5 ms p50 / p99 through the binary, 14.9 / 32.0 in process), but libnftables
  in the daemon's own process took +339 MiB RSS for the full sync's 210,000 elements (488 MiB after a resync)
  against +21 through the binary, whose memory goes with its process. Tests prefix the command with nsenter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import threading

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftError(RuntimeError):
    pass


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                raise NftError(f"libnftables not loadable ({name}): {e}; install the nftables package") from None
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
        raise NftError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)
    if rc != 0:
        raise NftError(err.strip()[:4000] or f"nft failed ({rc})")
    return out


# -- the nft binary ---------------------------------------------------------------------------------
NFT = ("nft",)  # the command; tests prefix it with nsenter to work in a namespace of their own


def nft(script: str, cmd: tuple[str, ...] = NFT) -> None:
    proc = subprocess.run([*cmd, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NftError(proc.stderr.strip()[:4000])


def nft_json(*args: str, cmd: tuple[str, ...] = NFT) -> dict:
    proc = subprocess.run([*cmd, "-j", *args], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {"nftables": []}


class NftCommand:
    """The nft binary, run with a prefix (tests enter a netns of their own): where the services proxier
    reaches the kernel. noded/services/fakes.py has a recording stand-in for unit tests without root."""

    def __init__(self, cmd: tuple[str, ...] = NFT) -> None:
        self.cmd = cmd

    def run(self, script: str) -> None:
        nft(script, self.cmd)

    def json(self, *args: str) -> dict:
        return nft_json(*args, cmd=self.cmd)
