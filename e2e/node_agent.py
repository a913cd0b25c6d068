"""A kubelet stand-in for machines without a container runtime.

What it is: a small Python process that registers one Node, keeps its status and Lease
fresh, and runs the pods the scheduler binds to it as plain local processes. What it is
not: a kubelet. There are no images (the `image` field is ignored), no container
isolation, no volumes, no resource enforcement (capacity is declared, not measured), no
`kubectl logs`/`exec`/`port-forward` (each container's log is a file under the state dir),
no init containers.

What it does do, with kubelet semantics:
- each pod gets its own loopback address 127.x.y.z as pod IP (Linux routes all of
  127.0.0.0/8 to lo, so servers bound to it are reachable and ports never collide
  between pods);
- each container runs `command + args` (with $(VAR) expanded from its env, and the
  downward API fields status.podIP, metadata.name, metadata.namespace, ...) in its own
  process group, with the Shoal venv's bin/ first on PATH, KUBERNETES_SERVICE_HOST/PORT
  pointing at the local apiserver and, when the pod has a service-account token, a
  KUBECONFIG file carrying that token (in-cluster config needs a fixed path we cannot
  mount without containers);
- readiness and liveness probes (httpGet, tcpSocket, exec), restartPolicy with a doubling
  back-off (from 1 s, capped at 30 s: shorter than the kubelet's 10 s..5 min), status
  with phase, conditions, podIP and containerStatuses through the status subresource;
- on graceful deletion SIGTERM to each process group, SIGKILL after the grace period,
  then the final delete with grace 0 (what a kubelet does, or the pod stays Terminating).

Run: python -m shoal.e2e.node_agent --kubeconfig FILE --node-name NAME --state-dir DIR
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from shoal.e2e import podspec
from shoal.e2e.configs import kubeconfig as kubeconfig_text
from shoal.e2e.podspec import ContainerView, ProbeState, SpecError

log = logging.getLogger("shoal.e2e.node_agent")

HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 40
SYNC_SECONDS = 0.5
# Probes target loopback pod IPs: never through an http_proxy from the environment.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def venv_bin() -> str:
    return str(Path(sys.executable).parent)


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class ContainerRun:
    spec: dict[str, Any]
    view: ContainerView
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    started_at: str = ""
    running_since: float = 0.0
    next_start: float = 0.0
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    killing_until: float = 0.0  # liveness kill in progress: SIGKILL after this


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    pod: dict[str, Any]
    ip: str
    dir: Path
    start_time: str
    containers: list[ContainerRun] = field(default_factory=list)
    message: str = ""
    last_status: str = ""
    terminating_since: float = 0.0
    kill_at: float = 0.0


class NodeAgent:
    def __init__(
        self,
        api: client.ApiClient,
        node_name: str,
        state_dir: Path,
        pod_cidr: str,
        capacity: dict[str, str],
        apiserver_url: str,
        ca_file: Path,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.node = node_name
        self.dir = state_dir
        self.pod_cidr = pod_cidr
        self.capacity = capacity
        self.apiserver_url = apiserver_url
        self.ca_file = ca_file
        self.lock = threading.Lock()
        self.desired: dict[str, dict[str, Any]] = {}  # uid -> pod JSON, from the watch
        self.runs: dict[str, PodRun] = {}
        self.used_ips: set[str] = set()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.pids_file = state_dir / "pod-pids.json"

    # --- node registration and heartbeats ------------------------------------------

    def node_status(self) -> dict[str, Any]:
        t = now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "not measured"),
                cond("Ready", "True", "KubeletReady", "shoal node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "shoal node agent (processes, no containers)",
                "containerRuntimeVersion": "process://none",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "shoal.dev/node-agent": "true",
                },
            },
            "spec": {},
            "status": self.node_status(),
        }
        try:
            self.core.create_node(body)
            log.info("registered node %s with capacity %s", self.node, self.capacity)
        except ApiException as e:
            if e.status != 409:
                raise
            log.info("node %s already registered; taking it over", self.node)
        self.heartbeat()

    def heartbeat(self) -> None:
        self.core.patch_node_status(self.node, {"status": self.node_status()})
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro(),
            },
        }
        try:
            self.coord.patch_namespaced_lease(self.node, "kube-node-lease", {"spec": lease["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", lease)

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except Exception as e:  # keep beating; the next one may get through
                log.warning("heartbeat failed: %s", e)

    # --- watching pods ---------------------------------------------------------------

    def watch_loop(self) -> None:
        """Level-triggered: a full list, then a watch from its resourceVersion; on any
        error or expiry, list again."""
        selector = f"spec.nodeName={self.node}"
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                pods = self.api.sanitize_for_serialization(listing.items)
                with self.lock:
                    self.desired = {p["metadata"]["uid"]: p for p in pods}
                self.wake.set()
                w = watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=60,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    uid = pod["metadata"]["uid"]
                    with self.lock:
                        if ev["type"] == "DELETED":
                            self.desired.pop(uid, None)
                        else:
                            self.desired[uid] = pod
                    self.wake.set()
            except Exception as e:
                if not self.stopping.is_set():
                    log.warning("pod watch interrupted (%s); listing again", e)
                    time.sleep(1)

    # --- running pods ----------------------------------------------------------------

    def allocate_ip(self) -> str:
        i = 0
        while True:
            ip = podspec.pod_ip_for(self.pod_cidr, i)
            if ip not in self.used_ips:
                self.used_ips.add(ip)
                return ip
            i += 1

    def token_kubeconfig(self, run: PodRun) -> Path | None:
        """A kubeconfig with the pod's service-account token, if it has one mounted."""
        for vol in run.pod["spec"].get("volumes") or []:
            secret = (vol.get("secret") or {}).get("secretName", "")
            if "-token-" not in secret:
                continue
            try:
                s = self.core.read_namespaced_secret(secret, run.namespace)
            except ApiException as e:
                log.warning("pod %s/%s: cannot read %s: %s", run.namespace, run.name, secret, e)
                return None
            token = base64.b64decode((s.data or {}).get("token", "")).decode()
            if not token:
                return None
            path = run.dir / "kubeconfig"
            text = kubeconfig_text(
                self.apiserver_url, self.ca_file, f"{run.namespace}-{secret}", token=token
            )
            path.write_text(text)
            path.chmod(0o600)
            return path
        return None

    def new_run(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            pod=pod,
            ip=self.allocate_ip(),
            dir=self.dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}",
            start_time=now_rfc3339(),
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        if pod["spec"].get("initContainers"):
            run.message = "init containers are not supported by the shoal node agent"
        for c in pod["spec"]["containers"]:
            cr = ContainerRun(spec=c, view=ContainerView(name=c["name"]))
            cr.log_path = run.dir / f"{c['name']}.log"
            try:
                cr.readiness = self._probe_state(c.get("readinessProbe"), c)
                cr.liveness = self._probe_state(c.get("livenessProbe"), c)
            except SpecError as e:
                run.message = str(e)
            run.containers.append(cr)
        log.info(
            "pod %s/%s: admitted with IP %s (logs in %s)", run.namespace, run.name, run.ip, run.dir
        )
        return run

    @staticmethod
    def _probe_state(spec: dict | None, container: dict) -> ProbeState | None:
        probe = podspec.parse_probe(spec, container)
        return ProbeState(probe) if probe else None

    def base_env(self, run: PodRun) -> dict[str, str]:
        host, _, port = self.apiserver_url.removeprefix("https://").partition(":")
        env = {
            "PATH": venv_bin() + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": run.name,
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "PYTHONUNBUFFERED": "1",
        }
        for passthrough in ("SHOAL_CACHE", "TMPDIR", "VIRTUAL_ENV", "HF_HUB_OFFLINE"):
            if passthrough in os.environ:
                env[passthrough] = os.environ[passthrough]
        kc = self.token_kubeconfig(run)
        if kc:
            env["KUBECONFIG"] = str(kc)
        return env

    def start_container(self, run: PodRun, cr: ContainerRun) -> None:
        try:
            own = podspec.container_env(run.pod, cr.spec, run.ip)
            argv = podspec.container_argv(cr.spec, own)
        except SpecError as e:
            cr.view.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            cr.next_start = float("inf")
            run.message = str(e)
            return
        env = {**self.base_env(run), **own}
        cwd = cr.spec.get("workingDir") or str(run.dir)
        if not Path(cwd).is_dir():
            cwd = str(run.dir)
        assert cr.log_path is not None
        with open(cr.log_path, "ab") as logf:  # the child keeps its own descriptor
            logf.write(f"--- {now_rfc3339()} starting: {json.dumps(argv)}\n".encode())
            logf.flush()
            try:
                cr.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except OSError as e:
                logf.write(f"--- cannot start: {e}\n".encode())
                cr.proc = None
        if cr.proc is None:
            cr.view.state = {"waiting": {"reason": "RunContainerError", "message": str(argv[0])}}
            self.container_exited(run, cr, 128)
            return
        cr.started_at = now_rfc3339()
        cr.running_since = time.monotonic()
        cr.view.state = {"running": {"startedAt": cr.started_at}}
        cr.view.started = True
        cr.view.ready = cr.readiness is None
        for ps in (cr.readiness, cr.liveness):
            if ps:
                ps.result, ps.successes, ps.failures = None, 0, 0
                ps.next_at = cr.running_since + ps.probe.initial_delay
        self.save_pids()
        log.info("pod %s/%s: container %s started (pid %d): %s", run.namespace, run.name,
                 cr.view.name, cr.proc.pid, " ".join(argv))  # fmt: skip

    def container_exited(self, run: PodRun, cr: ContainerRun, code: int) -> None:
        finished = now_rfc3339()
        reason = "Completed" if code == 0 else "Error"
        term = {
            "exitCode": code,
            "reason": reason,
            "startedAt": cr.started_at or finished,
            "finishedAt": finished,
        }
        cr.proc = None
        cr.view.ready = False
        cr.view.exit_code = code
        cr.killing_until = 0.0
        policy = run.pod["spec"].get("restartPolicy", "Always")
        if run.terminating_since or not podspec.should_restart(policy, code):
            cr.view.state = {"terminated": term}
            cr.view.finished = True
            log.info(
                "pod %s/%s: container %s exited %d", run.namespace, run.name, cr.view.name, code
            )
            return
        cr.view.last_state = {"terminated": term}
        cr.view.restart_count += 1
        delay = podspec.restart_backoff(cr.view.restart_count)
        cr.next_start = time.monotonic() + delay
        cr.view.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:.0f}s restarting failed container",
            }
        }
        log.info("pod %s/%s: container %s exited %d; restart %d in %.0f s", run.namespace,
                 run.name, cr.view.name, code, cr.view.restart_count, delay)  # fmt: skip

    def probe_once(self, run: PodRun, cr: ContainerRun, ps: ProbeState) -> bool:
        p = ps.probe
        host = p.host or run.ip
        try:
            if p.kind == "httpGet":
                url = f"{p.scheme.lower()}://{host}:{p.port}{p.path}"
                with NO_PROXY.open(url, timeout=p.timeout) as resp:
                    return 200 <= resp.status < 400
            if p.kind == "tcpSocket":
                with socket.create_connection((host, p.port), timeout=p.timeout):
                    return True
            if p.kind == "exec":
                r = subprocess.run(list(p.command), timeout=p.timeout, capture_output=True)
                return r.returncode == 0
        except urllib.error.HTTPError as e:
            return 200 <= e.code < 400
        except (OSError, subprocess.SubprocessError, ValueError):
            return False
        return False

    def sync_container(self, run: PodRun, cr: ContainerRun, now: float) -> None:
        if cr.proc is not None:
            code = cr.proc.poll()
            if code is not None:
                if code < 0:  # killed by a signal: shell convention 128+N
                    code = 128 - code
                self.container_exited(run, cr, code)
                return
            if cr.killing_until and now >= cr.killing_until:
                kill_group(cr.proc.pid, signal.SIGKILL)
            for ps, is_live in ((cr.readiness, False), (cr.liveness, True)):
                if ps is None or now < ps.next_at or cr.killing_until:
                    continue
                ps.next_at = now + ps.probe.period
                verdict = ps.record(self.probe_once(run, cr, ps))
                if not is_live:
                    cr.view.ready = bool(verdict)
                elif verdict is False:
                    log.info("pod %s/%s: container %s failed its liveness probe; killing it",
                             run.namespace, run.name, cr.view.name)  # fmt: skip
                    kill_group(cr.proc.pid, signal.SIGTERM)
                    cr.killing_until = now + self.grace(run)
            return
        if cr.view.finished or run.terminating_since or run.message and not cr.view.started:
            if run.message and not cr.view.started and not cr.view.finished:
                cr.view.state = {
                    "waiting": {"reason": "CreateContainerError", "message": run.message}
                }
            return
        if now >= cr.next_start:
            self.start_container(run, cr)

    def grace(self, run: PodRun) -> float:
        meta_grace = run.pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        return float(run.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def stop_pod(self, run: PodRun, now: float) -> bool:
        """Drive a deleted pod down; True once every process is gone."""
        if not run.terminating_since:
            run.terminating_since = now
            run.kill_at = now + self.grace(run)
            for cr in run.containers:
                if cr.proc is not None:
                    kill_group(cr.proc.pid, signal.SIGTERM)
            log.info("pod %s/%s: deleting; SIGTERM sent, SIGKILL in %.0f s",
                     run.namespace, run.name, self.grace(run))  # fmt: skip
        alive = False
        for cr in run.containers:
            if cr.proc is None:
                continue
            code = cr.proc.poll()
            if code is None:
                alive = True
                if now >= run.kill_at:
                    kill_group(cr.proc.pid, signal.SIGKILL)
            else:
                self.container_exited(run, cr, code if code >= 0 else 128 - code)
        return not alive

    def report(self, run: PodRun) -> None:
        status = podspec.pod_status(
            [cr.view for cr in run.containers],
            run.ip,
            run.start_time,
            now_rfc3339(),
            previous_conditions=run.pod.get("status", {}).get("conditions"),
            message=run.message,
        )
        # Compare without timestamps that change on every call.
        key = json.dumps({k: v for k, v in status.items() if k != "conditions"}, sort_keys=True)
        key += json.dumps([(c["type"], c["status"]) for c in status["conditions"]])
        if key == run.last_status:
            return
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
            run.last_status = key
            run.pod.setdefault("status", {})["conditions"] = status["conditions"]
        except ApiException as e:
            if e.status != 404:
                log.warning(
                    "pod %s/%s: status update failed: %s", run.namespace, run.name, e.reason
                )

    def finish_deletion(self, run: PodRun) -> None:
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=run.uid)
        )
        try:
            self.core.delete_namespaced_pod(run.name, run.namespace, body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", run.namespace, run.name, e.reason)
        log.info("pod %s/%s: processes gone, deletion finished", run.namespace, run.name)

    def sync(self) -> None:
        now = time.monotonic()
        with self.lock:
            desired = dict(self.desired)
        for uid, pod in desired.items():
            run = self.runs.get(uid)
            if run is None:
                if pod["metadata"].get("deletionTimestamp"):
                    self.finish_deletion_of(pod)
                    continue
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this agent started: never run again
                run = self.runs[uid] = self.new_run(pod)
            else:
                # Keep our own view of conditions (for transition times); take the rest.
                conditions = run.pod.get("status", {}).get("conditions")
                run.pod = pod
                run.pod.setdefault("status", {})["conditions"] = conditions
            if pod["metadata"].get("deletionTimestamp"):
                if self.stop_pod(run, now):
                    self.finish_deletion(run)
                    self.forget(uid)
                continue
            for cr in run.containers:
                self.sync_container(run, cr, now)
            self.report(run)
        for uid in [u for u in self.runs if u not in desired]:
            run = self.runs[uid]  # gone from the API (force-deleted): stop at once
            run.pod["metadata"]["deletionGracePeriodSeconds"] = 0
            if self.stop_pod(run, now):
                self.forget(uid)

    def finish_deletion_of(self, pod: dict[str, Any]) -> None:
        """A terminating pod we never ran (e.g. from before a restart): nothing to stop."""
        meta = pod["metadata"]
        run = PodRun(meta["uid"], meta["namespace"], meta["name"], pod, "", Path("."), "")
        self.finish_deletion(run)

    def forget(self, uid: str) -> None:
        run = self.runs.pop(uid)
        self.used_ips.discard(run.ip)
        self.save_pids()

    def save_pids(self) -> None:
        """Process groups of running containers, so `dev-cluster down` can clean up even
        if this agent died without stopping them."""
        pids = [cr.proc.pid for r in self.runs.values() for cr in r.containers if cr.proc]
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.pids_file)

    def run_forever(self) -> None:
        self.register()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_loop, name="pod-watch", daemon=True).start()
        while not self.stopping.is_set():
            self.wake.wait(SYNC_SECONDS)
            self.wake.clear()
            try:
                self.sync()
            except Exception:
                log.exception("sync failed; retrying")
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every container process: SIGTERM, a short wait, then SIGKILL."""
        procs = [cr.proc for r in self.runs.values() for cr in r.containers if cr.proc]
        for p in procs:
            kill_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            kill_group(p.pid, signal.SIGKILL)
        self.pids_file.write_text("[]")
        log.info("node agent stopped (%d container processes ended)", len(procs))


def parse_capacity(items: list[str]) -> dict[str, str]:
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "8"}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"--capacity wants NAME=QUANTITY, got {item!r}")
        capacity[name] = value
    return capacity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True, type=Path)
    p.add_argument("--node-name", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument(
        "--pod-cidr", required=True, help="loopback block for pod IPs, e.g. 127.42.0.0/16"
    )
    p.add_argument("--apiserver", required=True, help="https://127.0.0.1:PORT")
    p.add_argument("--ca-file", required=True, type=Path)
    p.add_argument(
        "--capacity", action="append", default=[],
        help="NAME=QUANTITY, repeatable (defaults: cpu=32 memory=128Gi pods=110 nvidia.com/gpu=8)",
    )  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=str(args.kubeconfig))
    agent = NodeAgent(
        api, args.node_name, args.state_dir, args.pod_cidr,
        parse_capacity(args.capacity), args.apiserver, args.ca_file,
    )  # fmt: skip

    def stop(signum: int, _frame: Any) -> None:
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
