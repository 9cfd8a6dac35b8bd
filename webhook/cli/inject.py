"""``sidemesh inject`` / ``uninject`` / ``check``: the injector as a dry-run filter.

``sidemesh inject -f app.yaml | kubectl apply -f -`` — the same documents in the same order
come out, pod templates injected exactly as the webhook would inject the pods. A report of
every workload goes to stderr. Any error (unreadable YAML, a bad annotation, a conflict) means
exit code 1 and *nothing* on stdout, so a pipe into ``kubectl apply`` never applies half a
stream; ``--keep-going`` writes the documents that worked and still exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from webhook.config import MeshConfig, load_config_file
from webhook.errors import ManifestError, SidemeshError
from webhook.inject.annotations import UNKNOWN_MARK
from webhook.inject.workloads import (
    NOT_A_WORKLOAD,
    ObjectResult,
    check_object,
    inject_object,
    uninject_object,
)
from webhook.manifests import Document, dump_json, dump_yaml, iter_documents

__all__ = ["PLACEHOLDER_BUNDLE", "check_workloads", "load_bundle", "register"]

#: Used when neither --bundle nor certs/ca.crt exists: a real, self-signed, already expired
#: certificate whose name says what it is, so an injected pod parses but can never verify a peer.
PLACEHOLDER_BUNDLE: Final = """\
-----BEGIN CERTIFICATE-----
MIIBnjCCAUSgAwIBAgIBATAKBggqhkjOPQQDAjBOMREwDwYDVQQKDAhzaWRlbWVz
aDE5MDcGA1UEAwwwc2lkZW1lc2ggcGxhY2Vob2xkZXIgYnVuZGxlIC0gTk9UIEEg
VFJVU1QgQU5DSE9SMB4XDTI2MDEwMTAwMDAwMFoXDTI2MDEwMjAwMDAwMFowTjER
MA8GA1UECgwIc2lkZW1lc2gxOTA3BgNVBAMMMHNpZGVtZXNoIHBsYWNlaG9sZGVy
IGJ1bmRsZSAtIE5PVCBBIFRSVVNUIEFOQ0hPUjBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABPc/t25jSEDg4O2zeAw7tMM8S+GYeUs8LYy3EBsAJ6MmO6UcRvAa7Lss
k1MfhiUQCR/eLgPzhnhhzK33y+skX96jEzARMA8GA1UdEwEB/wQFMAMBAf8wCgYI
KoZIzj0EAwIDSAAwRQIgE18hl7PWDreZqqyvpxsHfwv+lC5WHjBWujpjvtuXt8sC
IQCX0WtQrvFhhg5hYoajzCl0/izDKal01ob2cYYzSNBhCA==
-----END CERTIFICATE-----
"""
DEFAULT_BUNDLE_FILE: Final = Path("certs") / "ca.crt"


def register(subparsers: Any) -> None:
    """Add ``inject`` and ``uninject``."""
    p = subparsers.add_parser(
        "inject",
        help="add the sidecar to the workloads of a manifest (dry run: prints the result)",
        description="Inject sidemesh into every pod template of a manifest stream and print "
        "it, as the webhook would. Example: sidemesh inject -f app.yaml | kubectl apply -f -",
    )
    _common(p)
    _mesh(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--patch",
        action="store_true",
        help="print, per pod template, the JSON patch the webhook would return",
    )
    out.add_argument("--diff", action="store_true", help="print a unified diff instead")
    p.set_defaults(handler=_inject)

    p = subparsers.add_parser(
        "uninject",
        help="remove what sidemesh injected from a manifest",
        description="Reverse `sidemesh inject`: remove sidemesh's containers, volumes and "
        "annotations and restore the original probes.",
    )
    _common(p)
    p.set_defaults(handler=_uninject)

    # `sidemesh check` is registered by webhook.cli.check, which calls check_workloads for a
    # manifest without traffic rules.


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", required=True, metavar="FILE", help="manifest, - = stdin")
    p.add_argument(
        "-o",
        "--output",
        choices=("yaml", "json"),
        default=None,
        help="output format (default: that of the input)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="on errors, still print the documents that worked (exit code stays 1)",
    )


def _mesh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="mesh config YAML (default: built-in)")
    p.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help="namespace of objects that name none (default: default)",
    )
    p.add_argument(
        "--bundle",
        metavar="FILE",
        help=f"trust bundle PEM (default: {DEFAULT_BUNDLE_FILE} if present, else a placeholder)",
    )


# --- edges: files --------------------------------------------------------------------------


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"cannot read {name}: not UTF-8 text") from None


def load_bundle(path: str | None, *, warn: TextIO) -> str:
    """The trust bundle: --bundle, else certs/ca.crt, else the placeholder (said on ``warn``)."""
    if path is None and DEFAULT_BUNDLE_FILE.is_file():
        path = str(DEFAULT_BUNDLE_FILE)
    if path is None:
        print(
            "sidemesh: no --bundle and no certs/ca.crt: using a PLACEHOLDER trust bundle; "
            "injected proxies will not verify any peer (run `make certs` or pass --bundle)",
            file=warn,
        )
        return PLACEHOLDER_BUNDLE
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read trust bundle {path}: {exc.strerror}") from None
    return reencode_bundle(raw, where=f"trust bundle {path}")


def reencode_bundle(pem: bytes, *, where: str) -> str:
    """Every certificate of a PEM bundle, parsed and written out again (nothing else kept).

    What reaches every pod's annotation is only what parsed as an X.509 certificate: no text
    around the blocks, no key, no block cut off before its END line. Anything else in the
    file is refused with ``where`` named.
    """
    from cryptography import x509  # only here: `sidemesh inject` without a bundle stays quick
    from cryptography.hazmat.primitives.serialization import Encoding

    if b"PRIVATE KEY" in pem:
        raise ManifestError(f"{where} holds a private key: give only the root certificate(s)")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ManifestError(f"{where} holds no PEM certificate") from None
    if len(certs) != pem.count(b"-----BEGIN CERTIFICATE-----") or b"-----BEGIN " in pem.replace(
        b"-----BEGIN CERTIFICATE-----", b""
    ):
        raise ManifestError(f"{where} holds something besides complete PEM certificates")
    return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in certs)


# --- running one operation over a stream ---------------------------------------------------


@dataclass
class _Run:
    documents: list[Document]
    json: bool
    """Whether the input was JSON (the output then defaults to JSON too)."""
    results: list[tuple[Document, ObjectResult]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _process(
    args: argparse.Namespace, op: Callable[[Any], ObjectResult], text: str | None = None
) -> _Run:
    text = _read_input(args.filename) if text is None else text
    run = _Run([], json=text.lstrip().startswith(("{", "[")))
    try:
        for doc in iter_documents(text):
            run.documents.append(doc)
            if doc.data is None:
                continue  # an empty document ('---' at the end): nothing to write
            try:
                run.results.append((doc, op(doc.data)))
            except SidemeshError as exc:
                run.errors.append(f"{doc.where()}: {exc}")
    except ManifestError as exc:
        # The parser cannot resume after broken YAML: what came before still counts.
        run.errors.append(str(exc))
    return run


def _report(run: _Run, done: str, err: TextIO) -> None:
    counts = {done: 0, "skipped": 0, "passed through": 0}
    for doc, result in run.results:
        for t in result.templates:
            what = done if t.decision.inject else "skipped"
            counts[what] += 1
            at = f" {t.item}" if t.item else ""
            label = f"{doc.where()}{at}: {t.kind} {t.namespace}/{t.name or '<unnamed>'}"
            why = "" if t.decision.reason == what else f" ({t.decision.reason})"
            print(f"{label}: {what}{why}", file=err)
            for key in t.read:
                if key.endswith(UNKNOWN_MARK):
                    print(f"warning: {label}: {key}", file=err)
        for label in result.passed_through:
            counts["passed through"] += 1
            print(f"{doc.where()}: {label}: passed through ({NOT_A_WORKLOAD})", file=err)
    for message in run.errors:
        print(f"error: {message}", file=err)
    summary = ", ".join(f"{n} {what}" for what, n in counts.items())
    print(f"sidemesh: {summary}, {len(run.errors)} error(s)", file=err)


def _format(args: argparse.Namespace, run: _Run) -> str:
    fmt = args.output or ("json" if run.json else "yaml")
    docs = [result.obj for _, result in run.results]
    return dump_json(docs) if fmt == "json" else dump_yaml(docs)


def _write(args: argparse.Namespace, run: _Run, out: str) -> int:
    if run.errors and not args.keep_going:
        return 1
    sys.stdout.write(out)
    return 1 if run.errors else 0


# --- handlers --------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> MeshConfig:
    return load_config_file(args.config)


def _inject(args: argparse.Namespace) -> int:
    config = _config(args)
    bundle = load_bundle(args.bundle, warn=sys.stderr)

    def op(obj: Any) -> ObjectResult:
        return inject_object(obj, namespace=args.namespace, config=config, bundle=bundle)

    run = _process(args, op)
    _report(run, "injected", sys.stderr)
    if args.patch:
        out = _patches(args, run)
    elif args.diff:
        out = _diff(run)
    else:
        out = _format(args, run)
    return _write(args, run, out)


def _uninject(args: argparse.Namespace) -> int:
    def op(obj: Any) -> ObjectResult:
        return uninject_object(obj)

    run = _process(args, op)
    _report(run, "uninjected", sys.stderr)
    return _write(args, run, _format(args, run))


def check_workloads(args: argparse.Namespace, text: str | None = None) -> int:
    """`sidemesh check` of a manifest's workloads (``text``: the manifest, already read)."""
    config = _config(args)
    # The same bundle as inject, so that a pod injected with it reads "already-injected"; it
    # only ends up in the discarded pod, so a placeholder needs no warning here.
    bundle = load_bundle(args.bundle, warn=io.StringIO())

    def op(obj: Any) -> ObjectResult:
        return check_object(obj, namespace=args.namespace, config=config, bundle=bundle)

    run = _process(args, op, text)
    rows: list[dict[str, Any]] = []
    for doc, result in run.results:
        for t in result.templates:
            rows.append(
                {
                    "document": doc.index,
                    "kind": t.kind,
                    "namespace": t.namespace,
                    "name": t.name,
                    "inject": t.decision.inject,
                    "reason": t.decision.reason,
                    "injected": t.injected,
                    "read": t.read,
                }
            )
    if args.output == "json":
        payload = {"workloads": rows, "errors": run.errors}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(_table(rows))
        for message in run.errors:
            print(f"error: {message}", file=sys.stderr)
    return 1 if run.errors else 0


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("DOC", "KIND", "NAMESPACE/NAME", "INJECT", "REASON", "SIDEMESH ANNOTATIONS")
    lines = [header]
    for r in rows:
        lines.append(
            (
                str(r["document"]),
                r["kind"],
                f"{r['namespace']}/{r['name'] or '<unnamed>'}",
                "yes" if r["inject"] or r["reason"] == "already-injected" else "no",
                r["reason"],
                ", ".join(r["read"]) or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        + "\n"
        for line in lines
    )


def _patches(args: argparse.Namespace, run: _Run) -> str:
    entries = [
        {
            "document": doc.index,
            "kind": t.kind,
            "namespace": t.namespace,
            "name": t.name,
            "template": t.path,
            "decision": {"inject": t.decision.inject, "reason": t.decision.reason},
            "patch": t.patch,
        }
        for doc, result in run.results
        for t in result.templates
    ]
    if args.output == "yaml":
        return dump_yaml([entries])
    return json.dumps(entries, indent=2) + "\n"


def _diff(run: _Run) -> str:
    chunks: list[str] = []
    for doc, result in run.results:
        before = dump_yaml([doc.data]).splitlines(keepends=True)
        after = dump_yaml([result.obj]).splitlines(keepends=True)
        name = f"document-{doc.index}"
        chunks.extend(difflib.unified_diff(before, after, f"a/{name}", f"b/{name}"))
    return "".join(chunks)
