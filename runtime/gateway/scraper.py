"""Polls each worker's /metrics so routing knows its queue and KV usage."""

from __future__ import annotations

import asyncio
import logging

import httpx

from shoal.runtime.gateway.adapters_io import scrape_adapters
from shoal.runtime.gateway.load import parse_worker_load
from shoal.runtime.gateway.state import GatewayState

log = logging.getLogger("shoal.gateway.scraper")


async def scrape_once(state: GatewayState, client: httpx.AsyncClient, timeout: float) -> None:
    endpoints = state.endpoints()

    async def one(endpoint: str) -> None:
        try:
            response = await client.get(f"{endpoint}/metrics", timeout=timeout)
            response.raise_for_status()
            state.record_load(endpoint, parse_worker_load(response.text))
        except (httpx.HTTPError, ValueError) as exc:
            # No figure is better than a wrong one: routing falls back to in-flight counts.
            log.debug("no load from %s: %s", endpoint, exc)
            state.forget_load(endpoint)
        await scrape_adapters(state.adapters, client, endpoint, timeout)

    await asyncio.gather(*(one(ep) for ep in endpoints))
    for gone in state.loaded_endpoints() - endpoints:  # workers that left their pool
        state.forget_load(gone)
    state.adapters.retain(endpoints)


async def scrape_forever(state: GatewayState, client: httpx.AsyncClient, interval: float) -> None:
    while True:
        try:
            await scrape_once(state, client, timeout=max(0.2, min(interval, 2.0)))
        except Exception:  # a scraper bug must not take the gateway down
            log.exception("worker metrics scrape failed")
        await asyncio.sleep(interval)
