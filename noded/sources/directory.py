"""The manifest-directory source: YAML/JSON files of Kubernetes objects, re-read when they change."""

from __future__ import annotations

import os
import threading

import structlog
import yaml

from noded.sources.base import WATCHED_KINDS, ObjectKey, Sink, apply_snapshot, object_key

log = structlog.get_logger("noded.sources.directory")

SUFFIXES = (".yaml", ".yml", ".json")


def parse_manifests(text: str, origin: str) -> list[dict]:
    """The objects in one file (multi-document YAML, `kind: List` expanded). Raises yaml.YAMLError."""
    out: list[dict] = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


class DirectorySource:
    """Polls a directory; a file that fails to parse keeps its last good objects."""

    name = "directory"

    def __init__(self, path: str, sink: Sink, interval: float = 0.2) -> None:
        self.path = path
        self.sink = sink
        self.interval = interval
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._by_file: dict[str, dict[ObjectKey, dict]] = {}
        self._known: dict[ObjectKey, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="source-directory", daemon=True)
        self.synced = False
        self.last_error: str | None = None

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
            if not self.synced:
                self.synced = True
                self.sink.synced(self.name)
            self._stop.wait(self.interval)

    def scan(self) -> bool:
        """Re-read changed files and hand the differences to the sink; True when anything changed."""
        stamps: dict[str, tuple[int, int, int]] = {}
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except FileNotFoundError:
            entries = []
            if self.last_error != f"{self.path} is missing":
                self.last_error = f"{self.path} is missing"
                log.warning("manifest directory is missing", path=self.path)
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES) or not entry.is_file():
                continue
            st = entry.stat()
            stamps[entry.path] = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamps == self._stamps:
            return False
        for path in self._by_file.keys() - stamps.keys():
            del self._by_file[path]
        for path, stamp in stamps.items():
            if self._stamps.get(path) != stamp:
                self._read_file(path)
        self._stamps = stamps
        fresh: dict[ObjectKey, dict] = {}
        for path in sorted(self._by_file):
            fresh.update(self._by_file[path])
        apply_snapshot(self.sink, self._known, fresh)
        self._known = fresh
        return True

    def _read_file(self, path: str) -> None:
        try:
            with open(path) as f:
                docs = parse_manifests(f.read(), path)
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            self.last_error = f"{path}: {e}"
            log.error("manifest file rejected, keeping its last good objects", file=path, error=str(e))
            return
        objects: dict[ObjectKey, dict] = {}
        for i, doc in enumerate(docs):
            key = object_key(doc)
            if key is None:
                log.error("manifest rejected: not a Kubernetes object with kind and metadata.name",
                          file=path, document=i)
                continue
            if key[0] in WATCHED_KINDS:
                objects[key] = doc
        self._by_file[path] = objects
