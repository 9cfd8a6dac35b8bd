"""AccessPolicy and RateLimitPolicy status: Accepted, and ResolvedRefs for references that
resolve to nothing, computed purely and written by the control plane's status writer to the
kube-apiserver STAND-IN through the official client (a merge patch of the status subresource).
Timeouts only bound how long a broken build hangs."""

from __future__ import annotations

import copy
from typing import Any

from tests.support.apiserver_standin import APIServerStandin
from tests.support.kube_sources import write_status_once
from webhook.discovery.build import build_model
from webhook.discovery.core import DiscoverySettings
from webhook.policy.model import AccessPolicy
from webhook.policy.state import AuthzState
from webhook.policy.status import policy_status_update
from webhook.ratelimit.model import RateLimitPolicy

NOW, LATER = "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z"
WEB = {"matchLabels": {"app": "web"}}


def _policy(name: str, spec: dict[str, Any], kind: str = "AccessPolicy") -> dict[str, Any]:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "demo", "generation": 1},
        "spec": spec,
    }


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
    "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "a"}]},
    "status": {"phase": "Running", "podIP": "10.0.0.5"},
}
FINE = _policy(
    "fine", {"selector": WEB, "action": "ALLOW", "rules": [{"from": [{"serviceAccount": "web"}]}]}
)
TYPO = _policy(
    "typo",
    {"selector": {"matchLabels": {"app": "wbe"}}, "action": "ALLOW",
     "rules": [{"from": [{"serviceAccount": "frontend"}, {"namespace": "shopp"}]}]},
)  # fmt: skip
BROKEN = _policy("broken", {"selector": WEB, "action": "MAYBE"})
LIMIT = _policy(
    "limit", {"selector": WEB, "limits": [{"requests": 5, "per": "minute"}]}, "RateLimitPolicy"
)


def _statuses(objects: list[dict[str, Any]], *, service: bool = True) -> dict[str, Any]:
    by_kind: dict[str, list[dict[str, Any]]] = {"Pod": [POD]}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    model = build_model(by_kind)
    state = AuthzState("cluster.local", ratelimit_service=service)
    state.update(by_kind.get("AccessPolicy", ()), by_kind.get("RateLimitPolicy", ()))
    parsed: list[AccessPolicy | RateLimitPolicy] = [*state.policies, *state.limits]
    return {
        o["metadata"]["name"]: policy_status_update(
            o, parsed, state.errors, model, state.root_namespace, NOW
        )
        for o in objects
    }


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_each_policy_says_whether_it_is_enforced_and_what_does_not_resolve() -> None:
    got = _statuses([FINE, TYPO, BROKEN, LIMIT])
    assert _conditions(got["fine"]) == {
        "Accepted": ("True", "Accepted", "enforced by the sidecars"),
        "ResolvedRefs": ("True", "ResolvedRefs", ""),
    }
    typo = _conditions(got["typo"])
    assert typo["Accepted"][:2] == ("True", "Accepted")  # enforced: it admits nobody now
    assert typo["ResolvedRefs"][:2] == ("False", "RefNotFound")
    for part in ("spec.selector: selects no pod", "no pod runs as demo/frontend",
                 "no pod in namespace shopp"):  # fmt: skip
        assert part in typo["ResolvedRefs"][2]
    status, reason, message = _conditions(got["broken"])["Accepted"]
    assert (status, reason) == ("False", "Invalid") and "spec.action" in message
    assert got["limit"]["conditions"][0]["observedGeneration"] == 1
    no_service = _conditions(_statuses([LIMIT], service=False)["limit"])["Accepted"]
    assert no_service[:2] == ("False", "NoRateLimitService")


def test_nothing_to_write_when_the_status_is_current_and_times_are_kept() -> None:
    fine = copy.deepcopy(FINE)
    first = _statuses([fine])["fine"]
    fine["status"] = first
    assert _statuses([fine])["fine"] is None  # unchanged: no write
    # The pod goes: the service account no longer resolves; Accepted keeps its time.
    by_kind = {"Pod": [], "AccessPolicy": [fine]}
    state = AuthzState("cluster.local")
    state.update([fine])
    changed = policy_status_update(
        fine, state.policies, state.errors, build_model(by_kind), state.root_namespace, LATER
    )
    assert changed is not None
    accepted, resolved = changed["conditions"]
    assert accepted["lastTransitionTime"] == NOW
    assert (resolved["status"], resolved["lastTransitionTime"]) == ("False", LATER)


def test_standin_gets_policy_status_from_the_control_plane(standin: APIServerStandin) -> None:
    for obj in (POD, FINE, TYPO, LIMIT):
        standin.objects.add(copy.deepcopy(obj))
    settings = DiscoverySettings(quiet=0.01, ratelimit_address="rls:8081")
    assert write_status_once(standin, settings, NOW) == 3  # two access policies, one rate limit
    typo = standin.objects.get("AccessPolicy", "demo", "typo")
    assert typo is not None and typo["spec"] == TYPO["spec"]  # the spec is never written
    resolved = _conditions(typo["status"])["ResolvedRefs"]
    assert resolved[:2] == ("False", "RefNotFound") and "demo/frontend" in resolved[2]
    limit = standin.objects.get("RateLimitPolicy", "demo", "limit")
    assert limit is not None
    assert _conditions(limit["status"])["Accepted"][:2] == ("True", "Accepted")
