"""How long `sidemesh init-traffic` takes to install the capture rules (root; fresh netns).

For each run: a fresh network namespace, then the init container's exact command line
(docs/CONTRACTS.md, section 2) as a process — interpreter start, imports, checks, ``iptables-save``,
``iptables-restore --noflush``, ``iptables-save`` — then a re-run (the idempotent path) and
``--cleanup``. Reports the wall time of each command and the applier's own time (what the CLI
prints). The machine is shared and noisy: compare within one run only.

    .venv/bin/python tests/bench/bench_init_traffic.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402
from tests.support.netns import NetnsLab  # noqa: E402

ARGS = [
    "--proxy-uid", "1337", "--proxy-gid", "1337",
    "--inbound-port", "15006", "--outbound-port", "15001",
    "--include-inbound-ports", "*", "--exclude-inbound-ports", "15020,15021,15090",
    "--include-outbound-cidrs", "*",
]  # fmt: skip
CLI = [sys.executable, "-m", "webhook", "init-traffic"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    if os.geteuid() != 0:
        print("bench_init_traffic: skipped, needs root (network namespaces, iptables)")
        return 0
    wall: dict[str, list[float]] = {"apply": [], "re-run": [], "cleanup": []}
    inner: dict[str, list[float]] = {"apply": [], "re-run": []}
    with NetnsLab("smcapbench") as lab:
        for _ in range(runs):
            ns = lab.namespace("bench")
            for step, extra in (("apply", []), ("re-run", []), ("cleanup", ["--cleanup"])):
                start = time.perf_counter()
                done = ns.run([*CLI, *ARGS, *extra])
                wall[step].append((time.perf_counter() - start) * 1000)
                match = re.search(r"IPv4 .*, ([\d.]+) ms\)", done.stderr)
                if step in inner and match:
                    inner[step].append(float(match.group(1)))
    rows = []
    print(f"sidemesh init-traffic, {runs} fresh namespaces (ms; median / max)")
    print(f"{'step':<10}{'command wall':>16}{'rules applied in':>20}")
    for step, values in wall.items():
        within = inner.get(step, [])
        applied = f"{statistics.median(within):.1f} / {max(within):.1f}" if within else "-"
        print(f"{step:<10}{statistics.median(values):>9.1f} / {max(values):<6.1f}{applied:>17}")
        rows.append(
            {
                "step": step,
                "wall_ms_median": round(statistics.median(values), 2),
                "wall_ms_max": round(max(values), 2),
                "apply_ms_median": round(statistics.median(within), 2) if within else None,
            }
        )
    write_results("init_traffic", {"runs": runs, "steps": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
