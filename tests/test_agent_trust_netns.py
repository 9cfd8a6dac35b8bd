"""`sidemesh proxy` as a process against the misbehaving CA, in a network namespace.

* SIGTERM while the CA trickles its answer: the agent is gone within a second (it used to hang
  for the whole answer, ignoring the signal).
* The certificate expires while the CA is down: Envoy keeps running, readiness (15021) turns
  503, ``sidemesh_agent_certificate_expired`` is 1 and the log says why; the CA is asked at the
  backoff's pace, not in a loop; once it answers again, the pod is ready again.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import SIDEMESH, envoy_pids
from tests.support.netns import Netns, NetnsLab, Proc

pytestmark = [pytest.mark.root, pytest.mark.envoy]

REPO = Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}


def _get(ns: Netns, url: str) -> tuple[int, str]:
    def call() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    result: tuple[int, str] = ns.in_namespace(call)
    return result


def _start(lab: NetnsLab, ns: Netns, mode: str, ttl: int) -> tuple[Proc, Proc, Path]:
    """The evil CA (its own process), then the agent pointed at it."""
    cadir, certs, work, secrets = (lab.tmpdir(n) for n in ("ca", "certs", "work", "token"))
    ca = ns.spawn([sys.executable, "-m", "tests.support.evil_ca", str(cadir), mode], env=ENV)
    port = ca.expect("listening", timeout=30).split()[1]
    (secrets / "token").write_text("token-of-cart-1")
    env = {
        **ENV,
        "POD_NAME": "cart-1",
        "POD_NAMESPACE": "shop",
        "POD_IP": "127.0.0.1",
        "SERVICE_ACCOUNT": "cart",
        "SIDEMESH_CERT_TTL_SECONDS": str(ttl),
    }
    flags = {
        "--ca-address": f"https://127.0.0.1:{port}",
        "--token-file": str(secrets / "token"),
        "--bundle-file": str(cadir / "ca.crt"),
        "--cert-dir": str(certs),
        "--work-dir": str(work),
        "--log-level": "info",
        "--envoy-binary": envoy_binary(),
        "--ca-timeout": "3",
        "--retry-max-seconds": "1",
        "--drain-seconds": "1",
    }
    agent = ns.spawn([*SIDEMESH, "proxy", *(x for kv in flags.items() for x in kv)], env=env)
    return ca, agent, cadir


def test_sigterm_ends_the_agent_while_the_ca_trickles() -> None:
    require_root()
    require_tools("ip", "setpriv")
    with NetnsLab("smtrm") as lab:
        ns = lab.namespace("pod")
        ca, agent, _ = _start(lab, ns, "trickle", 600)
        ca.expect("request trickle", timeout=30)
        time.sleep(0.3)  # well inside the answer
        t0 = time.monotonic()
        agent.signal(15)
        code = agent.popen.wait(timeout=10)
        took = time.monotonic() - t0
        assert code == 0, agent.output()
        assert took < 1.0, f"SIGTERM took {took:.2f}s"
        assert not envoy_pids(ns)


def test_expired_certificate_with_the_ca_down_turns_readiness_false() -> None:
    require_root()
    require_tools("ip", "setpriv")
    with NetnsLab("smexp") as lab:
        ns = lab.namespace("pod")
        ca, agent, cadir = _start(lab, ns, "good", 8)
        agent.expect("envoy started", timeout=30)
        _wait_for(ns, "http://127.0.0.1:15021/healthz/ready", 200, agent)
        (cadir / "mode").write_text("reset")  # the CA goes away before the renewal
        switched = time.monotonic()
        agent.expect("certificate expired at", timeout=30)
        _wait_for(ns, "http://127.0.0.1:15021/healthz/ready", 503, agent)
        metrics = _get(ns, "http://127.0.0.1:15020/metrics")[1]
        assert "sidemesh_agent_certificate_expired 1" in metrics, metrics
        assert envoy_pids(ns), "Envoy must keep running (open connections stay open)"
        # Renewal attempts while the CA was down: at the backoff's pace (cap 1 s), not a loop.
        outage = time.monotonic() - switched
        attempts = ca.output().count("request reset")
        assert 2 <= attempts <= 2 + 2 * outage, (attempts, outage)
        (cadir / "mode").write_text("good")
        agent.expect("readiness restored", timeout=15)
        _wait_for(ns, "http://127.0.0.1:15021/healthz/ready", 200, agent)
        assert (
            "sidemesh_agent_certificate_expired 0" in _get(ns, "http://127.0.0.1:15020/metrics")[1]
        )
        assert "BEGIN" not in agent.output()  # no key or certificate in the logs
        agent.signal(15)
        assert agent.popen.wait(timeout=10) == 0


def _wait_for(ns: Netns, url: str, status: int, agent: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _get(ns, url)[0] != status:
        assert time.monotonic() < deadline, f"{url} never answered {status}:\n{agent.output()}"
        time.sleep(0.1)
