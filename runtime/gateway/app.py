"""The gateway's FastAPI app: OpenAI endpoints proxied to the chosen worker.

A request is parsed only far enough to read ``model`` and ``stream``; its bytes go to the
worker unchanged. The worker's answer comes back unchanged too (4xx errors included),
except that a failure before the first byte (connection refused, 5xx, a dropped
connection) is retried on another worker of the pool. A streamed answer is relayed chunk
by chunk as the worker produces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.runtime.gateway import errors, follow
from shoal.runtime.gateway.adapters import adapter_card
from shoal.runtime.gateway.adapters_io import OnDemandLoader, choose_adapter_worker
from shoal.runtime.gateway.discovery import Discovery
from shoal.runtime.gateway.metrics import GatewayMetrics
from shoal.runtime.gateway.pools import Worker
from shoal.runtime.gateway.scraper import scrape_forever
from shoal.runtime.gateway.state import GatewayState

log = logging.getLogger("shoal.gateway")

WORKER_HEADER = "x-shoal-worker"  # which worker answered: for people debugging and tests
# Headers that describe one hop's connection, not the message: never forwarded.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "host",
    }
)
FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "authorization", "x-request-id")


@dataclass(frozen=True)
class _Failed:
    """A try that failed before the client saw anything, so another worker may take it."""

    reason: str
    response: Response | None = None  # the worker's 5xx, returned if every try fails
    penalize: bool = True  # False: the worker is fine, only our view of it was stale


@dataclass(frozen=True)
class GatewayConfig:
    max_attempts: int = 3  # workers tried per request (first try included)
    scrape_interval_s: float = 1.0
    connect_timeout_s: float = 5.0
    # Between two chunks of a response: a worker may think long before its first token.
    read_timeout_s: float = 600.0


def _response_headers(upstream: httpx.Response, worker: Worker) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    headers[WORKER_HEADER] = worker.name
    return headers


def create_app(
    discovery: Discovery,
    config: GatewayConfig | None = None,
    state: GatewayState | None = None,
) -> FastAPI:
    config = config or GatewayConfig()
    state = state or GatewayState()
    metrics = GatewayMetrics(state)
    loader = OnDemandLoader(state.adapters)
    clients: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        # No connection cap: the gateway must never queue requests the workers could take.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # trust_env=False: workers are reached directly at their pod IPs, never through
        # an HTTP(S)_PROXY that happens to be set in the gateway's environment.
        clients["upstream"] = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        clients["scrape"] = httpx.AsyncClient(trust_env=False)
        discovery.start(state)
        log.info("gateway discovery: %s", discovery.describe())
        scraper = asyncio.create_task(
            scrape_forever(state, clients["scrape"], config.scrape_interval_s)
        )
        try:
            yield
        finally:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper
            discovery.stop()
            for client in clients.values():
                await client.aclose()

    app = FastAPI(title="Shoal gateway", lifespan=lifespan)
    app.state.gateway = state
    app.state.metrics = metrics

    @app.get("/health")
    async def health() -> JSONResponse:
        pools = state.pools
        body = {
            "status": "ok" if state.synced else "starting",
            "models": len(pools),
            "ready_workers": sum(len(p.workers) for p in pools.values()),
        }
        return JSONResponse(body, status_code=200 if state.synced else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": 0, "owned_by": "shoal"}

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        data = [model_card(model) for model in sorted(state.pools)]
        data += [adapter_card(*a) for a in state.adapters.listed(state.pools)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        if model in state.pools:
            return JSONResponse(model_card(model))
        adapter = next((a for a in state.adapters.listed(state.pools) if a[0] == model), None)
        if adapter is None:
            return errors.model_not_found(model)
        return JSONResponse(adapter_card(*adapter))

    async def proxy(request: Request, path: str) -> Response:
        started = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _finish("", errors.bad_request(f"The request body is not valid JSON: {exc}"))
        if not isinstance(body, dict):
            return _finish("", errors.bad_request("The request body must be a JSON object."))
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _finish(
                "", errors.bad_request("`model` is required and must be a string.", "model")
            )
        if state.pool_for(model) is None:  # neither a base model nor a known adapter
            return _finish("", errors.model_not_found(model))
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
        headers["accept-encoding"] = "identity"  # relay bytes as they are
        return await _forward(model, path, raw, headers, bool(body.get("stream")), started)

    def _finish(model: str, response: Response, started: float | None = None) -> Response:
        metrics.requests.labels(model=model, code=str(response.status_code)).inc()
        if started is not None:
            metrics.latency.labels(model=model).observe(time.perf_counter() - started)
        return response

    async def _forward(
        model: str, path: str, raw: bytes, headers: dict[str, str], stream: bool, started: float
    ) -> Response:
        tried: set[str] = set()
        last: _Failed | None = None
        for attempt in range(config.max_attempts):
            pool = state.pool_for(model)  # re-read: the pool may change between attempts
            if pool is None:
                return _finish("", errors.model_not_found(model))
            if model in state.pools:
                worker = state.choose(pool, tried)
            else:  # an adapter: its holders first, else load it on demand
                picked = await choose_adapter_worker(
                    state, loader, clients["upstream"], metrics.adapters, model, pool, tried
                )
                if isinstance(picked, Response):
                    return _finish(model, picked, started)
                worker = picked
            if worker is None:
                if not tried:
                    return _finish(model, errors.no_ready_worker(model), started)
                break
            tried.add(worker.endpoint)
            if attempt:
                metrics.retries.labels(model=model).inc()
            outcome = await _attempt(model, worker, path, raw, headers, stream, started)
            if not isinstance(outcome, _Failed):
                return outcome
            if outcome.penalize:
                state.record_failure(worker.endpoint)
            log.warning(
                "worker %s failed before answering (%s); %s",
                worker.name,
                outcome.reason,
                "retrying" if attempt + 1 < config.max_attempts else "giving up",
            )
            last = outcome
        if last is not None and last.response is not None:
            return _finish(model, last.response, started)  # the worker's own 5xx body
        reason = last.reason if last else "no worker tried"
        return _finish(model, errors.upstream_failed(model, len(tried), reason), started)

    async def _attempt(
        model: str,
        worker: Worker,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        stream: bool,
        started: float,
    ) -> Response | _Failed:
        """One try on one worker: the client's response, or why it may go elsewhere."""
        client = clients["upstream"]
        state.acquire(worker.endpoint)
        upstream: httpx.Response | None = None
        handed_off = False
        try:
            upstream = await client.send(
                client.build_request("POST", worker.endpoint + path, content=raw, headers=headers),
                stream=True,
            )
            code = upstream.status_code
            if code >= 500:
                content = await upstream.aread()
                response = Response(content, code, _response_headers(upstream, worker))
                return _Failed(f"{worker.name}: HTTP {code}", response)
            if follow.is_moved(upstream):
                # Migrated before it answered: its new worker has the whole answer.
                await upstream.aread()
                final = await follow.follow_moved(client, upstream)
                response = Response(
                    final.content, final.status_code, _response_headers(final, worker)
                )
                return _finish(model, response, started)
            if code == 404 and model not in state.pools:
                # An adapter unloaded since the last scrape (the operator moved it): forget
                # this holder and try elsewhere (another holder, or a load on demand).
                content = await upstream.aread()
                state.adapters.drop_holder(worker.endpoint, model)
                response = Response(content, code, _response_headers(upstream, worker))
                return _Failed(f"{worker.name}: no longer holds {model}", response, False)
            if code >= 400 or not stream:
                # Errors pass through unchanged; a whole (non-streamed) answer is read
                # before anything reaches the client, so a drop mid-body is retryable.
                content = await upstream.aread()
                response = Response(content, code, _response_headers(upstream, worker))
                return _finish(model, response, started)
            # Hold the response until the first chunk: a worker that dies before it has
            # produced anything can still be replaced without the client noticing.
            chunks = upstream.aiter_raw()
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = b""
            handed_off = True  # from here the client owns a stream: no more retries
            return StreamingResponse(
                _relay(model, worker, upstream, first, chunks, started),
                status_code=code,
                headers=_response_headers(upstream, worker),
            )
        except httpx.HTTPError as exc:
            return _Failed(f"{worker.name}: {type(exc).__name__}: {exc}")
        finally:
            if not handed_off:
                with anyio.CancelScope(shield=True):
                    if upstream is not None:
                        await upstream.aclose()
                    state.release(worker.endpoint)

    async def _relay(
        model: str,
        worker: Worker,
        upstream: httpx.Response,
        first: bytes,
        chunks: AsyncIterator[bytes],
        started: float,
    ) -> AsyncIterator[bytes]:
        code = str(upstream.status_code)
        # Relayed as the worker sends it; a request that moves is followed there.
        relayed = follow.relay_following(clients["upstream"], first, chunks, upstream)
        try:
            async for chunk in relayed:
                yield chunk
        except httpx.HTTPError as exc:
            # Too late to retry: tell the client in-stream, the way OpenAI streams errors.
            code = "502"
            log.warning("worker %s broke off a stream (%s)", worker.name, exc)
            err = errors.error_body(
                f"The worker serving this stream failed: {exc}",
                "upstream_error",
                code="upstream_stream_broken",
            )
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            # Shielded: on a client disconnect this generator is cancelled, and closing the
            # upstream connection is what tells the worker to abort the request.
            with anyio.CancelScope(shield=True):
                await relayed.aclose()  # closes the stream of a worker it followed
                await upstream.aclose()
                state.release(worker.endpoint)
                metrics.requests.labels(model=model, code=code).inc()
                metrics.latency.labels(model=model).observe(time.perf_counter() - started)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    return app
