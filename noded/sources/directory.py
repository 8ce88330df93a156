"""The manifest-directory source: YAML/JSON files of Kubernetes objects, re-read when they change."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import structlog
import yaml

from noded.sources import yamlfast
from noded.sources.base import WATCHED_KINDS, ObjectKey, Sink, fingerprint, object_key

log = structlog.get_logger("noded.sources.directory")

SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it


def parse_manifests(text: str, origin: str) -> list[Any]:
    """The objects in one file (multi-document YAML, `kind: List` expanded). Raises yaml.YAMLError or
    ValueError (malformed JSON)."""
    return list(iter_manifests(text, origin))


def iter_manifests(text: str, origin: str) -> Iterator[Any]:
    """The objects in one file, each as it is parsed (a 10,000-service List is never held whole: parsed
    whole, it left the daemon 70 MiB of fragmented arenas). A `.json` file is read by the json module (JSON
    is YAML too, but libyaml reads ~3 MB/s: 4 s for 10,000 Services with their slices, json 0.2 s); one that
    is not JSON at all goes to YAML: yamlfast.py's (C) when it takes the stream, else PyYAML's. Raises
    yaml.YAMLError, or ValueError for JSON broken part-way."""
    if origin.endswith(".json"):
        stream = _json_documents(text)
        try:
            first = next(stream, _END)
        except ValueError:
            first = _NOT_JSON
        if first is not _NOT_JSON:
            if first is not _END:
                yield first
                yield from stream
            return
    converted = yamlfast.to_json(text)  # the documents as one JSON array, each decoded as it is taken
    for doc in yaml.load_all(text, Loader=_Loader) if converted is None else _json_array(converted, 0, [0]):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from doc["items"]
        else:
            yield doc


_END, _NOT_JSON = object(), object()
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _json_documents(text: str) -> Iterator[Any]:
    """One JSON value's documents: a `kind: List` object's items one at a time, else the value itself (null:
    none). The top-level object is read field by field (json's C decoder for each value): its items are
    handed out as they are decoded, or, when `kind` comes after them (kubectl's order), decoded and dropped
    once to find the kind, then again one at a time. Raises ValueError (json.JSONDecodeError)."""
    i = _SPACE.match(text).end()
    if not text.startswith("{", i):
        value = json.loads(text)
        if value is not None:
            yield value
        return
    fields: dict[str, Any] = {}
    items_at, streamed = -1, False
    i = _SPACE.match(text, i + 1).end()
    while not (text.startswith("}", i) and not fields and items_at < 0):  # {} ends at once
        key, i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, i).end()
        if not isinstance(key, str) or not text.startswith(":", i):
            raise json.JSONDecodeError("expected a key and ':'", text, i)
        i = _SPACE.match(text, i + 1).end()
        if key == "items" and text.startswith("[", i):
            items_at, streamed, end = i, fields.get("kind") == "List", [i]
            for item in _json_array(text, i, end):
                if streamed:
                    yield item
            i = end[0]
        else:
            fields[key], i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, i).end()
        if text.startswith(",", i):
            i = _SPACE.match(text, i + 1).end()
        elif text.startswith("}", i):
            break
        else:
            raise json.JSONDecodeError("expected ',' or '}'", text, i)
    if _SPACE.match(text, i + 1).end() != len(text):
        raise json.JSONDecodeError("extra data", text, i + 1)
    if streamed:
        if fields.get("kind") != "List":  # a second `kind` after the items: ambiguous, refused
            raise json.JSONDecodeError("kind changed after the items", text, i)
        return
    if items_at >= 0 and fields.get("kind") == "List":
        yield from _json_array(text, items_at, [items_at])
        return
    if items_at >= 0:
        fields["items"] = list(_json_array(text, items_at, [items_at]))
    yield fields


def _json_array(text: str, i: int, end: list[int]) -> Iterator[Any]:
    """The elements of the JSON array at text[i] ('['), one at a time; end[0] is then past its ']'."""
    i = _SPACE.match(text, i + 1).end()
    if text.startswith("]", i):
        end[0] = i + 1
        return
    while True:
        value, i = _DECODER.raw_decode(text, i)
        i = _SPACE.match(text, i).end()
        if text.startswith(",", i):
            yield value
            i = _SPACE.match(text, i + 1).end()
        elif text.startswith("]", i):
            end[0] = i + 1
            yield value
            return
        else:
            raise json.JSONDecodeError("expected ',' or ']'", text, i)


def _first_read_print(path: str) -> bytes:
    """What stands for a fingerprint of an object as the first read found it: the same for every object of
    the file, never equal to a digest (16 bytes) nor to another file's (a key moving between files is
    handed again)."""
    return b"\0first read of " + path.encode(errors="surrogateescape")


class DirectorySource:
    """Polls a directory; a file that fails to parse keeps its last good objects, an object the sink
    cannot take is rejected alone (the rest of its file and the files after it still apply), and the
    source reports synced only once it has read the directory (a missing one is not an empty one)."""

    name = "directory"

    def __init__(self, path: str, sink: Sink, interval: float = 0.2) -> None:
        self.path = path
        self.sink = sink
        self.interval = interval
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._by_file: dict[str, dict[ObjectKey, bytes]] = {}  # fingerprints, not objects
        self._known: dict[ObjectKey, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="source-directory", daemon=True)
        self.synced = False
        self.last_error: str | None = None
        self.rejected = 0  # objects the sink raised on
        self._read_once = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception as e:  # never let one bad scan stop the source
                self.last_error = str(e)
                log.exception("directory scan failed", path=self.path)
            if not self.synced and self._read_once:
                self.synced = True
                self.sink.synced(self.name)
            self._stop.wait(self.interval)

    def scan(self) -> bool:
        """Re-read changed files and hand the differences to the sink; True when anything changed."""
        stamps: dict[str, tuple[int, int, int]] = {}
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except FileNotFoundError:  # the source is gone, not empty: keep every object, as through an API outage
            if self.last_error != f"{self.path} is missing":
                self.last_error = f"{self.path} is missing"
                log.warning("manifest directory is missing; keeping the last objects", path=self.path)
            return False
        self._read_once = True
        if self.last_error == f"{self.path} is missing":
            self.last_error = None
            log.info("manifest directory is back", path=self.path)
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES) or not entry.is_file():
                continue
            st = entry.stat()
            stamps[entry.path] = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamps == self._stamps:
            return False
        if not self._stamps and not self._known:
            return self._first_read(stamps)
        for path in self._by_file.keys() - stamps.keys():
            del self._by_file[path]
        parsed: dict[str, dict[ObjectKey, dict]] = {}
        for path, stamp in stamps.items():
            if self._stamps.get(path) != stamp and (objects := self._read_file(path)) is not None:
                parsed[path] = objects
                self._by_file[path] = {key: fingerprint(obj) for key, obj in objects.items()}
        self._stamps = stamps
        winner: dict[ObjectKey, str] = {}  # a later file wins a key defined twice
        for path in sorted(self._by_file):
            winner.update(dict.fromkeys(self._by_file[path], path))
        for key in self._known.keys() - winner.keys():
            self._hand(self.sink.delete, key, *key)
        fresh: dict[ObjectKey, bytes] = {}
        for key, path in winner.items():
            fresh[key] = self._by_file[path][key]
            if self._known.get(key) != fresh[key]:
                if path not in parsed:  # an unchanged file's object took over a key
                    parsed[path] = self._read_file(path) or {}
                if key in parsed[path]:
                    self._hand(self.sink.upsert, key, parsed[path][key])
        self._known = fresh
        return True

    def _hand(self, op, key: ObjectKey, *args: object) -> None:
        """One object to the sink: whatever it raises rejects that object alone."""
        try:
            op(*args)
        except Exception as e:
            self.rejected += 1
            self.last_error = f"{key[0]} {key[1]}/{key[2]}: {type(e).__name__}: {e}"
            log.error("object rejected", object=f"{key[0]} {key[1]}/{key[2]}", error=f"{type(e).__name__}: {e}")

    def _first_read(self, stamps: dict[str, tuple[int, int, int]]) -> bool:
        """The first scan: each file's objects go to the sink as they are parsed, never a whole file held
        (the start's memory peak, and the arenas it left fragmented). A file that fails part-way takes back
        what it handed (an earlier file's object for the same key is handed again), so the sink ends with
        each file whole or not at all, as after later scans; the source is not synced before this ends.
        Objects are not digested here (json.dumps of every one: 0.3 s of a 10,000-service start): each stands
        as its file's first read until the file changes, when its objects are handed again and digested."""
        for path in sorted(stamps):
            prints: dict[ObjectKey, bytes] = {}
            as_read = _first_read_print(path)
            try:
                with open(path) as f:
                    text = f.read()
                for i, doc in enumerate(iter_manifests(text, path)):
                    key = self._watched_key(doc, path, i)
                    if key is not None:
                        prints[key] = as_read
                        self._hand(self.sink.upsert, key, doc)
            except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
                self._file_rejected(path, e)
                self._take_back(prints)
                continue
            self._by_file[path] = prints
        self._stamps = stamps
        self._known = {key: p for path in sorted(self._by_file) for key, p in self._by_file[path].items()}
        return True

    def _take_back(self, handed: dict[ObjectKey, bytes]) -> None:
        """Undo a failed file's objects: the latest earlier file's object for that key again, else delete."""
        for key in handed:
            earlier = [path for path in sorted(self._by_file) if key in self._by_file[path]]
            objects = self._read_file(earlier[-1]) if earlier else None
            if objects and key in objects:
                self._hand(self.sink.upsert, key, objects[key])
            else:
                self._hand(self.sink.delete, key, *key)

    def _file_rejected(self, path: str, e: Exception) -> None:
        self.last_error = f"{path}: {e}"
        log.error("manifest file rejected, keeping its last good objects", file=path, error=str(e))

    def _watched_key(self, doc: Any, path: str, i: int) -> ObjectKey | None:
        """A document's key when it is a kind noded watches; None (a malformed one logged) otherwise."""
        key = object_key(doc)
        if key is None:
            log.error("manifest rejected: not a Kubernetes object with kind and metadata.name", file=path, document=i)
            return None
        return key if key[0] in WATCHED_KINDS else None

    def _read_file(self, path: str) -> dict[ObjectKey, dict] | None:
        """The file's watched objects; None (logged) when it cannot be read or parsed."""
        try:
            with open(path) as f:
                docs = parse_manifests(f.read(), path)
        except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
            self._file_rejected(path, e)
            return None
        objects: dict[ObjectKey, dict] = {}
        for i, doc in enumerate(docs):
            key = self._watched_key(doc, path, i)
            if key is not None:
                objects[key] = doc
        return objects
