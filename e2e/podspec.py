"""What the node agent decides, as pure functions over plain dicts (the API's JSON shape).

Kept apart from the agent's I/O so tests check kubelet semantics without a cluster:
environment and $(VAR) expansion, probes, restart decisions, and the pod status
(phase, conditions, container statuses) reported to the API server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

Pod = dict[str, Any]
Container = dict[str, Any]

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet's $(VAR) expansion: defined names replaced, `$$` is a literal `$`,
    undefined references left untouched."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(sub, text)


class SpecError(ValueError):
    """A pod spec the agent cannot run; the message goes to the container's waiting state."""


def field_ref(pod: Pod, path: str, pod_ip: str) -> str:
    """The downward API fields a process can be told about."""
    meta = pod.get("metadata", {})
    values = {
        "status.podIP": pod_ip,
        "status.hostIP": "127.0.0.1",
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
    }
    if path in values:
        return values[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise SpecError(f"fieldRef {path!r} is not supported by the node agent")


def container_env(pod: Pod, container: Container, pod_ip: str) -> dict[str, str]:
    """The container's env list in order; each value may refer to earlier ones by $(NAME).

    Supported sources: value, fieldRef (see field_ref). configMap/secret refs are not
    resolved (an honest error rather than an empty value).
    """
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" in item and item["valueFrom"]:
            src = item["valueFrom"]
            if src.get("fieldRef"):
                env[name] = field_ref(pod, src["fieldRef"]["fieldPath"], pod_ip)
            else:
                kind = next(iter(src))
                raise SpecError(f"env {name}: valueFrom.{kind} is not supported by the node agent")
        else:
            env[name] = expand(item.get("value", ""), env)
    return env


def container_argv(container: Container, env: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expanded. There are no images, so without a command the
    args are run as the command line."""
    argv = [expand(a, env) for a in (container.get("command") or [])]
    argv += [expand(a, env) for a in (container.get("args") or [])]
    if not argv:
        raise SpecError(
            f"container {container.get('name')!r} has no command: images are not run here"
        )
    return argv


def pod_ip_for(base: str, index: int) -> str:
    """The index-th pod address in the node's 127.x.0.0/16 block (skipping .0 and .255)."""
    net = ipaddress.IPv4Network(base)
    hi, lo = divmod(index, 254)  # host bytes 1..254 in each /24
    if hi > 255:
        raise ValueError("no pod addresses left")
    return str(net.network_address + hi * 256 + lo + 1)


# --- probes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    kind: str  # httpGet | tcpSocket | exec
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    host: str = ""
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    command: tuple[str, ...] = ()


def resolve_port(port: int | str, container: Container) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise SpecError(f"probe port {port!r} names no port of container {container.get('name')!r}")


def parse_probe(spec: dict[str, Any] | None, container: Container) -> Probe | None:
    if not spec:
        return None
    common = {
        "initial_delay": float(spec.get("initialDelaySeconds", 0)),
        "period": float(spec.get("periodSeconds", 10)),
        "timeout": float(spec.get("timeoutSeconds", 1)),
        "failure_threshold": int(spec.get("failureThreshold", 3)),
        "success_threshold": int(spec.get("successThreshold", 1)),
    }
    if "httpGet" in spec:
        h = spec["httpGet"]
        return Probe(
            "httpGet",
            host=h.get("host", ""),
            port=resolve_port(h["port"], container),
            path=h.get("path", "/"),
            scheme=h.get("scheme", "HTTP"),
            **common,
        )
    if "tcpSocket" in spec:
        t = spec["tcpSocket"]
        return Probe(
            "tcpSocket", host=t.get("host", ""), port=resolve_port(t["port"], container), **common
        )
    if "exec" in spec:
        return Probe("exec", command=tuple(spec["exec"].get("command") or []), **common)
    raise SpecError(f"unsupported probe {sorted(spec)}")


@dataclass
class ProbeState:
    """Consecutive results against the thresholds, as the kubelet counts them."""

    probe: Probe
    result: bool | None = None  # None: no verdict yet
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    def record(self, ok: bool) -> bool | None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.probe.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.probe.failure_threshold:
                self.result = False
        return self.result


# --- restarts ------------------------------------------------------------------------


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Always":
        return True
    if restart_policy == "OnFailure":
        return exit_code != 0
    return False


def restart_backoff(restart_count: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Delay before the next start: doubles per restart. The kubelet uses 10 s to 5 min;
    shorter here so tests see crash loops quickly."""
    return min(cap, base * (2 ** max(0, restart_count - 1)))


# --- status --------------------------------------------------------------------------


@dataclass
class ContainerView:
    """What the agent knows about one container, in the shape the status needs."""

    name: str
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "Pending"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    restart_count: int = 0
    started: bool = False
    finished: bool = False  # terminated and will not be restarted
    exit_code: int | None = None


def _condition(kind: str, ok: bool, now: str, previous: dict[str, dict], reason: str = "") -> dict:
    status = "True" if ok else "False"
    prev = previous.get(kind)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == status else now
    cond = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_phase(containers: list[ContainerView]) -> str:
    if containers and all(c.finished for c in containers):
        return "Succeeded" if all(c.exit_code == 0 for c in containers) else "Failed"
    if any(c.started for c in containers):
        return "Running"
    return "Pending"


def pod_status(
    containers: list[ContainerView],
    pod_ip: str,
    start_time: str,
    now: str,
    previous_conditions: list[dict] | None = None,
    message: str = "",
) -> dict[str, Any]:
    """The pod's .status as the kubelet would write it."""
    previous = {c["type"]: c for c in (previous_conditions or [])}
    all_ready = bool(containers) and all(c.ready for c in containers)
    phase = pod_phase(containers)
    reason = "" if all_ready else "ContainersNotReady"
    conditions = [
        _condition("Initialized", True, now, previous),
        _condition("Ready", all_ready, now, previous, reason),
        _condition("ContainersReady", all_ready, now, previous, reason),
        _condition("PodScheduled", True, now, previous),
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": "127.0.0.1",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": [
            {
                "name": c.name,
                "state": c.state,
                "lastState": c.last_state,
                "ready": c.ready,
                "restartCount": c.restart_count,
                "started": c.started and "running" in c.state,
                "image": "",
                "imageID": "",
                "containerID": "",
            }
            for c in containers
        ],
    }
    if message:
        status["message"] = message
    return status
