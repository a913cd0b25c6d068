"""Desired objects for a pool: the worker Pod manifest, its spec hash, the headless Service.

Pure: a spec in, API-shaped dicts (camelCase, as `kubectl get -o json` shows them) out.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from typing import Any

from shoal.operator.spec import API_VERSION, KIND, DeploymentSpec

# Label and annotation keys shared with the gateway and the node agent (DESIGN conventions).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "shoal.dev/deployment"
LABEL_MODEL = "shoal.dev/model"
LABEL_SPEC_HASH = "shoal.dev/spec-hash"
ANNOTATION_DRAINING = "shoal.dev/draining"
# Drain by migration (docs/drain.md): a person asks with `drain: "true"`; the operator records
# the drain it runs in `drain-started` (RFC 3339) and `drain-reason` (ScaleDown | Manual), so a
# restarted operator carries on. `draining` alone (set by hand) only stops new requests.
ANNOTATION_DRAIN = "shoal.dev/drain"
ANNOTATION_DRAIN_STARTED = "shoal.dev/drain-started"
ANNOTATION_DRAIN_REASON = "shoal.dev/drain-reason"
# The exact served model name (a label value cannot hold '/' or more than 63 chars).
ANNOTATION_MODEL = "shoal.dev/served-model-name"
WORKER_APP = "shoal-worker"
MANAGER = "shoal-operator"

CONTAINER = "worker"
PORT = 8000
GRPC_PORT = 50051  # the worker's control and migration service (shoal.v1)
DEFAULT_IMAGE = "shoal:latest"  # the local node agent ignores images; real clusters set one
DEFAULT_COMMAND = ("shoal", "serve")
# Loading a large checkpoint takes minutes and /health is 503 until it is done; liveness
# must not kill a worker that is still loading.
LIVENESS_INITIAL_DELAY_S = 300
TERMINATION_GRACE_S = 30


def selector(name: str) -> dict[str, str]:
    """Labels that select every worker of one pool."""
    return {LABEL_NAME: WORKER_APP, LABEL_DEPLOYMENT: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(name).items())


def pods_selector(name: str) -> str:
    """Every pod reconcile must see for `name`: ours, and strays wearing our label."""
    return f"{LABEL_DEPLOYMENT}={name}"


def label_value(text: str) -> str:
    """A valid label value derived from free text (served model names may hold '/')."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return value.strip("-._") or "unnamed"


def spec_hash(spec: DeploymentSpec) -> str:
    """Hash of everything that shapes a worker pod (not replicas): a change means a roll."""
    relevant = {"model": asdict(spec.model), "runtime": asdict(spec.runtime)}
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def worker_args(name: str, spec: DeploymentSpec) -> list[str]:
    """`shoal serve` arguments; `$(POD_IP)` is expanded by the kubelet (or the node agent).

    `--pool` is the ModelDeployment's name: the `pool` label on the worker's metrics.
    """
    m, e = spec.model, spec.runtime.engine
    args = ["--model", m.path, "--served-model-name", m.name, "--host", "$(POD_IP)"]
    args += ["--port", str(PORT), "--grpc-port", str(GRPC_PORT), "--pool", name]
    if m.dtype != "auto":
        args += ["--dtype", m.dtype]
    flags = {
        "--max-model-len": m.max_model_len,
        "--max-num-seqs": e.max_num_seqs,
        "--max-num-batched-tokens": e.max_num_batched_tokens,
        "--block-size": e.block_size,
        "--num-kv-blocks": e.num_kv_blocks,
    }
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    if e.enable_prefix_caching is False:  # on by default in the runtime
        args.append("--no-prefix-caching")
    return args + list(spec.runtime.args)


def worker_pod(name: str, namespace: str, uid: str, spec: DeploymentSpec) -> dict[str, Any]:
    """The Pod manifest of one worker; the API server picks the `<name>-xxxxx` suffix."""
    http_get = {"path": "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.runtime.image or DEFAULT_IMAGE,
        "command": list(spec.runtime.command or DEFAULT_COMMAND),
        "args": worker_args(name, spec),
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            *[dict(x) for x in spec.runtime.env],
        ],
        "ports": [
            {"name": "http", "containerPort": PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": http_get,
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": http_get,
            "initialDelaySeconds": LIVENESS_INITIAL_DELAY_S,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }
    if spec.runtime.resources:
        # Quantities as strings, the API's canonical form ("64", not 64).
        container["resources"] = {
            kind: {res: str(qty) for res, qty in amounts.items()}
            for kind, amounts in spec.runtime.resources.items()
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{name}-",
            "namespace": namespace,
            "labels": {
                **selector(name),
                LABEL_MANAGED_BY: MANAGER,
                LABEL_MODEL: label_value(spec.model.name),
                LABEL_SPEC_HASH: spec_hash(spec),
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(PORT),
                "prometheus.io/path": "/metrics",
                ANNOTATION_MODEL: spec.model.name,
            },
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
            "containers": [container],
        },
    }


def worker_service(name: str, namespace: str, uid: str) -> dict[str, Any]:
    """Headless Service `<name>-workers`: DNS discovery of a pool's workers."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"{name}-workers",
            "namespace": namespace,
            "labels": {LABEL_DEPLOYMENT: name, LABEL_MANAGED_BY: MANAGER},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector(name),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
            # Discovery should see workers that are still loading, too.
            "publishNotReadyAddresses": True,
        },
    }
