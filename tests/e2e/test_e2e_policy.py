"""Access policy and rate limits end to end: real Envoys programmed over ADS decide who may
call whom, and how often.

    node 10.200.0.1 ── cp       sidemesh serve (webhook + CA), sidemesh discovery (:15012),
                     │          sidemesh ratelimit (:8081) and its redis-server (127.0.0.1)
                     ├─ client  meshed (sa client)      ├─ other  meshed (sa other)
                     ├─ web-1/2/3 meshed, PERMISSIVE, app=web: HTTP on 8080, echo on 9000;
                     │          the Service ``web`` (10.96.0.20:80) in front of them
                     └─ legacy  no sidecar: a plaintext caller

Policies are files in the directory the control plane watches; each test writes its own and
removes them, and waits until the web sidecars ACKed the filter configs it expects.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import envoy_binary, require_root, require_tools
from tests.support.meshlab import (
    APP_UID,
    MESHAPP,
    PYTHON,
    SIDEMESH,
    admit,
    checked_lab,
    debug_json,
    start_control_plane,
    start_discovery,
    stats,
    write_manifest,
)
from tests.support.netns import NetnsLab, Pod
from tests.support.podrunner import PodRunner
from tests.support.programs import PROGRAMS
from tests.support.redis_server import redis_argv
from webhook.dataplane.bootstrap import TCP_CONNECT_ATTEMPTS

pytestmark = [pytest.mark.root, pytest.mark.envoy, pytest.mark.e2e]

AUTHZAPP = str(PROGRAMS / "authzapp.py")
WEB_VIP = "10.96.0.20"
GREET_VIP = "10.96.0.21"
MESHED = ("client", "other", "web-1", "web-2", "web-3")


def _manifest(name: str, sa: str, ports: list[int]) -> dict[str, Any]:
    # web-3 is STRICT: its declared server-first port is mTLS (on a PERMISSIVE pod such a
    # port must take plaintext callers, who send nothing a TLS inspector could wait for).
    strict = {"sidemesh.io/inbound-mtls": "STRICT"} if name == "web-3" else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"app": name.split("-")[0]},
            "annotations": strict,
        },
        "spec": {
            "serviceAccountName": sa,
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [
                {
                    "name": "app",
                    "image": "example.com/app:1",
                    "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
                }
            ],
        },
    }


def _service(name: str, ip: str, port: int, target: int, app_protocol: str = "http") -> Any:
    spec_port = {"name": app_protocol, "port": port, "targetPort": target, "protocol": "TCP",
                 "appProtocol": app_protocol}  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [spec_port]},
    }


def _slice(service: str, port: int, pods: list[tuple[str, str]], name: str = "http") -> Any:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "namespace": "demo",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": name, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": "demo", "name": name},
            }
            for name, ip in pods
        ],
    }


def policy(
    name: str, spec: dict[str, Any], namespace: str = "demo", kind: str = "AccessPolicy"
) -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


WEB = {"matchLabels": {"app": "web"}}


class Lab:
    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.node = lab.node()
        self.cp = self.node.add_pod("cp")
        # Callers need a default route to dial a ClusterIP (only their sidecar knows it).
        self.pods: dict[str, Pod] = {
            n: self.node.add_pod(n, default_route=n in ("client", "other"))
            for n in (*MESHED, "legacy")
        }
        self.mesh_dir = lab.tmpdir("mesh")
        self.runners: dict[str, PodRunner] = {}

    def ip(self, name: str) -> str:
        return self.pods[name].ip

    def write(self, name: str, obj: Any) -> None:
        write_manifest(self.mesh_dir, name, obj)

    def start_redis(self) -> None:
        """redis-server in the cp namespace, on 127.0.0.1:6379 there (only the service uses it)."""
        argv = redis_argv(6379, self.lab.tmpdir("redis", 0o777))
        self.redis = self.cp.ns.spawn(argv, uid=APP_UID, gid=APP_UID)
        self.cp.ns.wait_port(6379)

    def remove(self, *names: str) -> None:
        for name in names:
            (self.mesh_dir / f"{name}.json").unlink(missing_ok=True)

    def debug(self, path: str) -> Any:
        return debug_json(self.cp, path)

    def enforced(self, pod: str) -> set[str]:
        """The policy names in the filter configs the pod's sidecar was sent (RBAC policies,
        rate limits)."""
        config = self.debug(f"/debug/config?pod=demo/{pod}")
        out: set[str] = set()
        for ext in config.get("extensions", []):
            typed = ext["typed_config"]
            for key in ("rules", "shadow_rules"):
                out.update((typed.get(key) or {}).get("policies", {}))
            for limit in typed.get("rate_limits", []):
                key = limit["actions"][0]["generic_key"]
                out.add(f"{ext['name'].rsplit('.', 1)[-1]}:{key['descriptor_value']}")
        return out

    def service_limits(self) -> set[str]:
        """The Global limits the rate-limit service enforces now (from its /metrics)."""

        def scrape() -> str:
            with urllib.request.urlopen("http://127.0.0.1:15016/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        lines = self.cp.ns.in_namespace(scrape).splitlines()
        prefix = 'sidemesh_ratelimit_limit{limit="'
        return {
            "global:" + ln[len(prefix) :].split('"')[0] for ln in lines if ln.startswith(prefix)
        }

    def converge(self, expected: dict[str, set[str]], timeout: float = 15) -> None:
        """Wait until each pod's sidecar was sent ``expected``, every proxy ACKed and the
        rate-limit service knows the Global limits among them."""
        deadline = time.monotonic() + timeout
        while True:
            got = {pod: self.enforced(pod) for pod in expected}
            proxies = self.debug("/debug/proxies")["proxies"]
            nacks = [p["types"].get("extensions", {}).get("last_nack") for p in proxies]
            assert not any(nacks), nacks
            wanted = {x for names in expected.values() for x in names if x.startswith("global:")}
            if (
                got == expected
                and all(p["synced"] for p in proxies)
                and wanted <= self.service_limits()
            ):
                return
            assert time.monotonic() < deadline, f"never converged: {got} != {expected}"
            time.sleep(0.1)

    def call(self, caller: str, *args: str) -> dict[str, Any]:
        done = self.pods[caller].ns.run(
            [PYTHON, AUTHZAPP, *args], uid=APP_UID, gid=APP_UID, timeout=30
        )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def http(self, caller: str, path: str = "/", to: str = "web-1", *more: str) -> dict[str, Any]:
        return self.call(caller, "http", self.ip(to), "8080", path, *more)

    def predicted(self, caller: str, path: str | None = "/", to: str = "web-1") -> str:
        """``sidemesh authz-check`` against the control plane: what ``to``'s sidecar was sent
        decides, evaluated offline ("ALLOW …" or "DENY …")."""
        sa = "cluster.local/ns/demo/sa/" + caller
        argv = [*SIDEMESH, "authz-check", "--url", "http://127.0.0.1:15014", "--to",
                f"demo/{to}", "--port", "8080" if path else "9000",
                "--from", "plaintext" if caller == "legacy" else f"spiffe://{sa}"]  # fmt: skip
        done = self.cp.ns.run([*argv, *(["--path", path] if path else [])], check=False)
        assert done.returncode in (0, 3), done.stderr
        return done.stdout.strip()

    def sidecar_log(self, pod: str) -> list[str]:
        return "\n".join(p.output() for p in self.runners[pod].procs.values()).splitlines()

    def wait_logged(self, pod: str, start: str) -> str:
        """The first line of ``pod``'s output starting with ``start`` (Envoy writes its stdout
        logs out every 10 s by default, so this waits up to 15)."""
        deadline = time.monotonic() + 15
        while True:
            found = [line for line in self.sidecar_log(pod) if line.startswith(start)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"{pod} never logged {start!r}"
            time.sleep(0.2)

    def greeting(self, caller: str, host: str = GREET_VIP) -> dict[str, Any]:
        """Connect to the server-first port and wait for it to speak: what arrived."""
        done = self.pods[caller].ns.run(
            [PYTHON, MESHAPP, "banner", host, "9000"], uid=APP_UID, gid=APP_UID, timeout=30
        )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def tcp(self, caller: str, to: str = "web-1") -> bool:
        return bool(self.call(caller, "tcp", self.ip(to), "9000")["echoed"])


def _start(lab: NetnsLab) -> Lab:
    m = Lab(lab)
    plane = start_control_plane(lab, m.node, m.cp, discovery_address=f"{m.cp.ip}:15012")
    pki, issuer, cp_url = plane.pki, plane.issuer, plane.url

    admitted: dict[str, dict[str, Any]] = {}
    for name in MESHED:
        sa = name.split("-")[0]
        pod = admit(m.node.ns, cp_url, pki / "ca.crt", _manifest(name, sa, [8080, 9000]))
        admitted[name] = pod
        record = copy.deepcopy(pod)
        record["status"] = {"phase": "Running", "podIP": m.ip(name), "podIPs": [{"ip": m.ip(name)}]}
        m.write(f"pod-{name}", record)
    m.write("ns", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}})
    webs = [(n, m.ip(n)) for n in ("web-1", "web-2", "web-3")]
    m.write("svc-web", _service("web", WEB_VIP, 80, 8080))
    m.write("slice-web", _slice("web", 8080, webs))
    # web-3's echo port as a declared TCP Service: a server-first protocol (a greeting on
    # connect), so no sidecar waits to sniff the client's first bytes.
    m.write("svc-greet", _service("greet", GREET_VIP, 9000, 9000, "tcp"))
    m.write("slice-greet", _slice("greet", 9000, [("web-3", m.ip("web-3"))], "tcp"))
    m.start_redis()
    # mTLS with a certificate of sidemesh-ratelimit issued from the CA; the limits it reads
    # from the same directory as discovery.
    m.cp.ns.spawn(
        [*SIDEMESH, "ratelimit", "--listen", "0.0.0.0:8081", "--redis", "redis://127.0.0.1:6379/0",
         "--cert-dir", str(pki), "--mesh-dir", str(m.mesh_dir), "--poll-interval", "0.2",
         "--log-level", "warning"], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )  # fmt: skip
    m.cp.ns.wait_port(8081)
    start_discovery(m.cp, pki, m.mesh_dir, "--ratelimit-address", f"{m.cp.ip}:8081")
    for name in MESHED:
        runner = PodRunner(
            lab=lab,
            node=m.node,
            pod_net=m.pods[name],
            pod=admitted[name],
            app_commands={"app": [PYTHON, MESHAPP, "serve", "8080"]},
            sidemesh=SIDEMESH,
            token_for=issuer.token,
        )
        runner.start()
        runner.procs["app"].expect("listening")
        m.pods[name].ns.spawn(
            [PYTHON, MESHAPP, "serve-banner", "9000"], uid=APP_UID, gid=APP_UID,
            env={"POD_NAME": name},
        ).expect("listening")  # fmt: skip
        m.runners[name] = runner
    m.converge({"web-1": set()})
    return m


@pytest.fixture(scope="module")
def mesh() -> Iterator[Lab]:
    require_root()
    require_tools("ip", "iptables-restore")
    envoy_binary()
    with checked_lab("smpol") as lab:
        yield _start(lab)


@pytest.fixture
def clean(mesh: Lab) -> Iterator[Lab]:
    """Every test starts and ends without policies."""
    yield mesh
    mesh.remove(*(p.stem for p in mesh.mesh_dir.glob("policy-*.json")))
    mesh.converge({"web-1": set(), "other": set()})


ALLOW_CLIENT = policy(
    "allow-client",
    {"selector": WEB, "action": "ALLOW", "rules": [{"from": [{"serviceAccount": "client"}]}]},
)


def test_allow_admits_exactly_the_listed_identity(clean: Lab) -> None:
    m = clean
    assert m.http("other")["status"] == 200  # no policy: anyone
    m.write("policy-allow", ALLOW_CLIENT)
    m.converge({"web-1": {"demo/allow-client"}})
    assert m.http("client")["status"] == 200
    denied = m.http("other")
    assert denied["status"] == 403
    assert "rbac_access_denied_matched_policy[none]" in denied["body"]
    assert m.http("legacy")["status"] == 403  # plaintext: no identity at all
    assert m.tcp("client") and not m.tcp("other")  # network RBAC on the TCP chain
    assert not m.tcp("legacy")
    tcp_denied = "sidemesh-authz denied tcp spiffe://cluster.local/ns/demo/sa/other port=9000 "
    m.wait_logged("web-1", tcp_denied)
    report = m.debug("/debug/policies")["access"]
    assert report == [{"policy": "demo/allow-client", "action": "ALLOW", "unresolved": [],
                       "selects": ["demo/web-1", "demo/web-2", "demo/web-3"]}]  # fmt: skip
    # The offline evaluator of what the sidecar was sent agrees with the sidecar.
    assert m.predicted("client").startswith("ALLOW  allowed by ALLOW policy demo/allow-client")
    assert m.predicted("other").startswith("DENY")
    assert m.predicted("legacy", None).startswith("DENY")
    counters = stats(
        m.pods["web-1"].ns,
        "http.inbound_mtls_http.rbac.allow.denied",
        "http.inbound_mtls_http.rbac.allow.policy.demo/allow-client.allowed",
    )
    assert counters["http.inbound_mtls_http.rbac.allow.denied"] >= 1
    assert counters["http.inbound_mtls_http.rbac.allow.policy.demo/allow-client.allowed"] >= 1


def test_deny_beats_allow_and_the_body_names_the_policy(clean: Lab) -> None:
    m = clean
    m.write("policy-allow", ALLOW_CLIENT)
    deny = {"selector": WEB, "action": "DENY",
            "rules": [{"from": [{"namespace": "demo"}], "to": {"paths": ["/admin*"]}}]}  # fmt: skip
    m.write("policy-deny", policy("no-admin", deny))
    m.converge({"web-1": {"demo/allow-client", "demo/no-admin"}})
    assert m.http("client", "/shop")["status"] == 200
    denied = m.http("client", "/admin/users")
    assert denied["status"] == 403
    assert "rbac_access_denied_matched_policy[demo/no-admin]" in denied["body"]
    assert m.predicted("client", "/admin/users") == "DENY  denied by DENY policy demo/no-admin"
    # The server's sidecar logged the denial: caller, request, the deciding policy.
    line = m.wait_logged(
        "web-1",
        "sidemesh-authz denied http spiffe://cluster.local/ns/demo/sa/client GET /admin/users",
    )
    assert line.endswith("port=8080 rbac_access_denied_matched_policy[demo/no-admin]")
    # On TCP a DENY rule keeps its sources and drops the HTTP fields: it denies more, not less.
    assert not m.tcp("client")


def test_namespace_default_deny_holds_for_every_workload(clean: Lab) -> None:
    m = clean
    m.write("policy-default", policy("default-deny", {"action": "ALLOW"}))
    m.write("policy-allow", ALLOW_CLIENT)
    m.converge({"web-1": {"demo/allow-client"}, "other": set()})
    # "other" is selected by the namespace-wide ALLOW-nothing policy: its RBAC has no rules.
    assert m.http("client", "/", "other")["status"] == 403
    assert m.http("other", "/", "web-2")["status"] == 403
    assert m.http("client", "/", "web-2")["status"] == 200
    assert not m.tcp("client", "other")


def test_plaintext_caller_matches_only_unauthenticated(clean: Lab) -> None:
    m = clean
    rule = {"from": [{"unauthenticated": True}], "to": {"paths": ["/public*"]}}
    public = {"selector": WEB, "action": "ALLOW", "rules": [rule]}
    m.write("policy-public", policy("public", public))
    m.converge({"web-1": {"demo/public"}})
    assert m.http("legacy", "/public/x")["status"] == 200
    assert m.http("legacy", "/private")["status"] == 403
    # A meshed caller is authenticated: "unauthenticated" does not match it.
    assert m.http("client", "/public/x")["status"] == 403
    # A forged identity header changes nothing: the principal is the verified certificate.
    forged = "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/demo/sa/client"
    assert m.http("legacy", "/private", "web-1", "GET", forged)["status"] == 403


def test_audit_denies_nothing_but_counts(clean: Lab) -> None:
    m = clean
    audit = {"selector": WEB, "action": "AUDIT", "rules": [{"from": [{"serviceAccount": "other"}]}]}
    m.write("policy-audit", policy("watch-other", audit))
    m.converge({"web-1": {"demo/watch-other"}})
    name = "http.inbound_mtls_http.rbac.audit.shadow_denied"
    before = stats(m.pods["web-1"].ns, name)[name]
    for _ in range(3):
        assert m.http("other")["status"] == 200
    assert m.http("client")["status"] == 200
    assert stats(m.pods["web-1"].ns, name)[name] == before + 3
    line = m.wait_logged(
        "web-1", "sidemesh-authz audit http spiffe://cluster.local/ns/demo/sa/other"
    )
    assert line.endswith("port=8080 demo/watch-other")


def test_policy_changes_fail_no_request_of_an_unaffected_caller(clean: Lab) -> None:
    m = clean
    loop = m.pods["client"].ns.spawn(
        [PYTHON, AUTHZAPP, "loop", m.ip("web-1"), "8080", "5"], uid=APP_UID, gid=APP_UID
    )
    time.sleep(0.5)
    deny_other = {
        "selector": WEB,
        "action": "DENY",
        "rules": [{"from": [{"serviceAccount": "other"}]}],
    }
    for round_ in range(3):
        m.write("policy-deny", policy(f"deny-other-{round_}", deny_other))
        m.converge({"web-1": {f"demo/deny-other-{round_}"}})
        assert m.http("other")["status"] == 403
        m.remove("policy-deny")
        m.converge({"web-1": set()})
    summary = json.loads(loop.expect('"ok"', timeout=20).strip().splitlines()[-1])
    print("loop:", summary)
    assert summary["failures"] == [] and summary["ok"] > 50
    # One connection all along: a policy change drains nothing (the listener never changed).
    assert summary["connections"] == 1


def test_a_denied_caller_of_a_server_first_port_gets_no_greeting(clean: Lab) -> None:
    """The TCP gate decides when the caller's handshake completes, before the app is
    connected: the greeting of a server-first app never reaches a denied caller."""
    m = clean
    assert m.greeting("other")["greeting"] == "220 web-3 ready"  # no policy: anyone
    m.write("policy-allow", ALLOW_CLIENT)
    m.converge({"web-1": {"demo/allow-client"}, "web-3": {"demo/allow-client"}})
    allowed = m.greeting("client")
    print("allowed:", allowed)
    assert allowed["greeting"] == "220 web-3 ready"
    denied = m.greeting("other")
    print("denied:", denied)
    assert denied.get("greeting", "") == ""  # not a byte of it
    # A plaintext caller of a PERMISSIVE pod has no identity: refused before its greeting too.
    name = "sidemesh_authz.tcp_denied.policy.none"
    before = stats(m.pods["web-1"].ns, name)[name]
    plain = m.greeting("legacy", m.ip("web-1"))
    assert plain.get("greeting", "") == ""
    # Counted per policy (none: no ALLOW policy admitted them), logged with the caller.
    assert stats(m.pods["web-3"].ns, name)[name] == 1
    assert stats(m.pods["web-1"].ns, name)[name] == before + 1
    line = m.wait_logged(
        "web-3", "sidemesh-authz denied tcp spiffe://cluster.local/ns/demo/sa/other port=9000"
    )
    assert line.endswith("rbac_access_denied_matched_policy[none]")


def test_tcp_audit_and_deny_are_counted_per_policy(clean: Lab) -> None:
    m = clean
    audit = {"selector": WEB, "action": "AUDIT", "rules": [{"from": [{"serviceAccount": "other"}]}]}
    deny = {"selector": WEB, "action": "DENY", "rules": [{"from": [{"serviceAccount": "client"}],
                                                         "to": {"ports": [9000]}}]}  # fmt: skip
    m.write("policy-audit", policy("watch-other", audit))
    m.write("policy-deny", policy("no-client-tcp", deny))
    m.converge({"web-3": {"demo/watch-other", "demo/no-client-tcp"}})
    # What the sidecar was sent, as an operator reads it: the gate's rules, by policy.
    shown = m.cp.ns.run([*SIDEMESH, "proxy-config", "demo/web-3", "--type", "extensions"])
    gate = shown.stdout.split("sidemesh.authz.tcp.gate", 1)[1].split("\n  sidemesh.", 1)[0]
    print(gate)
    assert "values set at the caller's TLS handshake" in gate
    client = "connection.uri_san_peer_certificate == 'spiffe://cluster.local/ns/demo/sa/client'"
    assert (
        "sidemesh.authz.tcp.denied = %CEL((destination.port == 9000 && "
        f"(connection.mtls && {client})) ? 'demo/no-client-tcp' : '')%"
    ) in gate
    assert "sidemesh.authz.tcp.audit = %CEL(" in gate and "'demo/watch-other'" in gate
    ns = m.pods["web-3"].ns
    audited = "sidemesh_authz.tcp_audit.policy.demo/watch-other"
    denied = "sidemesh_authz.tcp_denied.policy.demo/no-client-tcp"
    # The documented price of refusing the app hop: a denial is a connect failure of inbound_app
    # (each of the proxy's attempts).
    app_fail = "cluster.inbound_app.upstream_cx_connect_fail"
    before = stats(ns, audited, denied, app_fail)
    for _ in range(2):
        assert m.greeting("other")["greeting"] == "220 web-3 ready"  # AUDIT denies nothing
    assert m.greeting("client").get("greeting", "") == ""
    assert m.http("client", "/", "web-3")["status"] == 200  # the DENY names port 9000 only
    after = stats(ns, audited, denied, app_fail)
    assert after[audited] == before[audited] + 2
    assert after[denied] == before[denied] + 1
    assert after[app_fail] == before[app_fail] + TCP_CONNECT_ATTEMPTS
    line = m.wait_logged(
        "web-3", "sidemesh-authz audit tcp spiffe://cluster.local/ns/demo/sa/other"
    )
    assert line.endswith("port=9000 demo/watch-other")


# --- rate limits -------------------------------------------------------------------------


def limit_policy(name: str, limits: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return policy(name, {"selector": WEB, "limits": limits, **extra}, kind="RateLimitPolicy")


def _not_near_a_minute_edge() -> None:
    """A fixed window is a calendar minute: start a counted burst well inside one."""
    into = time.time() % 60
    if into > 45:
        time.sleep(60 - into + 0.5)


def test_global_limit_is_shared_by_three_replicas_per_caller(clean: Lab) -> None:
    m = clean
    limit = {"requests": 5, "per": "minute", "perCaller": True}
    m.write("policy-rl", limit_policy("five-a-minute", [limit]))
    expected = {"global:demo/five-a-minute"}
    m.converge({"web-1": expected, "web-2": expected, "web-3": expected})
    _not_near_a_minute_edge()
    # Through the Service: the client's sidecar balances request by request over web-1..3.
    burst = m.call("client", "burst", WEB_VIP, "80", "9")
    print("client:", burst)
    assert burst["statuses"] == {"200": 5, "429": 4}
    assert m.call("other", "burst", WEB_VIP, "80", "3")["statuses"] == {"200": 3}
    # A plaintext caller has no identity: all of them share one budget of their own.
    plain = m.call("legacy", "burst", m.ip("web-1"), "8080", "7")
    assert plain["statuses"] == {"200": 5, "429": 2}


def test_local_limit_is_a_token_bucket_per_sidecar(clean: Lab) -> None:
    m = clean
    limit = {"requests": 3, "per": "minute", "scope": "Local", "match": {"paths": ["/burst"]}}
    m.write("policy-rl", limit_policy("local-three", [limit]))
    m.converge({"web-1": {"local:demo/local-three"}})
    burst = m.call("client", "burst", m.ip("web-1"), "8080", "5")
    assert burst["statuses"] == {"200": 3, "429": 2}
    assert m.http("client", "/other")["status"] == 200  # a path the limit does not name


@pytest.mark.parametrize(("mode", "status"), [("Deny", 503), ("Allow", 200)])
def test_redis_down_fails_as_the_policy_says(clean: Lab, mode: str, status: int) -> None:
    m = clean
    limit = {"requests": 1000, "per": "minute"}
    m.write("policy-rl", limit_policy(f"fail-{mode.lower()}", [limit], failureMode=mode))
    m.converge({"web-1": {f"global:demo/fail-{mode.lower()}"}})
    assert m.http("client")["status"] == 200
    m.redis.stop()
    try:
        answer = m.http("client")
        assert answer["status"] == status, answer
    finally:
        m.start_redis()
    assert m.http("client")["status"] == 200
