"""Workers and pools, and how they are read from Kubernetes objects.

Everything here is pure: it takes plain dicts (the API's JSON, camelCase keys) and returns
immutable values, so discovery from the API and static configuration share one shape and
tests need no cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WORKER_LABEL_SELECTOR = "app.kubernetes.io/name=shoal-worker"
DEPLOYMENT_LABEL = "shoal.dev/deployment"
MODEL_LABEL = "shoal.dev/model"  # label-safe form of the name (org/llama -> org-llama)
MODEL_ANNOTATION = "shoal.dev/served-model-name"  # the exact served name
DRAINING_ANNOTATION = "shoal.dev/draining"
WORKER_PORT_NAME = "http"
DEFAULT_WORKER_PORT = 8000


@dataclass(frozen=True)
class Worker:
    """One routable model instance."""

    name: str  # pod name, or the URL itself in static mode
    endpoint: str  # base URL, e.g. http://127.0.0.5:8000 (no trailing slash)


@dataclass(frozen=True)
class Pool:
    """The workers that serve one model name. ``workers`` holds only routable ones."""

    model: str
    workers: tuple[Worker, ...] = ()


def parse_static(specs: Iterable[str]) -> dict[str, Pool]:
    """Parse ``MODEL=URL[,URL...]`` items (repeatable; the same model may repeat).

    Raises ValueError with a message a person can act on.
    """
    urls: dict[str, list[str]] = {}
    for spec in specs:
        model, sep, rest = spec.partition("=")
        model = model.strip()
        if not sep or not model:
            raise ValueError(f"--static {spec!r}: expected MODEL=URL[,URL...]")
        items = [u.strip().rstrip("/") for u in rest.split(",") if u.strip()]
        if not items:
            raise ValueError(f"--static {spec!r}: no worker URL after '='")
        for url in items:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--static {spec!r}: {url!r} is not an http(s) URL")
        bucket = urls.setdefault(model, [])
        bucket += [u for u in items if u not in bucket]
    return {
        model: Pool(model, tuple(Worker(name=u, endpoint=u) for u in endpoints))
        for model, endpoints in urls.items()
    }


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _worker_port(pod: Mapping[str, Any]) -> int:
    """The container port named ``http`` (the convention), else 8000."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == WORKER_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return DEFAULT_WORKER_PORT


def routable_worker(pod: Mapping[str, Any]) -> Worker | None:
    """The worker this pod offers, or None when it must not get traffic.

    Routable: Ready, has an IP, not being deleted, not annotated as draining.
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    if meta.get("deletionTimestamp"):
        return None  # terminating: its process is getting SIGTERM
    if str(annotations.get(DRAINING_ANNOTATION, "")).lower() == "true":
        return None
    ip = status.get("podIP")
    if not ip or status.get("phase") != "Running" or not _is_ready(pod):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return Worker(name=meta.get("name", ip), endpoint=f"http://{host}:{_worker_port(pod)}")


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def served_model(mdep: Mapping[str, Any]) -> str | None:
    """The served model name of a ModelDeployment (``spec.model.name``)."""
    name = ((mdep.get("spec") or {}).get("model") or {}).get("name")
    return str(name) if name else None


def build_pools(
    mdeps: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> dict[str, Pool]:
    """Pools by served model name, from ModelDeployments and worker pods.

    Every ModelDeployment names a pool even with no ready worker (so the gateway can tell
    "unknown model" (404) from "no ready worker" (503)). A pod joins the pool of the
    ModelDeployment named by its ``shoal.dev/deployment`` label in its namespace; a pod
    whose ModelDeployment is not (yet) seen falls back to its ``shoal.dev/served-model-name``
    annotation (the exact name), then its ``shoal.dev/model`` label.
    Two ModelDeployments serving the same name (e.g. in two namespaces) share one pool.
    """
    model_of: dict[tuple[str, str], str] = {}
    workers: dict[str, list[Worker]] = {}
    for mdep in mdeps:
        model = served_model(mdep)
        if model:
            model_of[_key(mdep)] = model
            workers.setdefault(model, [])
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        namespace = meta.get("namespace", "")
        model = (
            model_of.get((namespace, labels.get(DEPLOYMENT_LABEL, "")))
            or (meta.get("annotations") or {}).get(MODEL_ANNOTATION)
            or labels.get(MODEL_LABEL)
        )
        worker = routable_worker(pod)
        if not model or worker is None:
            continue
        workers.setdefault(model, []).append(worker)
    return {
        model: Pool(model, tuple(sorted(ws, key=lambda w: w.name)))
        for model, ws in sorted(workers.items())
    }
