"""Purity is a property of packages: the pure core imports nothing from the edges (no server,
CA, CLI, web framework, clock, randomness, sockets or subprocesses) — checked on the import
statements of every module in each pure package, transitively within webhook/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WEBHOOK = Path(__file__).resolve().parent.parent / "webhook"

#: Pure packages and modules, as dotted names under ``webhook``. A package means every module
#: in it, including ones added later.
PURE = (
    "inject",
    "admission.review",
    "dataplane.capture",
    "dataplane.bootstrap",
    "cni.spec",
    "cni.conflist",
    "dataplane.ads_bootstrap",
    "discovery.model",
    "discovery.compiler",
    "discovery.scope",
    "discovery.tables",
    "discovery.resources",
    "discovery.slim",
    "discovery.backoff",
    "manifests",
    "config",
    "values",
    "names",
    "errors",
)
FORBIDDEN = {
    "time",
    "random",
    "secrets",
    "datetime",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "socket",
    "subprocess",
    "threading",
    "asyncio",
    "cryptography",
    "kubernetes",
    "webhook.server",
    "webhook.ca",
    "webhook.cli",
    "webhook.install",
    "webhook.kube",
    "webhook.dataplane.agent",
    "webhook.dataplane.netns",
    "webhook.dataplane.identity",
    "webhook.dataplane.probes",
}


def module_file(dotted: str) -> Path | None:
    """The file of ``webhook.<dotted>``: a module, or a package's ``__init__``."""
    base = WEBHOOK.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def modules_of(dotted: str) -> list[str]:
    """``dotted`` itself, or every module of the package it names."""
    base = WEBHOOK.joinpath(*dotted.split("."))
    if base.is_dir():
        return [
            ".".join(p.relative_to(WEBHOOK).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted(base.rglob("*.py"))
        ]
    return [dotted]


def imports_of(dotted: str) -> set[str]:
    path = module_file(dotted)
    assert path is not None, f"no module webhook.{dotted}"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module.startswith("webhook"):
                out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def closure(dotted: str) -> set[str]:
    seen: set[str] = set()
    todo = [dotted]
    while todo:
        for name in imports_of(todo.pop()):
            if name in seen:
                continue
            seen.add(name)
            local = name.removeprefix("webhook.")
            if name.startswith("webhook.") and module_file(local) is not None:
                todo.append(local)
    return seen


def forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


PURE_MODULES = sorted({m for p in PURE for m in modules_of(p)})


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_edge(module: str) -> None:
    bad = sorted(name for name in closure(module) if forbidden(name))
    assert not bad, f"webhook.{module} reaches {bad}"


def test_every_package_is_walked() -> None:
    assert {"inject.pod", "inject.workloads", "inject.patch"} <= set(PURE_MODULES)


def test_the_checker_would_notice() -> None:
    assert "argparse" in imports_of("cli.inject")
    assert "webhook.inject.pod" in closure("inject.workloads")
    assert any(forbidden(n) for n in closure("cli.serve"))
