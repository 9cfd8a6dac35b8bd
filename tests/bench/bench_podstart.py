"""Pod start benchmark: time from the first init container to Ready, injected vs plain.

The lab of the end-to-end test (``sidemesh serve`` as webhook and CA, pods in network
namespaces) and :class:`podrunner.PodRunner` with ``kubelet_timing``: probes at their
``periodSeconds`` from the pod's admission, readiness probes also run at once on every status
change, the proxy's postStart hook run to completion before the app starts. Each round starts
the same manifest three times, in rotating order: as written (plain), as ``/mutate`` returns
it (injected: the proxy's postStart hook ``sidemesh proxy wait`` holds the app back), and as
``/mutate`` returned it before that hook (startup-probe: a startupProbe every second instead),
so the probe-period penalty shows within one run on the same machine. The app is the test
app (stdlib Python) with a readiness probe ``GET /ready :8080`` every second, which the
injected pods have rewritten to the proxy's probe port. Root and Envoy required.
``BENCH_ROUNDS`` (default 5) sets the number of rounds.

    .venv/bin/python tests/bench/bench_podstart.py     # table on stdout,
                                                       # JSON in bench-results/podstart.json
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.meshlab import (  # noqa: E402
    MESHAPP,
    PYTHON,
    SIDEMESH,
    ControlPlane,
    checked_lab,
    pod_manifest,
    start_control_plane,
)
from tests.support.netns import NetnsLab  # noqa: E402
from tests.support.podrunner import PodRunner  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
#: The goal: an injected pod Ready within this many seconds of the same pod without sidemesh.
GOAL_ADDED_S = 0.5


def _manifest(name: str) -> dict[str, Any]:
    ready = {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1}
    return pod_manifest(name, "bench", {}, [8080], readinessProbe=ready)


KINDS = ("plain", "injected", "startup-probe")


def _with_startup_probe(pod: dict[str, Any]) -> dict[str, Any]:
    """The proxy as injected before the postStart hook: a startupProbe polled every second."""
    proxy = pod["spec"]["initContainers"][1]
    del proxy["lifecycle"]
    proxy["startupProbe"] = {**proxy["readinessProbe"], "periodSeconds": 1, "failureThreshold": 600}
    return pod


def start_once(lab: NetnsLab, plane: ControlPlane, name: str, kind: str) -> float:
    """Seconds from the first (init) container to the pod's Ready condition."""
    pod = _manifest(name)
    if kind != "plain":
        pod = plane.admit(pod)
    if kind == "startup-probe":
        pod = _with_startup_probe(pod)
    runner = PodRunner(
        lab=lab,
        node=plane.node,
        pod_net=plane.node.add_pod(name),
        pod=pod,
        app_commands={"app": [PYTHON, MESHAPP, "serve", "8080"]},
        sidemesh=SIDEMESH,
        token_for=plane.token_for,
        kubelet_timing=True,
    )
    runner.start()
    seconds = runner.wait_ready()
    for proc in reversed(list(runner.procs.values())):  # the app first, like a pod deletion
        proc.stop(timeout=10)
    return seconds


def main() -> int:
    with checked_lab("smboot") as lab:
        node = lab.node()
        plane = start_control_plane(lab, node, node.add_pod("cp"))
        start_once(lab, plane, "warmup", "injected")  # page cache, the CA's first signing
        runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for i in range(ROUNDS):
            for j in range(len(KINDS)):
                kind = KINDS[(i + j) % len(KINDS)]
                runs[kind].append(start_once(lab, plane, f"{kind[:3]}{i}", kind))
        load = os.getloadavg()[0]
    median = {kind: statistics.median(values) for kind, values in runs.items()}
    plain, injected = median["plain"], median["injected"]
    rounded = {kind: [round(x, 3) for x in values] for kind, values in runs.items()}
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "load_average_1m": round(load, 2),
        "runs_s": rounded,
        "median_s": {kind: round(value, 3) for kind, value in median.items()},
        "added_s": round(injected - plain, 3),
        "goal_added_s": GOAL_ADDED_S,
    }
    print(f"pod start to Ready, median of {ROUNDS} (load average {load:.1f}):")
    for kind in KINDS:
        print(f"  {kind:14} {median[kind]:6.3f} s   {rounded[kind]}")
    print(f"  injected - plain {injected - plain:+6.3f} s   (goal: +{GOAL_ADDED_S} s at most)")
    write_results("podstart", result)
    if injected - plain > GOAL_ADDED_S:
        print("  goal missed (see docs/benchmarks.md, 'Pod start', for where the time goes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
