"""`sidemesh authz-check` offline: a directory of manifests, the compiled RBAC, one decision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from webhook.cli.main import main

CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"
OTHER = "spiffe://cluster.local/ns/shop/sa/batch"


def _pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"serviceAccountName": name, "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9"},
    }


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    objs = [
        _pod("cart", {"app": "cart"}),
        _policy(
            "allow-frontend",
            {
                "selector": {"matchLabels": {"app": "cart"}},
                "rules": [{"from": [{"serviceAccount": "frontend"}], "to": {"ports": [8080]}}],
            },
        ),
        _policy(
            "no-admin",
            {"action": "DENY", "rules": [{"to": {"paths": ["/admin*"], "methods": ["POST"]}}]},
        ),
        _policy("watch-batch", {"action": "AUDIT", "rules": [{"from": [{"principal": OTHER}]}]}),
        _policy("broken", {"action": "MAYBE"}),
    ]
    (tmp_path / "mesh.yaml").write_text("\n---\n".join(json.dumps(o) for o in objs))
    return tmp_path


def run(mesh: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["authz-check", "--mesh-dir", str(mesh), "--to", "shop/cart", *args])
    return code, capsys.readouterr().out


def test_the_listed_caller_is_allowed_by_the_named_policy(
    mesh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(mesh, capsys, "--from", CLIENT, "--port", "8080", "--path", "/items")
    assert code == 0
    assert "ALLOW  allowed by ALLOW policy shop/allow-frontend" in out
    # The broken policy is reported, not silently dropped.
    assert "not enforced: AccessPolicy shop/broken: spec.action must be one of" in out


def test_another_caller_is_denied_and_audited(
    mesh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(mesh, capsys, "--from", OTHER, "--port", "8080", "--path", "/")
    assert code == 3
    assert "DENY  denied: ALLOW policies select this workload and none matched" in out
    assert "audited by AUDIT policy shop/watch-batch" in out


def test_deny_beats_allow(mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--from", CLIENT, "--port", "8080", "--path", "/admin/x")
    code, out = run(mesh, capsys, *args, "--method", "POST")
    assert code == 3 and "denied by DENY policy shop/no-admin" in out
    assert run(mesh, capsys, *args, "--method", "GET")[0] == 0


def test_plaintext_and_other_ports(mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(mesh, capsys, "--from", "plaintext", "--port", "8080", "--path", "/")[0] == 3
    assert run(mesh, capsys, "--from", CLIENT, "--port", "9090", "--path", "/")[0] == 3


def test_a_tcp_connection_meets_the_http_deny_rule_without_its_http_fields(
    mesh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(mesh, capsys, "--from", CLIENT, "--port", "8080")  # no --path: TCP
    assert code == 3 and "shop/no-admin" in out


def test_unknown_pod_is_an_error_naming_it(mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["authz-check", "--mesh-dir", str(mesh), "--to", "shop/nope", "--from", CLIENT,
                 "--port", "1"])  # fmt: skip
    assert code == 1
    assert "no pod 'shop/nope'" in capsys.readouterr().err


def test_check_explains_policies_and_names_what_does_not_resolve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = Path(__file__).parent / "testdata" / "policy-check.yaml"
    code = main(["check", "-f", str(path)])
    out = capsys.readouterr().out
    assert code == 1  # the broken policy
    assert "ALLOW in namespace shop, labels {'app': 'cart'}: selects shop/cart-1" in out
    assert "on TCP connections this rule admits nothing" in out
    assert "warning: spec.rules[0].from[0].serviceAccount: no pod runs as shop/frontend" in out
    assert "error: spec.rules[0].to.methods: not enforced:" in out
    assert "shop/cart-limit#1: 100/minute per caller (shared by every replica)" in out
