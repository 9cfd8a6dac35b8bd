"""`sidemesh serve`'s CA upkeep alone, for ROUNDS rounds, logging to stderr.

``python upkeep_rounds.py CERT_DIR KUBECONFIG ROUNDS`` (an empty KUBECONFIG: no cluster).
A test runs it in a child process that cannot write CERT_DIR, as on a read-only Secret mount.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from webhook.ca.upkeep import upkeep_from_config
from webhook.config import MeshConfig


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    cert_dir, kubeconfig, rounds = Path(argv[0]), argv[1] or None, int(argv[2])
    upkeep = upkeep_from_config(MeshConfig(), cert_dir, kubeconfig=kubeconfig)
    if upkeep is None:
        raise SystemExit("the default mesh config has no CA upkeep")

    async def run() -> None:
        for _ in range(rounds):
            await upkeep.run_once()

    asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
