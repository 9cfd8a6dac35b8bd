"""`sidemesh discovery --kubernetes`: the control plane reads the cluster through a kubeconfig,
serves nothing before every kind is listed, and stops cleanly — against the API-server STAND-IN.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.support.apiserver_standin import APIServerStandin
from tests.support.ports import free_port
from tests.support.shop_objects import cluster
from webhook.ca.serving import ensure_dev_pki
from webhook.discovery.core import DiscoverySettings
from webhook.discovery.run import RunSettings, run_discovery


def kubeconfig(api: APIServerStandin, path: Path) -> Path:
    """A kubeconfig for the stand-in, as `kubectl config` would write it."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "s",
                        "cluster": {"server": api.url, "certificate-authority": str(api.ca_file)},
                    }
                ],
                "users": [{"name": "u", "user": {"token": api.caller_token}}],
                "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    return path


def settings(tmp_path: Path, api: APIServerStandin) -> RunSettings:
    certs = tmp_path / "certs"
    ensure_dev_pki(certs, now=datetime.now(UTC))
    return RunSettings(
        listen=f"127.0.0.1:{free_port()}",
        debug_host="127.0.0.1",
        debug_port=free_port(),
        cert_dir=certs,
        mesh_dir=None,
        poll_interval=1.0,
        discovery=DiscoverySettings(),
        kubernetes=True,
        kubeconfig=str(kubeconfig(api, tmp_path / "kubeconfig")),
    )


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_standin_discovery_lists_the_cluster_then_serves(
    standin: APIServerStandin, tmp_path: Path
) -> None:
    cluster(standin)
    s = settings(tmp_path, standin)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_discovery(s, stop))
        for _ in range(300):
            if await asyncio.to_thread(healthy, s.debug_port):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the control plane never became healthy")
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    listed = {r.path.split("?")[0] for r in standin.requests if "watch=" not in r.path}
    assert listed >= {
        "/api/v1/namespaces",
        "/api/v1/services",
        "/api/v1/pods",
        "/apis/discovery.k8s.io/v1/endpointslices",
    }
    assert any("watch=true" in r.path for r in standin.requests)


def test_standin_discovery_serves_nothing_until_it_has_listed(
    standin: APIServerStandin, tmp_path: Path
) -> None:
    standin.fail_next_lists = 10**6  # the API server never answers a list
    s = settings(tmp_path, standin)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_discovery(s, stop))
        for _ in range(20):  # it keeps retrying the lists meanwhile
            await asyncio.sleep(0.1)
        assert not await asyncio.to_thread(healthy, s.debug_port)
        stop.set()
        await asyncio.wait_for(task, 30)  # and a stop while waiting is honoured

    asyncio.run(main())
    assert len([r for r in standin.requests if r.path.startswith("/api")]) >= 4
