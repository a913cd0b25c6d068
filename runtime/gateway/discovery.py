"""Keeps the gateway's pools current: from the Kubernetes API, or from a static list.

Kubernetes discovery lists then watches two kinds (worker pods, ModelDeployments), each in
its own daemon thread, and relists after any error (an expired resourceVersion, a dropped
connection, an apiserver restart). Every change rebuilds the pools from the two local
stores with the pure ``build_pools``, so the view is level-based: nothing depends on
having seen every event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from shoal.runtime.gateway.adapters import declared_adapters
from shoal.runtime.gateway.pools import WORKER_LABEL_SELECTOR, Pool, build_pools
from shoal.runtime.gateway.state import GatewayState

log = logging.getLogger("shoal.gateway.discovery")

GROUP, VERSION, PLURAL = "shoal.dev", "v1alpha1", "modeldeployments"
WATCH_TIMEOUT_S = 60  # server-side: every watch ends and is renewed at least this often
RETRY_BACKOFF_S = (0.5, 1, 2, 5)


class Discovery(Protocol):
    def start(self, state: GatewayState) -> None: ...
    def stop(self) -> None: ...
    def describe(self) -> str: ...


class StaticDiscovery:
    """Fixed pools from ``--static MODEL=URL[,URL...]``: for local use and tests."""

    def __init__(self, pools: dict[str, Pool]) -> None:
        self._pools = pools

    def start(self, state: GatewayState) -> None:
        state.set_pools(self._pools)

    def stop(self) -> None:
        pass

    def describe(self) -> str:
        return "static: " + "; ".join(
            f"{m}={','.join(w.endpoint for w in p.workers)}" for m, p in self._pools.items()
        )


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


class _Watcher:
    """List-then-watch one kind into a dict store, calling ``changed`` after each change."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        to_dict: Callable[[Any], dict[str, Any]],
        changed: Callable[[], None],
        stop_event: threading.Event,
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._to_dict = to_dict
        self._changed = changed
        self._stop = stop_event
        self.store: dict[tuple[str, str], dict[str, Any]] = {}
        self.listed = False
        self._watch: Any = None
        self.thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        failures = 0
        while not self._stop.is_set():
            try:
                listing = self._list_fn()
                items, rv = self._items(listing)
                self.store = {_key(o): o for o in items}
                self.listed = True
                self._changed()
                failures = 0
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self._list_fn, resource_version=rv, timeout_seconds=WATCH_TIMEOUT_S
                ):
                    if self._stop.is_set():
                        return
                    self._apply(event)
                # A watch that ends normally is renewed by relisting: simple and level-based.
            except ApiException as exc:
                if self._stop.is_set():
                    return
                if exc.status == 404 and self.kind == "modeldeployments":
                    # CRD not installed yet: run on pod labels alone until it appears.
                    log.warning("ModelDeployment CRD not found; retrying (pods still routed)")
                    self.store, self.listed = {}, True
                    self._changed()
                elif exc.status != 410:  # 410 Gone: resourceVersion too old, just relist
                    log.warning(
                        "%s watch failed (%s %s); relisting", self.kind, exc.status, exc.reason
                    )
                failures += 1
            except Exception as exc:  # connection refused, reset, timeouts, bad JSON...
                if self._stop.is_set():
                    return  # the stream was cut because we are stopping
                log.warning("%s watch failed (%s); relisting", self.kind, exc)
                failures += 1
            if failures:
                self._stop.wait(RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S)) - 1])

    def _items(self, listing: Any) -> tuple[list[dict[str, Any]], str | None]:
        if isinstance(listing, dict):  # custom objects come back as plain dicts
            return list(listing.get("items") or []), (listing.get("metadata") or {}).get(
                "resourceVersion"
            )
        items = [self._to_dict(o) for o in listing.items]
        return items, listing.metadata.resource_version

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object")
        if kind == "ERROR":
            raise RuntimeError(f"watch error event: {obj}")
        if not isinstance(obj, dict):
            obj = self._to_dict(obj)
        if kind == "DELETED":
            self.store.pop(_key(obj), None)
        else:
            self.store[_key(obj)] = obj
        self._changed()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()


class KubernetesDiscovery:
    """Watches worker pods and ModelDeployments in one namespace, or in all (None)."""

    def __init__(self, api_client: Any, namespace: str | None) -> None:
        from kubernetes import client

        self._api_client = api_client
        self.namespace = namespace
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state: GatewayState | None = None
        to_dict = api_client.sanitize_for_serialization
        self._pods = _Watcher("pods", self._list_pods, to_dict, self._changed, self._stop)
        self._mdeps = _Watcher(
            "modeldeployments", self._list_mdeps, to_dict, self._changed, self._stop
        )

    def _list_pods(self, **kwargs: Any) -> Any:
        kwargs["label_selector"] = WORKER_LABEL_SELECTOR
        if self.namespace:
            return self._core.list_namespaced_pod(self.namespace, **kwargs)
        return self._core.list_pod_for_all_namespaces(**kwargs)

    def _list_mdeps(self, **kwargs: Any) -> Any:
        if self.namespace:
            return self._custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, **kwargs
            )
        return self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)

    def _changed(self) -> None:
        with self._lock:  # two watcher threads: rebuild one at a time
            if self._state is None or not (self._pods.listed and self._mdeps.listed):
                return
            mdeps = list(self._mdeps.store.values())
            pools = build_pools(mdeps, list(self._pods.store.values()))
            before = self._state.pools
            self._state.adapters.set_declared(declared_adapters(mdeps))
            self._state.set_pools(pools)
        if _summary(before) != _summary(pools):
            log.info("pools: %s", _summary(pools) or "none")

    def start(self, state: GatewayState) -> None:
        self._state = state
        self._pods.thread.start()
        self._mdeps.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pods.stop()
        self._mdeps.stop()

    def describe(self) -> str:
        host = self._api_client.configuration.host
        return f"kubernetes {host}, namespace {self.namespace or '(all)'}"


def _summary(pools: dict[str, Pool]) -> str:
    return ", ".join(f"{m} ({len(p.workers)} ready)" for m, p in pools.items())
