"""A source that reads the mesh from a directory of manifests (YAML or JSON) and watches it.

It feeds the same :class:`~webhook.discovery.store.ObjectStore` as the Kubernetes source, so
``make run``, demos and tests drive the control plane with plain files and no cluster. Every
file (``*.yaml``, ``*.yml``, ``*.json``, sorted, not recursive) may hold several documents and
``kind: List`` wrappers; kinds the control plane does not watch are skipped.

Watching is polling: the names, sizes and mtimes of the files are compared every ``interval``
seconds, and on any difference every file is read again and each kind replaced as a whole
(the store only tells subscribers about objects that really changed). A file that does not
parse keeps its previous objects and the error names the file, so a half-saved edit never
empties the mesh.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from webhook.discovery.store import KINDS, ObjectStore
from webhook.errors import ConfigError

__all__ = ["DEFAULT_MESH", "FileSource", "parse_documents", "read_objects"]

LOG = logging.getLogger("sidemesh.discovery")

#: The embedded default: a small demo mesh (package data), used when no directory is given.
DEFAULT_MESH = "default-mesh.yaml"
_SUFFIXES = (".yaml", ".yml", ".json")


def parse_documents(text: str, where: str) -> list[dict[str, Any]]:
    """The watched objects in one file's text, ``kind: List`` unwrapped; errors name ``where``."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    out: list[dict[str, Any]] = []
    for index, doc in enumerate(_flatten(docs)):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{where}: document {index} is a {type(doc).__name__}, not a map")
        kind = doc.get("kind")
        if kind not in KINDS:
            continue
        meta = doc.get("metadata")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            raise ConfigError(f"{where}: {kind} (document {index}) has no metadata.name")
        if kind != "Namespace" and not isinstance(meta.get("namespace"), str):
            # Unlike kubectl there is no current namespace to fall back to: say so.
            raise ConfigError(f"{where}: {kind} {meta['name']!r} has no metadata.namespace")
        out.append(_plain(doc))
    return out


def _flatten(docs: Iterable[Any]) -> Iterator[Any]:
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            yield from _flatten(doc.get("items") or [])
        else:
            yield doc


def _plain(doc: Mapping[str, Any]) -> dict[str, Any]:
    # One canonical shape whatever the file format was (YAML dates, tuples …): JSON round trip.
    return dict(json.loads(json.dumps(doc, default=str)))


def read_objects(files: Iterable[Path]) -> dict[str, list[dict[str, Any]]]:
    """All watched objects of ``files`` by kind (raises on the first bad file)."""
    by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for path in files:
        for obj in parse_documents(path.read_text(encoding="utf-8"), str(path)):
            by_kind[obj["kind"]].append(obj)
    return by_kind


@dataclass(frozen=True)
class _FileStamp:
    size: int
    mtime_ns: int


class FileSource:
    """Loads ``directory`` (or the embedded default) into ``store`` and keeps it in step."""

    def __init__(self, store: ObjectStore, directory: Path | None, interval: float = 1.0) -> None:
        self._store = store
        self._dir = directory
        self._interval = interval
        self._stamps: dict[Path, _FileStamp] = {}
        self._parsed: dict[Path, list[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        """Read everything once (the first list). A bad file here is an error, not a warning."""
        if self._dir is None:
            text = resources.files("webhook.samples").joinpath(DEFAULT_MESH).read_text("utf-8")
            objs = parse_documents(text, f"<embedded {DEFAULT_MESH}>")
            self._publish({Path(DEFAULT_MESH): objs})
            return
        if not self._dir.is_dir():
            raise ConfigError(f"mesh directory {self._dir} does not exist or is not a directory")
        stamps = self._scan()
        parsed = {p: parse_documents(p.read_text("utf-8"), str(p)) for p in stamps}
        self._stamps = stamps
        self._publish(parsed)

    def poll(self) -> bool:
        """Re-read when a file was added, removed or changed; whether anything was re-read."""
        if self._dir is None:
            return False
        try:
            stamps = self._scan()
        except OSError as exc:
            LOG.warning("cannot list mesh directory %s: %s", self._dir, exc)
            return False
        if stamps == self._stamps:
            return False
        parsed: dict[Path, list[dict[str, Any]]] = {}
        for path in stamps:
            if stamps[path] == self._stamps.get(path) and path in self._parsed:
                parsed[path] = self._parsed[path]
                continue
            try:
                parsed[path] = parse_documents(path.read_text("utf-8"), str(path))
            except (ConfigError, OSError, UnicodeDecodeError) as exc:
                LOG.error("%s; keeping what it said before", exc)
                parsed[path] = self._parsed.get(path, [])
        self._stamps = stamps
        self._publish(parsed)
        return True

    def start(self) -> None:
        """Poll in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="filesource", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # never let one bad round end the watch
                LOG.exception("reading mesh directory %s failed", self._dir)

    def _scan(self) -> dict[Path, _FileStamp]:
        assert self._dir is not None
        stamps: dict[Path, _FileStamp] = {}
        for path in sorted(self._dir.iterdir()):
            if path.suffix in _SUFFIXES and not path.name.startswith("."):
                st = path.stat()
                stamps[path] = _FileStamp(st.st_size, st.st_mtime_ns)
        return stamps

    def _publish(self, parsed: dict[Path, list[dict[str, Any]]]) -> None:
        self._parsed = parsed
        by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for objs in parsed.values():
            for obj in objs:
                by_kind[obj["kind"]].append(obj)
        # Namespaces first, pods last: readers woken by one kind see its dependencies already.
        for kind in KINDS:
            self._store.replace(kind, by_kind[kind])
