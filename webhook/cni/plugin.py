"""The chained CNI plugin: the node-side half of CNI mode (run by the container runtime).

For ADD the runtime has just created the pod's network namespace and the primary plugin has
given it its addresses (``prevResult``). The plugin asks the node agent (over its Unix
socket, :mod:`webhook.cni.agentclient`; the agent asks the API server) for the pod; when
the injector marked it for CNI mode (annotations ``sidemesh.io/status`` and
``sidemesh.io/cni-capture``), it enters the pod's namespace and installs exactly the rules
``sidemesh init-traffic`` would, from the same argument list, through the same applier
(:mod:`webhook.dataplane.netns`). Every other pod is passed through untouched. Whatever the
case, the answer is ``prevResult`` unchanged: sidemesh adds no interface and no address.

Decisions (docs/cni.md says the same to users):

* node agent or API server unreachable, pod not found, bad capture annotation → ADD fails, so
  the sandbox is not created and the kubelet retries. A meshed pod never runs without its capture.
* pods of ``exclude_namespaces`` (kube-system …) are passed through without an API call, so
  the cluster's own components get a network while the API server (or the agent) is down.
* the plugin imports the standard library and sidemesh's pure modules only (a test checks):
  it runs once per sandbox, and the node needs no third-party package for it.
* DEL never calls the API server: it removes sidemesh's chains from the namespace if it still
  exists (nothing of another owner), and succeeds when there is nothing to remove.
* CHECK fails when an injected pod's chains or jumps are missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from webhook import names
from webhook.cni import spec
from webhook.cni.spec import CNIError, Request
from webhook.dataplane.capture import CHAINS, CaptureOptions, Family, sidemesh_state
from webhook.errors import SidemeshError

__all__ = ["entered", "handle", "main"]

_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body in the network namespace at ``netns`` (a path), then come back.

    setns moves the calling thread only; the plugin is single-threaded and its iptables
    processes are forked from this thread, so they run in the pod's namespace too."""
    try:
        target = os.open(netns, os.O_RDONLY)
    except OSError as exc:
        raise CNIError(spec.ERR_IO, f"cannot open CNI_NETNS {netns}: {exc.strerror}") from None
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def capture_options(annotations: Mapping[str, str], pod: str) -> CaptureOptions | None:
    """The pod's capture options, or None when it is not a CNI-mode pod."""
    from webhook.cli.traffic import capture_options as parse

    raw = annotations.get(names.CNI_CAPTURE)
    if raw is None or names.STATUS not in annotations:
        return None
    try:
        argv = json.loads(raw)
    except ValueError:
        argv = None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise CNIError(
            spec.ERR_INVALID_CONFIG,
            f"sidemesh: pod {pod}: annotation {names.CNI_CAPTURE} is not a JSON list of "
            "init-traffic arguments",
        )
    try:
        return parse(argv)
    except SidemeshError as exc:
        raise CNIError(spec.ERR_INVALID_CONFIG, f"sidemesh: pod {pod}: {exc}") from None


#: Seconds the plugin waits for the agent beyond the agent's own API timeout, so that the
#: agent's clearer error (API server unreachable) arrives before the plugin gives up.
_AGENT_GRACE = 2.0


def _lookup(req: Request) -> CaptureOptions | None:
    from webhook.cni.agentclient import read_annotations

    assert req.conf is not None
    pod = req.pod
    if pod is None or pod[0] in req.conf.exclude_namespaces:
        return None
    annotations = read_annotations(
        req.conf.agent_socket, pod[0], pod[1], timeout=req.conf.timeout_seconds + _AGENT_GRACE
    )
    return capture_options(annotations, f"{pod[0]}/{pod[1]}")


OnOff = Literal["on", "off"]


def _ipv6(prev: Mapping[str, Any]) -> OnOff:
    return "on" if 6 in spec.families(prev) else "off"


def _add(req: Request) -> None:
    from webhook.dataplane import netns as applier

    assert req.conf is not None and req.conf.prev_result is not None
    options = _lookup(req)
    if options is None:
        return
    with entered(req.netns):
        applier.apply(options, ipv6=_ipv6(req.conf.prev_result))


def _delete(req: Request) -> None:
    from webhook.dataplane import netns as applier

    if not req.netns or not Path(req.netns).exists():
        return  # the namespace is gone, and our rules with it
    with entered(req.netns):
        # IPv6 rules may exist whenever the namespace has an IPv6 stack at all (and the node
        # has ip6tables: without it, ADD could not have installed any)
        stack = Path("/proc/net/if_inet6").exists() and shutil.which("ip6tables-save")
        ipv6: OnOff = "on" if stack else "off"
        applier.cleanup(ipv6=ipv6)


def _check(req: Request) -> None:
    from webhook.dataplane import netns as applier

    assert req.conf is not None and req.conf.prev_result is not None
    options = _lookup(req)
    if options is None:
        return
    with entered(req.netns):
        families: tuple[Family, ...] = (4, 6) if _ipv6(req.conf.prev_result) == "on" else (4,)
        for family in families:
            state = sidemesh_state(applier.saved_nat(family))
            missing = [c for c in CHAINS if c not in state.chains]
            if missing or len(state.jumps) < 2:
                raise CNIError(
                    spec.ERR_IO,
                    f"sidemesh: IPv{family} traffic capture of pod {'/'.join(req.pod or ())} "
                    "is not in place "
                    f"(missing chains: {', '.join(missing) or 'none'}; "
                    f"{len(state.jumps)} of 2 jump rules)",
                )


def handle(req: Request) -> dict[str, Any] | None:
    """Carry out one request; the result to print (None: nothing, for DEL)."""
    if req.command == "VERSION":
        return spec.version_result()
    try:
        if req.command == "ADD":
            _add(req)
        elif req.command == "DEL":
            _delete(req)
        else:
            _check(req)
    except SidemeshError as exc:  # the applier's TrafficError: iptables missing, refused …
        raise CNIError(spec.ERR_IO, f"sidemesh: {exc}") from None
    if req.command == "ADD":
        assert req.conf is not None and req.conf.prev_result is not None
        return {**req.conf.prev_result, "cniVersion": req.conf.cni_version}
    return None


def main(
    env: Mapping[str, str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """The plugin's entry point: a CNI error is printed as JSON on stdout, exit code 1."""
    env = os.environ if env is None else env
    stdout = stdout or sys.stdout
    raw = (stdin or sys.stdin).read() if env.get("CNI_COMMAND") != "VERSION" else ""
    version = spec.CNI_VERSION
    try:
        req = spec.parse_request(env, raw)
        if req.conf is not None:
            version = req.conf.cni_version
        result = handle(req)
    except CNIError as exc:
        error = exc
    except Exception as exc:  # whatever happens, the runtime gets an answer it can show
        error = CNIError(spec.ERR_IO, f"sidemesh: internal error: {type(exc).__name__}: {exc}")
    else:
        if result is not None:
            json.dump(result, stdout)
            stdout.write("\n")
        return 0
    json.dump(spec.error_result(error, version), stdout)
    stdout.write("\n")
    print(f"sidemesh-cni: {error.msg} {error.details}".rstrip(), file=sys.stderr)
    return 1
