"""Rule status: what each HTTPRoute, GRPCRoute and TrafficPolicy reports (Accepted,
ResolvedRefs), computed purely from the routing table, and written by the control plane to the
kube-apiserver STAND-IN through the official client (a merge patch of the status subresource).
Timeouts only bound how long a broken build hangs."""

from __future__ import annotations

import copy
from typing import Any

from tests.conftest import TESTDATA
from tests.support.apiserver_standin import APIServerStandin
from tests.support.kube_sources import write_status_once
from webhook.discovery.build import build_model
from webhook.discovery.core import DiscoverySettings
from webhook.discovery.filesource import parse_documents
from webhook.discovery.store import KINDS
from webhook.routing.status import CONTROLLER, status_update
from webhook.routing.table import RoutingTable, build_table

NOW, LATER = "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z"


def _load(name: str) -> tuple[dict[str, list[dict[str, Any]]], RoutingTable]:
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for obj in parse_documents((TESTDATA / "routing" / name).read_text(), name):
        by_kind[obj["kind"]].append(obj)
    return by_kind, build_table(by_kind, build_model(by_kind))


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    conds = status["parents"][0]["conditions"] if "parents" in status else status["conditions"]
    return {c["type"]: (c["status"], c["reason"]) for c in conds}


def _named(objects: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects[kind] if o["metadata"]["name"] == name)


def test_status_says_what_is_wrong_with_each_rule() -> None:
    objects, table = _load("broken.yaml")
    canary = status_update(_named(objects, "HTTPRoute", "canary"), table, NOW)
    assert canary is not None
    assert _conditions(canary) == {
        "Accepted": ("False", "NoMatchingParent"),  # the Service has no port 8080
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    assert canary["parents"][0]["controllerName"] == CONTROLLER
    split = status_update(_named(objects, "HTTPRoute", "split"), table, NOW)
    assert split is not None
    assert _conditions(split) == {
        "Accepted": ("True", "Accepted"),  # applied, but partly: the bad match and filter
        "ResolvedRefs": ("False", "BackendNotFound"),  # subset v9
    }
    accepted = split["parents"][0]["conditions"][0]
    assert accepted["message"].startswith("partly: spec.rules[0].matches[0].path.value")
    ghost = status_update(_named(objects, "TrafficPolicy", "ghost"), table, NOW)
    assert ghost is not None
    assert _conditions(ghost)["Accepted"] == ("False", "TargetNotFound")


def test_nothing_to_write_when_the_status_is_current_and_times_are_kept() -> None:
    objects, table = _load("mesh.yaml")
    route = copy.deepcopy(_named(objects, "HTTPRoute", "reviews"))
    # A Gateway's controller reports on the same route: its entry is left alone.
    theirs = {"parentRef": {"name": "gw"}, "controllerName": "example.com/gw", "conditions": []}
    route["status"] = {"parents": [theirs]}
    first = status_update(route, table, NOW)
    assert first is not None and first["parents"][0] == theirs
    assert _conditions({"parents": first["parents"][1:]}) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    route["status"] = first
    assert status_update(route, table, LATER) is None  # unchanged: no write
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["backendRefs"][0]["name"] = "reviews-v9"
    objects["HTTPRoute"] = [broken]
    changed = status_update(broken, build_table(objects, build_model(objects)), LATER)
    assert changed is not None
    accepted, resolved = changed["parents"][1]["conditions"]
    assert accepted["lastTransitionTime"] == NOW  # still True: the time it became so
    assert (resolved["status"], resolved["lastTransitionTime"]) == ("False", LATER)


def test_the_control_plane_writes_rule_status_to_the_api_server(
    standin: APIServerStandin,
) -> None:
    objects, _ = _load("broken.yaml")
    for kind in ("Service", "HTTPRoute", "TrafficPolicy"):
        for obj in objects[kind]:
            standin.objects.add({**obj, "metadata": {**obj["metadata"], "generation": 1}})
    # two routes, two policies
    assert write_status_once(standin, DiscoverySettings(quiet=0.01), NOW) == 4
    route = standin.objects.get("HTTPRoute", "demo", "canary")
    assert route is not None
    (entry,) = route["status"]["parents"]
    accepted = entry["conditions"][0]
    assert (accepted["type"], accepted["status"], accepted["observedGeneration"]) == (
        "Accepted",
        "False",
        1,
    )
    assert "no port 8080" in accepted["message"]
    assert route["spec"] == objects["HTTPRoute"][0]["spec"]  # the spec is never written
