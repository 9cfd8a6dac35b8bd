"""Where every benchmark leaves its figures: ``bench-results/<name>.json`` in the checkout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent.parent.parent / "bench-results"


def write_results(name: str, results: Any) -> Path:
    """Write ``results`` as ``bench-results/<name>.json`` and say where."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(RESULTS_DIR.parent)}")
    return out
