"""The gateway's calls to a worker's adapter admin API: read what it holds (next to the
/metrics scrape) and load an adapter on demand. Concurrent requests for the same load on
the same worker share one call."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from fastapi.responses import Response

from shoal.runtime.gateway import errors
from shoal.runtime.gateway.adapters import AdapterRegistry, parse_held
from shoal.runtime.gateway.pools import Pool, Worker

if TYPE_CHECKING:
    from shoal.runtime.gateway.adapters_metrics import AdapterMetrics
    from shoal.runtime.gateway.state import GatewayState

log = logging.getLogger("shoal.gateway.adapters")

LOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LoadRefused:
    """The worker's answer to a load it refused (its status and OpenAI-style body)."""

    status: int
    body: bytes
    reason: str


async def scrape_adapters(
    registry: AdapterRegistry, client: httpx.AsyncClient, endpoint: str, timeout: float
) -> None:
    """Record what `endpoint` holds; a worker without the admin API holds nothing."""
    try:
        response = await client.get(f"{endpoint}/v1/lora_adapters", timeout=timeout)
        if response.status_code == 404:
            registry.record_held(endpoint, [])
            return
        response.raise_for_status()
        registry.record_held(endpoint, parse_held(response.json()))
    except (httpx.HTTPError, ValueError) as exc:
        # Keep the last view: a missed scrape should not send requests away from holders.
        log.debug("no adapter list from %s: %s", endpoint, exc)


class OnDemandLoader:
    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry
        self._pending: dict[tuple[str, str], asyncio.Future[LoadRefused | None]] = {}

    async def ensure(
        self, client: httpx.AsyncClient, endpoint: str, name: str, path: str
    ) -> tuple[LoadRefused | None, float]:
        """Load `name` from `path` on `endpoint`; (None, seconds) when it is loaded."""
        key = (endpoint, name)
        started = time.perf_counter()
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), time.perf_counter() - started
        future: asyncio.Future[LoadRefused | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            result = await self._load(client, endpoint, name, path)
            future.set_result(result)
        except BaseException as exc:  # cancelled with waiters: they must not hang
            future.set_result(LoadRefused(502, b"", f"load interrupted: {exc!r}"))
            raise
        finally:
            del self._pending[key]
        return result, time.perf_counter() - started

    async def _load(
        self, client: httpx.AsyncClient, endpoint: str, name: str, path: str
    ) -> LoadRefused | None:
        try:
            response = await client.post(
                f"{endpoint}/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": path},
                timeout=LOAD_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            return LoadRefused(502, b"", f"{type(exc).__name__}: {exc}")
        if response.status_code >= 400:
            return LoadRefused(response.status_code, response.content, response.text[:300])
        self._registry.add_held(endpoint, name, path)
        log.info("loaded adapter %s on %s on demand", name, endpoint)
        return None


async def choose_adapter_worker(
    state: GatewayState,
    loader: OnDemandLoader,
    client: httpx.AsyncClient,
    metrics: AdapterMetrics,
    adapter: str,
    pool: Pool,
    tried: set[str],
) -> Worker | Response | None:
    """The worker for one try of an adapter request, loading the adapter there first when
    no holder can take it. A Response when the load failed and no holder is left (the
    worker's own 4xx, e.g. `lora_rank_too_large`); None when no worker is left to try."""
    route = state.choose_for_adapter(pool, adapter, tried)
    if route is None:
        return None
    base = pool.model
    if not route.needs_load:
        metrics.routes.labels(base, adapter, "holder").inc()
        return route.worker
    path = state.adapters.path_of(adapter)
    refused: LoadRefused | None = None
    if path:
        refused, seconds = await loader.ensure(client, route.worker.endpoint, adapter, path)
        if refused is None:
            metrics.loads.labels(base, adapter, "ok").inc()
            metrics.load_seconds.labels(base, adapter).observe(seconds)
            metrics.routes.labels(base, adapter, "on_demand").inc()
            return route.worker
        metrics.loads.labels(base, adapter, "failed").inc()
        log.warning(
            "loading adapter %s on %s on demand failed: %s",
            adapter,
            route.worker.name,
            refused.reason,
        )
    # No load possible (the path is unknown: the adapter was loaded by hand and is gone
    # now) or it failed: a holder left takes it, saturated or not.
    holders = state.adapters.holders(adapter)
    holding = Pool(base, tuple(w for w in pool.workers if w.endpoint in holders))
    fallback = state.choose(holding, tried)
    if fallback is not None:
        metrics.routes.labels(base, adapter, "fallback").inc()
        return fallback
    if refused is None:
        return errors.model_not_found(adapter)
    if 400 <= refused.status < 500 and refused.body:
        return Response(refused.body, refused.status, media_type="application/json")
    return errors.upstream_failed(adapter, 1, f"loading the adapter failed: {refused.reason}")
