"""`sidemesh inject | uninject | check`, run as the real console script, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from webhook.cli.inject import PLACEHOLDER_BUNDLE

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "webhook" / "samples" / "demo-app.yaml"

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
spec:
  containers:
  - name: web
    image: nginx
    ports:
    - containerPort: 8080
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - port: 80
"""
BAD_POD = POD.replace("name: web\n  namespace", "name: bad\n  annotations:\n"
                      "    sidemesh.io/proxy-cpu: lots\n  namespace")  # fmt: skip


def run(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "root.pem"
    path.write_text(PLACEHOLDER_BUNDLE)
    return path


def docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_inject_from_stdin_keeps_documents_and_reports_each_workload(bundle: Path) -> None:
    p = run("inject", "-f", "-", "--bundle", str(bundle), stdin=POD + "---\n" + SERVICE)
    assert p.returncode == 0, p.stderr
    out = docs(p.stdout)
    assert [d["kind"] for d in out] == ["Pod", "Service"]
    assert out[1] == yaml.safe_load(SERVICE)
    names = [c["name"] for c in out[0]["spec"]["initContainers"]]
    assert names == ["sidemesh-init", "sidemesh-proxy"]
    assert out[0]["metadata"]["annotations"]["sidemesh.io/trust-bundle"] == bundle.read_text()
    assert "document 0 (line 1): Pod shop/web: injected (namespace-policy)" in p.stderr
    assert "document 1 (line 13): Service web: passed through (not-a-workload)" in p.stderr
    assert "PLACEHOLDER" not in p.stderr


def test_json_output_and_json_input(bundle: Path) -> None:
    p = run("inject", "-f", "-", "-o", "json", "--bundle", str(bundle), stdin=POD)
    assert p.returncode == 0, p.stderr
    pod = json.loads(p.stdout)
    again = run("inject", "-f", "-", "--bundle", str(bundle), stdin=p.stdout)
    assert again.returncode == 0
    assert json.loads(again.stdout) == pod, "JSON in gives JSON out, and nothing changes"
    assert "already-injected" in again.stderr


def test_patch_prints_what_the_webhook_would_return(bundle: Path) -> None:
    p = run("inject", "-f", "-", "--patch", "--bundle", str(bundle), stdin=POD)
    assert p.returncode == 0, p.stderr
    [entry] = json.loads(p.stdout)
    assert (entry["kind"], entry["name"], entry["template"]) == ("Pod", "web", "")
    assert entry["decision"] == {"inject": True, "reason": "namespace-policy"}
    injected = docs(run("inject", "-f", "-", "--bundle", str(bundle), stdin=POD).stdout)[0]
    assert jsonpatch.apply_patch(yaml.safe_load(POD), entry["patch"]) == injected


def test_diff_shows_only_additions_for_a_fresh_pod(bundle: Path) -> None:
    p = run("inject", "-f", "-", "--diff", "--bundle", str(bundle), stdin=POD)
    assert p.returncode == 0
    assert p.stdout.startswith("--- a/document-0\n+++ b/document-0\n")
    assert "+  - name: sidemesh-init\n" in p.stdout
    changed = [ln for ln in p.stdout.splitlines()[2:] if ln.startswith("-")]
    assert changed == [], "injection only adds to a pod without probes"


def test_an_error_prints_nothing_on_stdout_and_names_the_document(bundle: Path) -> None:
    p = run("inject", "-f", "-", "--bundle", str(bundle), stdin=POD + "---\n" + BAD_POD)
    assert p.returncode == 1
    assert p.stdout == ""
    assert (
        "error: document 1 (line 13): Pod/bad: annotation sidemesh.io/proxy-cpu='lots': "
        "'lots' is not a Kubernetes quantity"
    ) in p.stderr
    assert "Traceback" not in p.stderr


def test_keep_going_prints_the_good_documents_and_still_fails(bundle: Path) -> None:
    p = run(
        "inject", "-f", "-", "--keep-going", "--bundle", str(bundle),
        stdin=BAD_POD + "---\n" + POD,
    )  # fmt: skip
    assert p.returncode == 1
    assert [d["metadata"]["name"] for d in docs(p.stdout)] == ["web"]


def test_broken_yaml_names_the_document_and_line(bundle: Path) -> None:
    broken = POD + "---\nkind: Pod\nmetadata:\n  name: x\n bad: indent\n"
    p = run("inject", "-f", "-", "--bundle", str(bundle), stdin=broken)
    assert p.returncode == 1 and p.stdout == ""
    assert "document 1: invalid YAML at line 16" in p.stderr


def test_uninject_restores_the_input(bundle: Path) -> None:
    injected = run("inject", "-f", "-", "--bundle", str(bundle), stdin=POD).stdout
    p = run("uninject", "-f", "-", stdin=injected)
    assert p.returncode == 0, p.stderr
    assert docs(p.stdout) == [yaml.safe_load(POD)]
    assert "document 0 (line 1): Pod shop/web: uninjected\n" in p.stderr
    p = run("uninject", "-f", "-", stdin=POD)
    assert "skipped (not-injected)" in p.stderr


def test_check_reports_decisions_and_annotations_without_changing_anything() -> None:
    p = run("check", "-f", str(SAMPLE))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["DOC", "KIND", "NAMESPACE/NAME", "INJECT", "REASON", "SIDEMESH",
                                "ANNOTATIONS"]  # fmt: skip
    assert any("demo/node-agent" in ln and "opted-out" in ln for ln in lines)
    assert any("demo/backend" in ln and "sidemesh.io/inbound-mtls" in ln for ln in lines)
    p = run("check", "-f", "-", "-o", "json", stdin=BAD_POD)
    assert p.returncode == 1
    result = json.loads(p.stdout)
    assert result["workloads"] == [] and "proxy-cpu='lots'" in result["errors"][0]


def test_bundle_is_taken_from_certs_when_present_else_a_placeholder(tmp_path: Path) -> None:
    p = run("inject", "-f", "-", stdin=POD, cwd=tmp_path)
    assert p.returncode == 0
    assert "PLACEHOLDER trust bundle" in p.stderr
    pod = docs(p.stdout)[0]
    assert pod["metadata"]["annotations"]["sidemesh.io/trust-bundle"] == PLACEHOLDER_BUNDLE
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text(PLACEHOLDER_BUNDLE + PLACEHOLDER_BUNDLE)
    p = run("inject", "-f", "-", stdin=POD, cwd=tmp_path)
    assert "PLACEHOLDER" not in p.stderr
    bundle = docs(p.stdout)[0]["metadata"]["annotations"]["sidemesh.io/trust-bundle"]
    assert bundle == PLACEHOLDER_BUNDLE * 2
    key = tmp_path / "key.pem"
    key.write_text(
        PLACEHOLDER_BUNDLE + "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"
    )
    p = run("inject", "-f", "-", "--bundle", str(key), stdin=POD)
    assert p.returncode == 1 and p.stdout == "" and "holds a private key" in p.stderr


def test_config_errors_name_the_key(tmp_path: Path, bundle: Path) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text("proxy:\n  imagee: x\n")
    p = run("inject", "-f", "-", "--config", str(cfg), "--bundle", str(bundle), stdin=POD)
    assert p.returncode == 1 and p.stdout == ""
    assert "unknown config key 'proxy.imagee'" in p.stderr


def test_unknown_sidemesh_annotations_are_warned_about(bundle: Path) -> None:
    typo = POD.replace("  namespace: shop\n", "  namespace: shop\n  annotations:\n"
                       "    sidemesh.io/proxy-cpus: '2'\n")  # fmt: skip
    p = run("inject", "-f", "-", "--bundle", str(bundle), stdin=typo)
    assert p.returncode == 0
    assert (
        "warning: document 0 (line 1): Pod shop/web: "
        "annotation sidemesh.io/proxy-cpus (unknown, ignored)"
    ) in p.stderr


def test_namespace_flag_applies_to_objects_without_one(bundle: Path) -> None:
    pod = POD.replace("  namespace: shop\n", "")
    p = run("inject", "-f", "-", "-n", "kube-system", "--bundle", str(bundle), stdin=pod)
    assert "Pod kube-system/web: skipped (ignored-namespace)" in p.stderr
    assert docs(p.stdout) == [yaml.safe_load(pod)]


def test_missing_file_is_a_clear_error() -> None:
    p = run("inject", "-f", "/nonexistent/app.yaml")
    assert p.returncode == 1
    assert "cannot read /nonexistent/app.yaml: No such file or directory" in p.stderr


def test_the_bundled_sample_injects_cleanly(bundle: Path) -> None:
    p = run("inject", "-f", str(SAMPLE), "--bundle", str(bundle))
    assert p.returncode == 0, p.stderr
    assert "sidemesh: 3 injected, 1 skipped, 3 passed through, 0 error(s)" in p.stderr


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not a certificate at all\n", "holds no PEM certificate"),
        (PLACEHOLDER_BUNDLE + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
         "private key"),
        (PLACEHOLDER_BUNDLE + "-----BEGIN CERTIFICATE-----\nMIIB\n", "besides complete PEM"),
        ("-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n",
         "holds no PEM certificate"),
        (PLACEHOLDER_BUNDLE + "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
         "besides complete PEM"),
    ],
    ids=["text", "private-key", "cut-off", "not-der", "other-block"],
)  # fmt: skip
def test_a_bundle_that_is_not_only_certificates_is_refused(
    tmp_path: Path, content: str, why: str
) -> None:
    path = tmp_path / "bundle.pem"
    path.write_text(content)
    p = run("inject", "-f", "-", "--bundle", str(path), stdin=POD)
    assert p.returncode != 0 and p.stdout == ""
    assert why in p.stderr and str(path) in p.stderr


def test_a_bundle_is_re_encoded_so_only_certificates_reach_the_pods(tmp_path: Path) -> None:
    path = tmp_path / "bundle.pem"
    path.write_text("subject=CN = root\n" + PLACEHOLDER_BUNDLE + "\ntrailing words\n")
    p = run("inject", "-f", "-", "--bundle", str(path), stdin=POD)
    assert p.returncode == 0, p.stderr
    annotation = docs(p.stdout)[0]["metadata"]["annotations"]["sidemesh.io/trust-bundle"]
    assert annotation == PLACEHOLDER_BUNDLE


def test_a_reader_that_went_away_ends_the_pipe_quietly(bundle: Path) -> None:
    """``sidemesh inject -f app.yaml | true``: exit 141 (SIGPIPE, as a shell reports it), and no
    traceback on the terminal."""
    inject = subprocess.Popen(
        [sys.executable, "-m", "webhook", "inject", "-f", str(SAMPLE), "--bundle", str(bundle)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert inject.stdout is not None and inject.stderr is not None
    inject.stdout.close()  # the reader is gone before the first byte is written
    err = inject.stderr.read().decode()
    assert inject.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
