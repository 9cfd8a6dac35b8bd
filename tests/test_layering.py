"""Purity is a property of packages: the pure core imports nothing from the edges (no server,
CA, CLI, web framework, clock, randomness, sockets or subprocesses) — checked on the import
statements of every module in each pure package, transitively within webhook/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

WEBHOOK = Path(__file__).resolve().parent.parent / "webhook"

#: Pure packages and modules, as dotted names under ``webhook``. A package means every module
#: in it, including ones added later.
PURE = (
    "inject",
    "admission.review",
    "admission.wire",
    "dataplane.capture",
    "dataplane.bootstrap",
    "dataplane.parts",
    "dataplane.listeners",
    "cni.spec",
    "cni.conflist",
    "dataplane.ads_bootstrap",
    "discovery.model",
    "discovery.objects",
    "discovery.build",
    "discovery.compiler",
    "discovery.clusters",
    "discovery.listeners",
    "discovery.l7",
    "discovery.learn",
    "discovery.scope",
    "discovery.tables",
    "discovery.resources",
    "discovery.slim",
    "discovery.backoff",
    "discovery.protos",
    "routing.api",
    "routing.routes",
    "routing.matches",
    "routing.policy",
    "routing.table",
    "routing.refs",
    "routing.subsets",
    "routing.envoy",
    "routing.explain",
    "policy.model",
    "policy.compiler",
    "policy.gate",
    "policy.status",
    "policy.envoy",
    "policy.evaluate",
    "policy.report",
    "routing.xds",
    "routing.status",
    "routing.rewrite",
    "telemetry",
    "ratelimit.model",
    "ratelimit.compiler",
    "ratelimit.window",
    "ratelimit.table",
    "manifests",
    "config",
    "config_rules",
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


# --- no hidden state in pure modules ---------------------------------------------------------

#: The one documented home of remembered results in the pure core (bounded, identity-checked).
MEMO = "inject.memo"
_EMPTY_CONTAINERS = ("dict", "list", "set")


def _is_empty_container(value: ast.expr | None) -> bool:
    if isinstance(value, ast.Dict):
        return not value.keys
    if isinstance(value, ast.List | ast.Set):
        return not value.elts
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id in _EMPTY_CONTAINERS
        and not value.args
    )


def state_of(source: str) -> list[str]:
    """What in a module's source keeps state between calls: ``id()`` keys, ``global``
    rebinding, module-level empty containers (caches, registries), unbounded ``functools``
    caches. A ``lru_cache`` with a ``maxsize`` is bounded and keyed by value: allowed."""
    tree = ast.parse(source)
    found = []
    for stmt in tree.body:
        value = stmt.value if isinstance(stmt, ast.Assign | ast.AnnAssign) else None
        if _is_empty_container(value):
            found.append(f"line {stmt.lineno}: a module-level empty container")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "id"
        ):
            found.append(f"line {node.lineno}: id() as a key")
        elif isinstance(node, ast.FunctionDef):
            for deco in map(ast.unparse, node.decorator_list):
                if deco.endswith(("cache", "lru_cache")) or "maxsize=None" in deco:
                    found.append(f"line {node.lineno}: unbounded @{deco}")
    return found


@pytest.mark.parametrize("module", [m for m in PURE_MODULES if m != MEMO])
def test_pure_modules_keep_no_state(module: str) -> None:
    path = module_file(module)
    assert path is not None
    found = state_of(path.read_text(encoding="utf-8"))
    assert not found, f"webhook.{module} keeps state (use webhook.{MEMO}): {found}"


def test_the_state_checker_would_notice() -> None:
    assert state_of("_C: dict[int, int] = {}\n")
    assert state_of("_C = dict()\n")
    assert state_of("def f(x):\n    return _C.get(id(x))\n")
    assert state_of("import functools\n@functools.cache\ndef f(x):\n    return x\n")
    assert state_of("def f():\n    global _N\n    _N = 1\n")
    assert not state_of(
        "import functools\n@functools.lru_cache(maxsize=8)\ndef f(x):\n    return x\n"
    )
    assert not state_of("_T = {'a': 1}\n_L = [1]\n")
    memo = module_file(MEMO)
    assert memo is not None and state_of(memo.read_text(encoding="utf-8"))


# A module that says it is pure must be checked as one.
_CLAIMS = re.compile(r"\bPure[.:]|^[^\n]*\(pure[,:)]|^[^\n]*a pure function|\bIt is pure\b")


def test_every_module_that_says_pure_is_checked() -> None:
    claiming = []
    for path in sorted(WEBHOOK.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if _CLAIMS.search(doc):
            claiming.append(".".join(path.relative_to(WEBHOOK).with_suffix("").parts))
    assert "inject.pod" in claiming and "dataplane.capture" in claiming
    unchecked = sorted(set(claiming) - set(PURE_MODULES))
    assert not unchecked, f"say 'Pure' only of modules listed in PURE: {unchecked}"


def _imports_of_test_modules(source: str) -> list[str]:
    """The test modules (``tests.test_*``, ``tests.e2e.*``) a module's source imports."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        out += [n for n in names if re.match(r"tests\.(test_|e2e\b)", n)]
    return out


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in ``tests/support``: a test module importing another runs that
    module's tests' fixtures and state twice, and couples two suites."""
    tests = Path(__file__).resolve().parent
    offenders = {
        str(path.relative_to(tests)): found
        for path in sorted(tests.rglob("*.py"))
        if (found := _imports_of_test_modules(path.read_text()))
    }
    assert offenders == {}
    # … and the check would notice one.
    assert _imports_of_test_modules("from tests.test_routing import x") == ["tests.test_routing"]
