"""Multi-document YAML read fast: native/yamljson.c (libyaml, linked in; built by `make bpf` next to this file)
turns a stream into the JSON of its documents as PyYAML's SafeLoader reads them, and the json module makes
the objects. 12 MB of manifests (10,000 Services and their slices): 0.4 s, where PyYAML with libyaml takes
3.4 s (most of it constructing Python objects node by node in Python).

A stream the C side declines (anchors and aliases, tags, merge keys, timestamps, numbers not written in
decimal, .inf/.nan, keys that are not strings, deep nesting) or cannot parse is read by PyYAML instead, so
what comes out, and every error message, is PyYAML's either way. Without the library, everything is PyYAML's.
Not a YAML 1.2 parser such as ryaml (1.45 s): that reads `yes`, `on` and `0755` as strings where kubectl's
YAML 1.1 reads true, true and 493.
"""

from __future__ import annotations

import os
from typing import Any

import cffi

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libnoded_yaml.so")

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int noded_yaml_to_json(const unsigned char *in, size_t len, char **out, size_t *out_len);
    void noded_yaml_free(char *text);
    """
)
_lib: Any = None
_loaded = False


def available() -> bool:
    return _library() is not None


def _library() -> Any:
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        try:
            _lib = _ffi.dlopen(LIBRARY)
        except OSError:  # not built: PyYAML reads everything
            _lib = None
    return _lib


def to_json(text: str) -> str | None:
    """The JSON array of the stream's documents, or None: PyYAML is to read it (declined, an error, no
    library)."""
    lib = _library()
    if lib is None:
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: PyYAML says what is wrong
        return None
    out = _ffi.new("char **")
    length = _ffi.new("size_t *")
    if lib.noded_yaml_to_json(data, len(data), out, length) != 0:
        return None
    try:
        return bytes(_ffi.buffer(out[0], length[0])).decode("utf-8")
    finally:
        lib.noded_yaml_free(out[0])
