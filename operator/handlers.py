"""kopf wiring: every trigger funnels into `apply.sync`; deletion into `apply.delete_pool`.

Handlers are sync functions (kopf runs them in a thread pool) because the `kubernetes` client
is synchronous. They take their settings from kopf's `memo`, filled in by cli.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
from kubernetes import client

from shoal.operator import adapters_sync, apply, rebalance_io
from shoal.operator.adapters_admin import WorkerAdmin
from shoal.operator.cluster import load_kube_config
from shoal.operator.spec import GROUP, PLURAL, VERSION
from shoal.operator.workers import LABEL_DEPLOYMENT

# Level-triggered safety net: even with every watch event lost, the pool converges this often.
RESYNC_INTERVAL_S = 10.0
# How long deletion waits for workers to stop before letting the ModelDeployment go
# (the garbage collector and the node agent finish the job after that).
DELETE_WAIT_S = 120.0
DELETE_POLL_S = 1.0
# The autoscaler's tick (its finest interval); see on_autoscale.
AUTOSCALE_TICK_S = 2.0

log = logging.getLogger("shoal.operator")

# Adapter placement passes (operator/adapters_sync.py): a new worker gets its adapters within
# about this long after it turns Ready.
ADAPTER_INTERVAL_S = 3.0
# The rebalancer looks at each pool's load this often (when spec.migration.rebalance.enabled).
REBALANCE_INTERVAL_S = 5.0
_admin: WorkerAdmin | None = None


def _worker_admin() -> WorkerAdmin:
    global _admin
    if _admin is None:  # one pooled HTTP client for every pool's passes
        _admin = WorkerAdmin()
    return _admin


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations under our own prefix: the CRD's status schema is
    # ours (and structural, so kopf's `status.kopf` would be pruned).
    settings.persistence.finalizer = "shoal.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="shoal.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="shoal.dev", key="last-handled-configuration"
    )
    # We post our own Events (created/deleted worker, rejected spec); kopf only adds warnings.
    settings.posting.level = logging.WARNING
    # Sync handlers share one thread pool; a deletion waits in it for its workers to stop, so
    # leave room beyond kopf's small default (cores + 4) for everyone else.
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 300
    # kopf logs "Timer '...' succeeded." at INFO on every tick of every timer (several per
    # pool every few seconds); success is the normal case and failures are still logged.
    logging.getLogger("kopf.objects").addFilter(_not_timer_success)
    # One line per HTTP call to a worker (adapter passes) is noise; failures are logged.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings.watching.client_timeout = 330


def _not_timer_success(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Timer '") and message.endswith("' succeeded."))


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with exactly what our own client uses (in-cluster, or the kubeconfig given
    by --kubeconfig, KUBECONFIG or ~/.kube/config). Re-read on every call: kopf calls again
    when a token expires, and in-cluster tokens rotate."""
    load_kube_config(memo.kubeconfig)
    cfg = client.Configuration.get_default_copy()
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-on-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-on-create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-on-update")
def on_change(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _sync(memo, namespace, name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_INTERVAL_S, initial_delay=RESYNC_INTERVAL_S)
def on_timer(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _sync(memo, namespace, name)


@kopf.timer(GROUP, VERSION, PLURAL, id="adapters", interval=ADAPTER_INTERVAL_S, initial_delay=1.0)
def on_adapters_timer(
    name: str, namespace: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    # Its own timer, not the reconcile's: loads go over HTTP to workers and may take a while.
    if not spec.get("adapters") and "adapters" not in status:
        return  # never had adapters: not even a read of the API
    try:
        adapters_sync.sync_adapters(memo.cluster, _worker_admin(), namespace, name)
    except Exception as e:  # the next tick retries; say why in one line
        log.warning("%s/%s: adapter placement pass failed: %s", namespace, name, e)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="autoscale",
    interval=AUTOSCALE_TICK_S,
    field="spec.autoscaling",
    value=kopf.PRESENT,
)
def on_autoscale(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    # Each pool's own spec.autoscaling.intervalSeconds decides when it is evaluated; the tick
    # only bounds how late. Never retried by raising: the next tick is the retry.
    try:
        memo.autoscaler.tick(namespace, name)
    except Exception as e:
        log.warning("%s/%s: autoscaler evaluation failed: %s", namespace, name, e)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="rebalance",
    interval=REBALANCE_INTERVAL_S,
    initial_delay=REBALANCE_INTERVAL_S,
    when=lambda spec, **_: rebalance_io.enabled(spec),
)
def on_rebalance(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    # spec.migration.rebalance.enabled only; its cooldown and hysteresis live in the decision.
    try:
        rebalance_io.rebalance(memo.cluster, namespace, name)
    except Exception as e:  # the next tick retries
        log.warning("%s/%s: rebalance pass failed: %s", namespace, name, e)


@kopf.on.event("v1", "pods", labels={LABEL_DEPLOYMENT: kopf.PRESENT})
def on_pod_event(labels: dict[str, str], namespace: str, memo: kopf.Memo, **_: Any) -> None:
    # A worker appeared, changed (ready, crashed, unschedulable) or vanished: re-plan its pool.
    # Event handlers are not retried by kopf; the timer is the retry.
    try:
        apply.sync(memo.cluster, namespace, labels[LABEL_DEPLOYMENT], memo.check_source)
    except Exception as e:
        log.warning(
            "%s/%s: reconcile after a pod event failed: %s", namespace, labels[LABEL_DEPLOYMENT], e
        )


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # Waits here rather than by raising a retry: kopf logs retries as errors, and waiting for
    # workers to stop is the normal course of a deletion.
    where = f"{body.metadata.namespace}/{body.metadata.name}"
    deadline = time.monotonic() + DELETE_WAIT_S
    remaining = apply.delete_pool(memo.cluster, body)
    if remaining:
        log.info("%s: waiting for %d worker(s) to stop", where, remaining)
    while remaining and time.monotonic() < deadline:
        time.sleep(DELETE_POLL_S)
        remaining = apply.delete_pool(memo.cluster, body)
    if remaining:
        log.warning(
            "%s: %d worker(s) still stopping after %.0f s; the garbage collector finishes",
            where,
            remaining,
            DELETE_WAIT_S,
        )
    else:
        log.info("%s: every worker stopped; deleted", where)


def _sync(memo: kopf.Memo, namespace: str, name: str) -> None:
    try:
        apply.sync(memo.cluster, namespace, name, check_source=memo.check_source)
    except Exception as e:  # any API hiccup: kopf retries, with a readable line
        raise kopf.TemporaryError(f"reconcile of {namespace}/{name} failed: {e}", delay=5) from e
