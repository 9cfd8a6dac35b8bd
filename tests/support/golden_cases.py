"""The golden injection cases, shared by every front door that must inject alike.

Each ``tests/testdata/inject/<case>.yaml`` is a manifest stream (YAML, or JSON in a ``.yaml``
file) whose first lines may carry a header comment::

    # case: {"namespace": "kube-system", "config": {"proxy": {"native_sidecar": false}}}

(``namespace``: the CLI's ``--namespace`` for objects that name none; ``config``: mesh config
keys as in a ``--config`` file). Its expected outputs sit next to it:

* ``<case>.yaml.injected`` — the output stream of ``sidemesh inject`` and
* ``<case>.patch.json`` — one entry per pod template: decision and the webhook's JSON patch,
* or, when the case must fail, ``<case>.error`` — the error lines, and nothing else.

Volatile values are normalised in the expected files (:func:`normalise`): the trust-bundle PEM
becomes ``<trust-bundle>`` and sidemesh's version ``<version>``. The webhook's tests use
:func:`cases` / :func:`pod_cases` to send the same pods through ``POST /mutate`` and compare
``normalise(their patch)`` with ``PodCase.patch``. ``UPDATE_GOLDEN=1`` rewrites the outputs.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from webhook import __version__, names
from webhook.cli.inject import PLACEHOLDER_BUNDLE
from webhook.cli.main import main
from webhook.config import MeshConfig, load_config
from webhook.manifests import dump_json, dump_yaml, iter_documents

__all__ = [
    "BUNDLE",
    "GOLDEN_DIR",
    "Case",
    "Outcome",
    "PodCase",
    "cases",
    "normalise",
    "pod_cases",
    "run_case",
]

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "testdata" / "inject"
#: The trust bundle every golden case is injected with (normalised away in expected files).
BUNDLE = PLACEHOLDER_BUNDLE
_HEADER = re.compile(r"^#\s*case:\s*(\{.*\})\s*$", re.MULTILINE)
# "document 0 (line 1): [/items/0: ]Kind/name: <the core's message>"
_PREFIX = re.compile(r"^document \d+ \(line \d+\): (?:/items/\d+: )*[A-Za-z]+/[^:]*: ")


@dataclass(frozen=True)
class Case:
    """One golden case: input, settings, and the expected (normalised) outputs."""

    name: str
    path: Path
    text: str
    namespace: str | None
    config: MeshConfig
    bundle: str
    is_json: bool
    header_config: dict[str, Any] | None
    """The ``config`` of the header, as written (the CLI gets it as a ``--config`` file)."""

    @property
    def injected_file(self) -> Path:
        return self.path.with_name(self.path.name + ".injected")

    @property
    def patch_file(self) -> Path:
        return self.path.with_name(self.path.stem + ".patch.json")

    @property
    def error_file(self) -> Path:
        return self.path.with_name(self.path.stem + ".error")

    def expected_error(self) -> str | None:
        return self.error_file.read_text() if self.error_file.exists() else None

    def expected_documents(self) -> str | None:
        return self.injected_file.read_text() if self.injected_file.exists() else None

    def expected_patches(self) -> list[dict[str, Any]] | None:
        if not self.patch_file.exists():
            return None
        entries: list[dict[str, Any]] = json.loads(self.patch_file.read_text())
        return entries

    def input_documents(self) -> list[Any]:
        """The input documents (empty ones dropped); ManifestError for a broken stream."""
        return [d.data for d in iter_documents(self.text) if d.data is not None]


@dataclass(frozen=True)
class PodCase:
    """One pod template of a case, as the webhook would see it (a Pod in ``namespace``)."""

    case: str
    document: int
    template: str
    namespace: str
    pod: dict[str, Any]
    config: MeshConfig
    bundle: str
    inject: bool | None
    reason: str | None
    patch: list[dict[str, Any]] | None
    """Expected patch, normalised; None for error cases."""
    error: str | None
    """Expected rejection message (the core's, without the CLI's document prefix)."""


@dataclass
class Outcome:
    """What ``sidemesh inject`` makes of a case (computed, not read from the golden files)."""

    documents: list[Any]
    patches: list[dict[str, Any]]
    errors: list[str]
    stdout: str
    """What ``sidemesh inject`` printed (empty when a document failed)."""
    exit_code: int

    def rendered(self, case: Case) -> dict[str, str]:
        """The golden files this outcome corresponds to: file name → normalised content."""
        if self.errors:
            return {case.error_file.name: "".join(e + "\n" for e in self.errors)}
        docs = normalise(self.documents, case.bundle)
        text = dump_json(docs) if case.is_json else dump_yaml(docs)
        patches = json.dumps(normalise(self.patches, case.bundle), indent=2) + "\n"
        return {case.injected_file.name: text, case.patch_file.name: patches}


def _load(path: Path) -> Case:
    text = path.read_text(encoding="utf-8")
    match = _HEADER.search(text)
    header: dict[str, Any] = json.loads(match.group(1)) if match else {}
    unknown = set(header) - {"namespace", "config"}
    if unknown:
        raise ValueError(f"{path.name}: unknown header keys {sorted(unknown)}")
    return Case(
        name=path.stem,
        path=path,
        text=text,
        namespace=header.get("namespace"),
        config=load_config(header.get("config")),
        bundle=BUNDLE,
        is_json=text.lstrip().startswith(("{", "[")),
        header_config=header.get("config"),
    )


def cases() -> list[Case]:
    """Every golden case, sorted by name."""
    return [_load(p) for p in sorted(GOLDEN_DIR.glob("*.yaml"))]


def run_case(case: Case) -> Outcome:
    """Run the case through ``sidemesh inject``'s own ``main()``, in-process.

    Twice: once for the output stream, once with ``--patch`` for the webhook's patches. So a
    golden file holds exactly what a user of the CLI gets (normalised), not a parallel path.
    """
    with tempfile.TemporaryDirectory(prefix="sidemesh-golden-") as tmp:
        argv = ["inject", "-f", str(case.path), "--bundle", _write(tmp, "ca.crt", case.bundle)]
        if case.namespace:
            argv += ["--namespace", case.namespace]
        if case.header_config is not None:
            argv += ["--config", _write(tmp, "mesh.yaml", yaml.safe_dump(case.header_config))]
        code, out, err = _cli(argv)
        errors = [line.removeprefix("error: ") for line in err.splitlines()]
        errors = [e for e, line in zip(errors, err.splitlines(), strict=True) if e != line]
        if errors or code != 0:
            return Outcome([], [], errors or [err], stdout=out, exit_code=code)
        documents = [d.data for d in iter_documents(out) if d.data is not None]
        patch_code, patches, patch_err = _cli([*argv, "--patch"])
        assert patch_code == 0, patch_err
        return Outcome(documents, json.loads(patches), [], stdout=out, exit_code=code)


def _write(directory: str, name: str, text: str) -> str:
    path = Path(directory) / name
    path.write_text(text)
    return str(path)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``sidemesh ARGV`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def normalise(value: Any, bundle: str = BUNDLE) -> Any:
    """Replace the volatile parts (bundle PEM, sidemesh version) with fixed markers."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == names.STATUS and isinstance(v, str) and v.startswith("{"):
                status = json.loads(v)
                status["version"] = "<version>"
                out[k] = json.dumps(status, separators=(",", ":"))
            else:
                out[k] = normalise(v, bundle)
        return out
    if isinstance(value, list):
        return [normalise(v, bundle) for v in value]
    if isinstance(value, str):
        if value == bundle:
            return "<trust-bundle>"
        return value.replace(f"sidemesh:{__version__}", "sidemesh:<version>")
    return value


def _template(doc: Any, pointer: str) -> Any:
    for token in pointer.split("/")[1:]:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def pod_cases() -> list[PodCase]:
    """Every pod template of every case, as the pod the webhook would be asked about."""
    out: list[PodCase] = []
    for case in cases():
        error = case.expected_error()
        patches = case.expected_patches() or []
        if error is not None:
            lines = error.splitlines()
            if len(lines) != 1 or not _PREFIX.match(lines[0]):
                continue  # not a single-pod failure (broken YAML …): nothing for the webhook
            docs = case.input_documents()
            if len(docs) != 1:
                continue
            result_pointer = _single_template(docs[0])
            if result_pointer is None:
                continue
            out.append(_pod_case(case, 0, result_pointer, docs[0], None, _PREFIX.sub("", lines[0])))
            continue
        docs_by_index = {d.index: d.data for d in iter_documents(case.text) if d.data is not None}
        for entry in patches:
            doc = docs_by_index[entry["document"]]
            pc = _pod_case(case, entry["document"], entry["template"], doc, entry, None)
            out.append(pc)
    return out


def _single_template(doc: Any) -> str | None:
    from webhook.inject.workloads import TEMPLATE_PATHS

    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in TEMPLATE_PATHS:
        return None
    return "".join("/" + p for p in TEMPLATE_PATHS[kind])


def _pod_case(
    case: Case,
    index: int,
    pointer: str,
    doc: Any,
    entry: dict[str, Any] | None,
    error: str | None,
) -> PodCase:
    template = _template(doc, pointer)
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    if entry is not None:
        ns = entry["namespace"]
    else:  # error cases are single top-level objects
        ns = (doc.get("metadata") or {}).get("namespace") or case.namespace or "default"
    return PodCase(
        case=case.name,
        document=index,
        template=pointer,
        namespace=ns,
        pod=pod,
        config=case.config,
        bundle=case.bundle,
        inject=entry["decision"]["inject"] if entry else None,
        reason=entry["decision"]["reason"] if entry else None,
        patch=entry["patch"] if entry else None,
        error=error,
    )


# --- Kubernetes schema validation ------------------------------------------------------------


#: Kubernetes versions the injected output must validate against: the oldest sidemesh supports
#: (native sidecars on by default since 1.29) and the newest kubernetes-validate ships.
def k8s_versions() -> tuple[str, ...]:
    from kubernetes_validate.utils import latest_version

    return ("1.30", ".".join(latest_version().split(".")[:2]))


def validate_k8s(doc: Any) -> None:
    """Validate an object strictly against both versions' OpenAPI schemas (AssertionError).

    Lists are validated item by item. An object whose apiVersion a version no longer serves
    (``batch/v1beta1`` CronJobs in the Linkerd corpus) is validated through its pod template,
    wrapped as a v1 Pod: that is the part sidemesh wrote.
    """
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    from webhook.inject.workloads import TEMPLATE_PATHS

    if isinstance(doc, dict) and doc.get("kind") == "List":
        for item in doc.get("items") or ():
            if item is not None:
                validate_k8s(item)
        return
    for version in k8s_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            kind = doc.get("kind")
            if kind not in TEMPLATE_PATHS:
                continue  # not a kind this version knows, and not one sidemesh changes
            template = doc
            for key in TEMPLATE_PATHS[kind]:
                template = template[key]
            pod = {"apiVersion": "v1", "kind": "Pod", **template}
            _validate_one(kubernetes_validate, pod, version)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(_describe(doc, version, exc)) from None


def _validate_one(kv: Any, doc: Any, version: str) -> None:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        raise AssertionError(_describe(doc, version, exc)) from None


def _describe(doc: Any, version: str, exc: Any) -> str:
    caught = getattr(exc, "caught", exc)
    where = "/".join(map(str, getattr(caught, "absolute_path", [])))
    message = getattr(caught, "message", str(caught))
    return f"{doc.get('kind')} invalid for Kubernetes {version} at {where}: {message}"


# --- inputs derived from other cases ---------------------------------------------------------

#: Cases whose input is the injected output of another case (with the default config), so
#: they track the injector's current output: derived case → source case.
DERIVED: dict[str, str] = {
    "already-injected": "deployment",
    "reinjected-after-config-change": "pod-probes",
}


def derived_input(case: Case) -> str:
    """What the input of a derived case should be: its header comments + the source, injected."""
    source = next(c for c in cases() if c.name == DERIVED[case.name])
    outcome = run_case(source)
    assert not outcome.errors, outcome.errors
    header = "".join(ln for ln in case.text.splitlines(keepends=True) if ln.startswith("#"))
    body = dump_json(outcome.documents) if source.is_json else dump_yaml(outcome.documents)
    return header + body
