"""Benchmark: how long ``sidemesh --help`` and ``sidemesh inject`` take to start, per process.

Each command runs as ``python -m webhook …`` in a fresh interpreter, the way a user or a CI step
runs it; the figures are the median wall time and the median user+system CPU of the child
(``getrusage``). Bytecode is cached first, as for an installed package.

    .venv/bin/python tests/bench/bench_cli_startup.py [--runs N]
    .venv/bin/python tests/bench/bench_cli_startup.py --ref REF [--runs N]

``--ref REF`` also runs git revision ``REF``'s ``webhook/`` (exported to a temporary directory),
alternating with this tree so both see the same phases of a machine whose speed drifts, and
prints the ratios. Writes bench-results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.results import write_results  # noqa: E402

DEMO = "webhook/samples/demo-app.yaml"
COMMANDS = {"--help": ["--help"], "inject": ["inject", "-f", DEMO]}


def run_once(root: Path, argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU milliseconds of one ``python -m webhook ARGV`` in ``root``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "webhook", *argv],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


def export(ref: str, into: Path) -> Path:
    """``ref``'s ``webhook/`` and the sample it injects, unpacked below ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "webhook"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(trees: dict[str, Path], runs: int) -> dict[str, dict[str, dict[str, float]]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for root in trees.values():  # write the bytecode caches first
        subprocess.run(
            [sys.executable, "-m", "webhook", "--help"], cwd=root, env=env, capture_output=True
        )
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {
        (t, c): [] for t in trees for c in COMMANDS
    }
    for i in range(runs):
        order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
        for command, argv in COMMANDS.items():
            for name, root in order:
                samples[name, command].append(run_once(root, argv, env))
    return {
        name: {
            command: {
                "wall_median_ms": statistics.median(w for w, _ in samples[name, command]),
                "cpu_median_ms": statistics.median(c for _, c in samples[name, command]),
                "runs": runs,
            }
            for command in COMMANDS
        }
        for name in trees
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command and tree")
    parser.add_argument("--ref", help="also run git revision REF, alternating, and compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": REPO}
        if args.ref:
            trees = {args.ref: export(args.ref, Path(tmp)), **trees}
        results = measure(trees, args.runs)
    for command in COMMANDS:
        line = f"sidemesh {command:<7}"
        for name, r in results.items():
            m = r[command]
            line += (
                f" | {name}: {m['wall_median_ms']:6.0f} ms wall {m['cpu_median_ms']:5.0f} ms cpu"
            )
        if args.ref:
            old, new = results[args.ref][command], results["this tree"][command]
            line += (
                f" | ratio wall {new['wall_median_ms'] / old['wall_median_ms']:.2f}"
                f" cpu {new['cpu_median_ms'] / old['cpu_median_ms']:.2f}"
            )
        print(line)
    write_results("cli_startup", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
