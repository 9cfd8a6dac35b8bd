"""`sidemesh proxy` for real, in a network namespace: the CA over HTTPS, Envoy as uid 1337.

One pod-like namespace holds the agent and, started a moment later, ``sidemesh serve`` as its
CA on 127.0.0.1, so the agent first has to retry (and say why). Then: key and certificate on
disk with the right owner and mode, Envoy running as the proxy uid and ready on 15021, and the
agent exiting non-zero when Envoy dies (so that the kubelet restarts the container).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.jwks_issuer import Issuer
from tests.support.meshlab import SIDEMESH, envoy_pids
from tests.support.netns import Netns, NetnsLab

pytestmark = [pytest.mark.root, pytest.mark.envoy]


def _status(ns: Netns, url: str) -> int:
    def call() -> int:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    result: int = ns.in_namespace(call)
    return result


def test_agent_retries_until_the_ca_answers_then_supervises_envoy() -> None:
    require_root()
    require_tools("ip", "setpriv")
    binary = envoy_binary()
    with NetnsLab("smagt") as lab:
        ns = lab.namespace("pod")
        pki, certs, work, secrets = (lab.tmpdir(n) for n in ("pki", "certs", "work", "token"))
        subprocess.run([*SIDEMESH, "ca", "init", "--dir", str(pki)], check=True)
        subprocess.run([*SIDEMESH, "ca", "serving-cert", "--dir", str(pki), "--ip", "127.0.0.1"])
        issuer = Issuer.create()
        jwks = issuer.write_jwks(secrets / "jwks.json")
        (secrets / "token").write_text(issuer.token("shop", "cart", "cart-1"))
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "POD_NAME": "cart-1",
            "POD_NAMESPACE": "shop",
            "POD_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "cart",
            "SIDEMESH_CERT_TTL_SECONDS": "600",
        }
        flags = {
            "--ca-address": "https://127.0.0.1:18443",
            "--token-file": str(secrets / "token"),
            "--bundle-file": str(pki / "ca.crt"),
            "--cert-dir": str(certs),
            "--work-dir": str(work),
            "--log-level": "info",
            "--envoy-binary": binary,
        }
        agent = ns.spawn([*SIDEMESH, "proxy", *(x for kv in flags.items() for x in kv)], env=env)
        agent.expect("CA unreachable at https://127.0.0.1:18443", timeout=15)
        assert "BEGIN" not in agent.output()  # no key (or any PEM) in the logs
        serve = ["serve", "--host", "127.0.0.1", "--port", "18443", "--cert-dir", str(pki)]
        ns.spawn(
            [*SIDEMESH, *serve, "--log-level", "warning"],
            env={
                "PATH": env["PATH"],
                "SIDEMESH_JWKS_FILE": str(jwks),
                "SIDEMESH_JWKS_ISSUER": issuer.issuer_url,
            },
        )
        agent.expect("envoy started", timeout=30)
        deadline = time.monotonic() + 10
        while _status(ns, "http://127.0.0.1:15021/healthz/ready") != 200:
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.1)

        key = certs / "key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (key.stat().st_uid, key.stat().st_gid) == (1337, 1337)
        assert "BEGIN" not in agent.output()
        [envoy] = envoy_pids(ns)
        uids = Path(f"/proc/{envoy}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == ["1337"] * 4
        # Admin only on loopback; stats and health on every address of the pod.
        assert _status(ns, "http://127.0.0.1:15090/stats/prometheus") == 200
        assert _status(ns, "http://127.0.0.1:15021/nope") == 404

        os.kill(envoy, signal.SIGKILL)
        code = agent.popen.wait(timeout=10)
        assert code != 0
        assert "envoy exited" in agent.output()
