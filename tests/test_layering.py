"""The pure core imports nothing from the edges: no server, CA, CLI, web framework, clock or
randomness — checked on the modules' import statements, transitively within webhook/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WEBHOOK = Path(__file__).resolve().parent.parent / "webhook"
PURE = (
    "annotations",
    "policy",
    "inject",
    "containers",
    "probes",
    "patch",
    "workloads",
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
    "cryptography",
    "kubernetes",
    "webhook.server",
    "webhook.admission",
    "webhook.ca",
    "webhook.ca_api",
    "webhook.identity",
    "webhook.cli",
    "webhook.agent",
}


def imports_of(module: str) -> set[str]:
    tree = ast.parse((WEBHOOK / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "webhook":
                out |= {f"webhook.{alias.name}" for alias in node.names}
    return out


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in imports_of(current):
            if name in seen:
                continue
            seen.add(name)
            local = name.removeprefix("webhook.")
            if name.startswith("webhook.") and (WEBHOOK / f"{local}.py").exists():
                todo.append(local)
    return seen


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_edge(module: str) -> None:
    bad = {
        name
        for name in closure(module)
        if name in FORBIDDEN or name.split(".")[0] in FORBIDDEN or name.startswith("webhook.cli")
    }
    assert not bad, f"webhook/{module}.py reaches {sorted(bad)}"


def test_the_checker_would_notice() -> None:
    assert "argparse" in imports_of("cli_inject")
    assert "webhook.inject" in closure("workloads")
