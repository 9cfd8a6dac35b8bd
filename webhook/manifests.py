"""Reading and writing manifest streams: multi-document YAML, or JSON, in; the same out.

Every document keeps its index (0-based, as it appears in the stream, empty documents
included) and the line it starts on, so an error can say *which* document is wrong. YAML is
read as Kubernetes reads it: timestamps stay strings (``creationTimestamp`` must round-trip
unchanged). Output YAML keeps key order, writes multi-line strings (PEM bundles) as literal
blocks and never folds long lines, so ``sidemesh inject -f x | kubectl apply -f -`` applies
exactly what was computed. I/O lives in the CLI; these functions work on text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from webhook.errors import ManifestError

__all__ = ["Document", "dump_json", "dump_yaml", "iter_documents", "read_documents"]


@dataclass(frozen=True)
class Document:
    """One document of the input stream."""

    index: int
    line: int
    """1-based line on which the document starts."""
    data: Any

    def where(self) -> str:
        return f"document {self.index} (line {self.line})"


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """SafeLoader without the timestamp resolver (Kubernetes keeps timestamps as strings)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


class _Dumper(_BaseDumper):  # type: ignore[misc]
    """SafeDumper that writes multi-line strings as ``|`` blocks."""


def _str(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value and not value.startswith(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _json_documents(text: str) -> Iterator[Document]:
    decoder = json.JSONDecoder()
    pos, index = 0, 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            data, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"document {index} (line {line}): invalid JSON at line {exc.lineno}, "
                f"column {exc.colno}: {exc.msg}"
            ) from None
        yield Document(index, line, data)
        index += 1


def _yaml_documents(text: str) -> Iterator[Document]:
    loader = _Loader(text)
    index = 0
    line = 1
    try:
        while True:
            try:
                if not loader.check_node():
                    return
                node = loader.get_node()
                if node is None:  # pragma: no cover - check_node said there is one
                    return
                line = node.start_mark.line + 1
                data = loader.construct_document(node)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown"
                problem = exc.problem or exc.context or "invalid YAML"
                raise ManifestError(f"document {index}: invalid YAML at {at}: {problem}") from None
            except yaml.YAMLError as exc:
                raise ManifestError(f"document {index}: invalid YAML: {exc}") from None
            yield Document(index, line, data)
            index += 1
    finally:
        loader.dispose()


def iter_documents(text: str) -> Iterator[Document]:
    """The documents of a YAML or JSON stream, one by one; ManifestError (with the index and
    line) where the stream breaks, after yielding every document before it.

    A stream whose first non-blank character is ``{`` or ``[`` is read as JSON (one or more
    concatenated values); anything else as YAML. Empty YAML documents are kept as ``None``.
    """
    if text.lstrip().startswith(("{", "[")):
        return _json_documents(text)
    return _yaml_documents(text)


def read_documents(text: str) -> list[Document]:
    """Every document of a stream, or ManifestError for the first broken one."""
    return list(iter_documents(text))


def dump_yaml(documents: list[Any]) -> str:
    """A multi-document YAML stream (``---`` between documents); '' for no documents."""
    return "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=2**30)
        for doc in documents
    )


def dump_json(documents: list[Any]) -> str:
    """JSON: one document as itself; several as a stream of objects, one after the other."""
    return "".join(
        json.dumps(doc, indent=2, ensure_ascii=False, default=_unjsonable) + "\n"
        for doc in documents
    )


def _unjsonable(value: Any) -> Any:
    raise ManifestError(
        f"a {type(value).__name__} value (YAML tag such as !!binary or !!set) has no JSON form: "
        "use -o yaml"
    )
