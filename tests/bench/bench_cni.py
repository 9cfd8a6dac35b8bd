"""What sidemesh's CNI plugin adds to a pod's sandbox creation (root; the netns lab).

A node namespace with the real reference plugins as the primary network (bridge + host-local,
loopback first) and ``sidemesh cni install`` having chained sidemesh after them; the API server
stand-in inside the node. For each run, a fresh pod namespace is networked twice over, as a
runtime would: once for a pod that is not injected (sidemesh passes the result through after
one pod lookup) and once for a CNI-mode pod (lookup, then the capture rules inside the pod's
namespace); each sandbox is then deleted. Reported: the wall time of each plugin's ADD, median
and max, so that sidemesh's share can be told from the bridge's. Compare within one run only.

    .venv/bin/python tests/bench/bench_cni.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))

from tests.bench.results import write_results  # noqa: E402
from tests.support.cni_lab import built_plugin, cni_node  # noqa: E402
from tests.support.cni_runtime import Runtime  # noqa: E402
from tests.support.netns import NetnsLab  # noqa: E402
from webhook.config import MeshConfig  # noqa: E402
from webhook.inject.pod import inject_pod  # noqa: E402

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "demo"},
    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
}


class TimedRuntime(Runtime):
    """The lab runtime, timing each plugin execution."""

    def __init__(self, base: Runtime) -> None:
        super().__init__(base.node, base.conf_dir, base.bin_dir)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.label = ""

    def _exec(self, conf, command, pod_ns, ifname, pod):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return super()._exec(conf, command, pod_ns, ifname, pod)
        finally:
            if command == "ADD":
                self.times[f"{self.label} {conf['type']}"].append(time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    injected = inject_pod(POD, namespace="demo", config=MeshConfig(cni=True), bundle="PEM").pod
    with tempfile.TemporaryDirectory() as tmp, NetnsLab("smcnib") as lab:
        node = cni_node(lab)
        try:
            node.install(built_plugin(Path(tmp)))
            node.standin.pods[("demo", "plain")] = {**POD, "metadata": {"name": "plain"}}
            node.standin.pods[("demo", "web")] = injected
            runtime = TimedRuntime(node.runtime)
            for i in range(runs):
                for label, name in (("not injected", "plain"), ("CNI mode", "web")):
                    runtime.label = label
                    ns = lab.namespace(f"p{i}{name[0]}")
                    runtime.add(ns, "demo", name)
                    runtime.delete(ns, "demo", name)
        finally:
            node.close()
    rows = {
        key: {
            "median_ms": round(statistics.median(v) * 1000, 1),
            "max_ms": round(max(v) * 1000, 1),
        }
        for key, v in sorted(runtime.times.items())
    }
    for key, row in rows.items():
        print(f"{key:28s} median {row['median_ms']:7.1f} ms   max {row['max_ms']:7.1f} ms")
    write_results("cni", {"runs": runs, "add": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
