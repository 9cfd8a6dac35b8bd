"""A small pod runner: the kubelet's part, for an injected Pod spec, in network namespaces.

Given a Pod (a dict, as the webhook's patch left it) and a pod network namespace from
:mod:`netns`, :class:`PodRunner` does what a kubelet would do with it, as far as sidemesh cares:

* every volume becomes a per-pod directory: ``emptyDir`` empty (mode 0777, like the kubelet's),
  ``downwardAPI`` items written as files from the pod's metadata, the projected
  ``serviceAccountToken`` replaced by a token that the test's JWKS issuer signed;
* every container runs as a process in the pod's namespace, in a private mount namespace where
  its ``volumeMounts`` are bind-mounted at their ``mountPath``; with the spec's command + args
  (``sidemesh`` resolved to the venv's console script, app images replaced by a test command),
  env (downward-API ``fieldRef`` values filled in: pod name/namespace/IP(s), service account;
  plus ``cluster_env``, the kubelet's own variables such as ``KUBERNETES_SERVICE_HOST``)
  and user (``runAsUser``/``runAsGroup`` of the container, else of the pod);
* init containers first and in order: a regular one must exit 0; a native sidecar
  (``restartPolicy: Always``) is started, its ``postStart`` hook run to completion and its
  ``startupProbe`` passed, the way the kubelet would, from the node namespace, before the next
  container starts; app containers in order, each after the previous one's ``postStart``.
* :meth:`PodRunner.wait_ready`: the pod's Ready condition, from the containers' readiness
  probes.

Probe timing: by default probes are polled every 0.1 s (tests want speed, not the kubelet's
periods). With ``kubelet_timing`` they follow the kubelet's clock, for the start-up
benchmark: each probe has a worker created when the pod is admitted (the runner's
:meth:`start`) that probes once per ``periodSeconds`` from then on; a readiness probe is also
run at once whenever the pod's status changes (a container started, another probe's result
changed), as the kubelet's status update triggers it; a startup probe is not.

What it does not do: images, resources, restarts, liveness, service-account token rotation.
"""

from __future__ import annotations

import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import Mount, Netns, NetnsLab, Node, Pod, Proc

__all__ = ["PodRunner", "field_value", "sidemesh_argv"]

_ANNOTATION_REF = re.compile(r"^metadata\.annotations\['(.+)'\]$")
_LABEL_REF = re.compile(r"^metadata\.labels\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], path: str, *, ip: str) -> str:
    """The value of a downward-API ``fieldPath`` for this pod."""
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", "default"),
        "metadata.uid": meta.get("uid", ""),
        "status.podIP": ip,
        "status.podIPs": ip,
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "spec.nodeName": "node",
    }
    if path in simple:
        return str(simple[path])
    if m := _ANNOTATION_REF.match(path):
        return str(meta.get("annotations", {}).get(m.group(1), ""))
    if m := _LABEL_REF.match(path):
        return str(meta.get("labels", {}).get(m.group(1), ""))
    raise ValueError(f"downward API field {path!r} is not supported by the test pod runner")


def sidemesh_argv() -> list[str]:
    """The venv's ``sidemesh`` console script, run by the interpreter its ``#!`` line names.

    Spelled out rather than exec'd through the ``#!`` line, so that the process's command line
    is exactly the argv we started (the netns toolkit waits for that to know the PID is the
    program's own)."""
    script = Path(sys.executable).parent / "sidemesh"
    first = script.read_text().splitlines()[0]
    interpreter = first[2:].strip() if first.startswith("#!") else sys.executable
    return [interpreter, str(script)]


@dataclass
class PodRunner:
    lab: NetnsLab
    node: Node
    pod_net: Pod
    pod: dict[str, Any]
    #: container name → argv replacing the image's program (apps); ``sidemesh`` needs none.
    app_commands: Mapping[str, Sequence[str]]
    #: ``sidemesh`` in the spec's command is replaced by this argv: the venv's console script,
    #: behind its interpreter (see :func:`sidemesh_argv`).
    sidemesh: Sequence[str]
    #: (namespace, service account, pod name) → a signed projected token.
    token_for: Callable[[str, str, str], str]
    #: What the kubelet adds to every container's environment on its own, e.g. the
    #: ``kubernetes`` Service's ``KUBERNETES_SERVICE_HOST``/``_PORT``; the spec's env wins.
    cluster_env: Mapping[str, str] = field(default_factory=dict)
    #: Probe at the kubelet's periods (see the module docstring) rather than every 0.1 s.
    kubelet_timing: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    volume_dirs: dict[str, Path] = field(default_factory=dict)
    #: ``time.monotonic()`` when :meth:`start` began (the kubelet admitting the pod).
    admitted_at: float = 0.0

    @property
    def ns(self) -> Netns:
        return self.pod_net.ns

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"].get("namespace", "default"))

    # --- volumes -----------------------------------------------------------------------

    def _make_volumes(self) -> None:
        spec = self.pod["spec"]
        sa = spec.get("serviceAccountName", "default")
        for volume in spec.get("volumes", []):
            name = volume["name"]
            path = self.lab.tmpdir(f"{self.name}-{name}")
            self.volume_dirs[name] = path
            if "emptyDir" in volume:
                path.chmod(0o777)
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"]["items"]:
                    value = field_value(self.pod, item["fieldRef"]["fieldPath"], ip=self.pod_net.ip)
                    (path / item["path"]).write_text(value)
                    (path / item["path"]).chmod(0o644)
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "serviceAccountToken" not in source:
                        raise ValueError(f"volume {name}: only serviceAccountToken is supported")
                    sat = source["serviceAccountToken"]
                    token = self.token_for(self.namespace, sa, self.name)
                    target = path / sat["path"]
                    target.write_text(token)
                    target.chmod(0o644)
            else:
                raise ValueError(f"volume {name}: kind not supported by the test pod runner")

    # --- containers ----------------------------------------------------------------------

    def _user(self, container: Mapping[str, Any]) -> tuple[int | None, int | None]:
        pod_sc = self.pod["spec"].get("securityContext", {})
        sc = container.get("securityContext", {})
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        if uid in (None, 0):
            return None, None  # root: no setpriv
        return int(uid), int(gid if gid is not None else uid)

    def _env(self, container: Mapping[str, Any]) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/"}
        env.update(self.cluster_env)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "fieldRef" in item.get("valueFrom", {}):
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                env[item["name"]] = field_value(self.pod, path, ip=self.pod_net.ip)
            else:
                raise ValueError(f"env {item['name']}: only value and fieldRef are supported")
        return env

    def _argv(self, container: Mapping[str, Any]) -> list[str]:
        command = list(container.get("command", []))
        args = [str(a) for a in container.get("args", [])]
        if command[:1] == ["sidemesh"]:
            return [*self.sidemesh, *command[1:], *args]
        name = container["name"]
        if name not in self.app_commands:
            raise ValueError(f"container {name}: no test command given for image")
        return list(self.app_commands[name])

    def _mounts(self, container: Mapping[str, Any]) -> list[Mount]:
        return [
            Mount(self.volume_dirs[m["name"]], m["mountPath"], bool(m.get("readOnly")))
            for m in container.get("volumeMounts", [])
        ]

    def _spawn(self, container: Mapping[str, Any]) -> Proc:
        uid, gid = self._user(container)
        proc = self.ns.spawn(
            self._argv(container),
            uid=uid,
            gid=gid,
            mounts=self._mounts(container),
            env=self._env(container),
        )
        self.procs[container["name"]] = proc
        return proc

    def _run_to_completion(self, container: Mapping[str, Any], timeout: float = 30) -> None:
        uid, gid = self._user(container)
        self.ns.run(
            self._argv(container),
            uid=uid,
            gid=gid,
            mounts=self._mounts(container),
            env=self._env(container),
            timeout=timeout,
        )

    def kubelet_get(self, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """An HTTP GET from the node namespace to this pod, as the kubelet probes it."""
        url = f"http://{self.pod_net.ip}:{port}{path}"

        def call() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        result: tuple[int, str] = self.node.ns.in_namespace(call)
        return result

    def probe(self, container: Mapping[str, Any], probe: Mapping[str, Any]) -> bool:
        """One run of an httpGet or tcpSocket probe, from the node namespace."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self._port(container, get["port"])
            status, _ = self.kubelet_get(port, get.get("path", "/"), timeout=timeout)
            return 200 <= status < 400
        if "tcpSocket" in probe:
            port = self._port(container, probe["tcpSocket"]["port"])

            def connect() -> bool:
                try:
                    socket.create_connection((self.pod_net.ip, port), timeout=timeout).close()
                except OSError:
                    return False
                return True

            answer: bool = self.node.ns.in_namespace(connect)
            return answer
        raise ValueError(f"{container['name']}: probe kind not supported by the test pod runner")

    @staticmethod
    def _port(container: Mapping[str, Any], port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for item in container.get("ports", []):
            if item.get("name") == port:
                return int(item["containerPort"])
        raise ValueError(f"{container['name']}: no port named {port!r}")

    def _period(self, probe: Mapping[str, Any]) -> float:
        return float(probe.get("periodSeconds", 10)) if self.kubelet_timing else 0.1

    def _next_tick(self, probe: Mapping[str, Any], after: float) -> float:
        """The probe worker's next tick after ``after`` (ticks start when the pod is admitted)."""
        period = self._period(probe)
        ticks = int((after - self.admitted_at) / period) + 1
        return self.admitted_at + ticks * period

    def _post_start(self, container: Mapping[str, Any], proc: Proc) -> None:
        """The kubelet runs the hook in the container and starts nothing else until it returns;
        a failed hook gets the container killed."""
        hook = container.get("lifecycle", {}).get("postStart")
        if hook is None:
            return
        if "exec" not in hook:
            raise ValueError(f"{container['name']}: only exec postStart hooks are supported")
        command = hook["exec"]["command"]
        argv = [*self.sidemesh, *command[1:]] if command[:1] == ["sidemesh"] else list(command)
        uid, gid = self._user(container)
        hook_proc = self.ns.spawn(
            argv, uid=uid, gid=gid, mounts=self._mounts(container), env=self._env(container)
        )
        while hook_proc.running() and proc.running():
            time.sleep(0.01)
        if not proc.running():  # the container died: its hook is moot (the kubelet kills it)
            hook_proc.stop()
        code = hook_proc.popen.wait()
        if code != 0 or not proc.running():
            proc.stop()
            raise RuntimeError(
                f"{self.name}/{container['name']}: postStart hook failed ({code}): "
                f"{hook_proc.output()}\n{proc.output()}"
            )

    def _await_startup(self, container: Mapping[str, Any], proc: Proc) -> None:
        probe = container.get("startupProbe")
        if probe is None:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not proc.running():
                raise RuntimeError(
                    f"{self.name}/{container['name']} exited ({proc.popen.wait()}) before "
                    f"its startup probe passed:\n{proc.output()}"
                )
            if self.probe(container, probe):
                return
            time.sleep(max(0.0, self._next_tick(probe, time.monotonic()) - time.monotonic()))
        raise TimeoutError(f"{self.name}/{container['name']} never passed its startup probe")

    def start(self) -> None:
        """Volumes, init containers in order, then the app containers."""
        self.admitted_at = time.monotonic()
        self._make_volumes()
        for container in self.pod["spec"].get("initContainers", []):
            if container.get("restartPolicy") == "Always":
                proc = self._spawn(container)
                self._post_start(container, proc)
                self._await_startup(container, proc)
            else:
                self._run_to_completion(container)
        for container in self.pod["spec"]["containers"]:
            self._post_start(container, self._spawn(container))

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait for the pod's Ready condition (every sidecar and app container ready); return
        the seconds since :meth:`start` began. A container without a readiness probe is ready
        once started. Call it right after :meth:`start`: the last container just started,
        which is a status change, so every readiness probe runs at once."""
        spec = self.pod["spec"]
        containers = [
            *(c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"),
            *spec["containers"],
        ]
        pending = {c["name"]: (c, c["readinessProbe"]) for c in containers if "readinessProbe" in c}
        due = dict.fromkeys(pending, time.monotonic())  # the status update's immediate probe
        deadline = time.monotonic() + timeout
        while pending:
            name = min(due, key=due.__getitem__)
            time.sleep(max(0.0, due[name] - time.monotonic()))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not ready after {timeout}s: {sorted(pending)}")
            container, probe = pending[name]
            if self.probe(container, probe):
                del pending[name], due[name]
                now = time.monotonic()
                due = dict.fromkeys(due, now)  # a result changed: the status update probes all
            else:
                due[name] = self._next_tick(probe, time.monotonic())
        return time.monotonic() - self.admitted_at
