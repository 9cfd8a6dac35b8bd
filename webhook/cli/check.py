"""``sidemesh check -f FILE``: what each rule in a manifest applies to and what is wrong with
it, offline, with the same code the control plane runs; for a manifest without rules, whether
each workload would be injected (``webhook.cli.inject``).

Rule kinds register an *explainer* in :data:`EXPLAINERS`: ``kind → "module:function"``
(imported only when a document of that kind is checked, so the command stays light). An
explainer is called as ``explain(obj, ctx)`` with one document's object and the
:class:`CheckContext` (every object of the file and of ``--mesh-dir``, by kind, and the mesh
model built from them) and returns an :class:`Explanation`. Adding a kind is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EXPLAINERS", "CheckContext", "Explanation", "Finding", "register"]

#: kind → "module:function" explaining one object of that kind.
EXPLAINERS: dict[str, str] = {
    "HTTPRoute": "webhook.routing.checks:explain",
    "GRPCRoute": "webhook.routing.checks:explain",
    "TrafficPolicy": "webhook.routing.checks:explain",
    "AccessPolicy": "webhook.policy.explain:explain",
    "RateLimitPolicy": "webhook.policy.explain:explain",
}


@dataclass(frozen=True)
class Finding:
    """One thing wrong: ``field`` is where in the object (``spec.rules[0].backendRefs[1]``)."""

    field: str
    message: str
    severity: str = "error"  # or "warning": the rule is used, but maybe not as meant


@dataclass(frozen=True)
class Explanation:
    lines: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()


@dataclass
class CheckContext:
    """What an explainer may look at; ``memo`` lets explainers of one run share work (the
    routing table is built once for all routes and policies)."""

    objects: Mapping[str, list[dict[str, Any]]]
    model: Any  # webhook.discovery.model.MeshModel
    memo: dict[str, Any] = field(default_factory=dict)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="explain the traffic rules of a manifest and what is wrong with them; for "
        "workloads, whether they would be injected and why (changes nothing)",
        description="For HTTPRoute, GRPCRoute, TrafficPolicy (and other rule kinds): what each "
        "applies to and every problem, by document and field, exactly as the control plane "
        "sees them. Services, EndpointSlices and Pods in the file (or in --mesh-dir) are the "
        "mesh the rules are checked against. A manifest without rules gets the injection check.",
    )
    p.add_argument("-f", "--filename", required=True, metavar="FILE", help="manifest, - = stdin")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument(
        "--mesh-dir", metavar="DIR", help="manifests of the mesh (as `sidemesh discovery` reads)"
    )
    p.add_argument("--config", metavar="FILE", help="mesh config YAML (default: built-in)")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace of objects that name none")
    p.add_argument("--bundle", metavar="FILE", help="trust bundle PEM (injection check only)")
    p.set_defaults(handler=_check)


def _explainer(kind: str) -> Callable[[Mapping[str, Any], CheckContext], Explanation]:
    module, _, name = EXPLAINERS[kind].partition(":")
    fn: Callable[[Mapping[str, Any], CheckContext], Explanation] = getattr(
        importlib.import_module(module), name
    )
    return fn


def _read(filename: str) -> str:
    if filename == "-":
        return sys.stdin.read()
    try:
        return Path(filename).read_text(encoding="utf-8")
    except OSError as exc:
        from webhook.errors import SidemeshError

        raise SidemeshError(f"cannot read {filename}: {exc.strerror}") from None


def _check(args: argparse.Namespace) -> int:
    from webhook.manifests import read_documents

    text = _read(args.filename)
    docs = read_documents(text)
    if not any(isinstance(d.data, Mapping) and d.data.get("kind") in EXPLAINERS for d in docs):
        from webhook.cli.inject import check_workloads

        return check_workloads(args, text)
    findings = check_documents(docs, args)
    if args.output == "json":
        sys.stdout.write(json.dumps(findings, indent=2) + "\n")
    else:
        sys.stdout.write(_text(findings))
    return 1 if any(f["severity"] == "error" for d in findings for f in d["problems"]) else 0


def _objects(docs: list[Any], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from webhook.discovery.filesource import _plain

    by_kind: dict[str, list[dict[str, Any]]] = {}
    if args.mesh_dir:
        from webhook.discovery.filesource import FileSource
        from webhook.discovery.store import KINDS, ObjectStore

        store = ObjectStore()
        FileSource(store, Path(args.mesh_dir)).load()
        for kind in KINDS:
            by_kind.setdefault(kind, []).extend(dict(o) for o in store.list(kind))
    default_ns = args.namespace or "default"
    for doc in docs:
        obj = doc.data
        if not isinstance(obj, Mapping) or not isinstance(obj.get("kind"), str):
            continue
        obj = _plain(obj)
        meta = obj.setdefault("metadata", {})
        if obj["kind"] != "Namespace":
            meta.setdefault("namespace", default_ns)
        # The file's version of an object replaces the mesh directory's (check an edit).
        same = by_kind.setdefault(obj["kind"], [])
        same[:] = [o for o in same if _name(o) != _name(obj)]
        same.append(obj)
    return by_kind


def _name(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def check_documents(docs: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per rule document: where it is, what it does, what is wrong."""
    from webhook.discovery.build import build_model

    objects = _objects(docs, args)
    ctx = CheckContext(objects, build_model(objects))
    out = []
    default_ns = args.namespace or "default"
    for doc in docs:
        obj = doc.data
        if not isinstance(obj, Mapping) or obj.get("kind") not in EXPLAINERS:
            continue
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
        assert isinstance(meta, Mapping)
        plain = {**obj, "metadata": {**meta, "namespace": meta.get("namespace") or default_ns}}
        explanation = _explainer(obj["kind"])(plain, ctx)
        out.append(
            {
                "document": doc.index,
                "line": doc.line,
                "kind": obj["kind"],
                "namespace": plain["metadata"]["namespace"],
                "name": str(meta.get("name") or "<unnamed>"),
                "explanation": list(explanation.lines),
                "problems": [
                    {"field": f.field, "message": f.message, "severity": f.severity}
                    for f in explanation.findings
                ],
            }
        )
    return out


def _text(findings: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for d in findings:
        head = (
            f"document {d['document']} (line {d['line']}): {d['kind']} {d['namespace']}/{d['name']}"
        )
        lines.append(head)
        lines += [f"  {line}" for line in d["explanation"]]
        for p in d["problems"]:
            lines.append(f"  {p['severity']}: {p['field']}: {p['message']}")
        if not d["problems"]:
            lines.append("  ok")
    return "\n".join(lines) + "\n"
