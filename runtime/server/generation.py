"""Running one request on the engine for the HTTP layer: collect it whole, or stream it
as server-sent events; either way a client that goes away aborts it at once (closing the
engine's iterator frees its KV blocks), and latencies are observed as outputs arrive."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from starlette.requests import Request

from shoal.runtime.engine.outputs import RequestMigrated, RequestOutput
from shoal.runtime.migration import marker
from shoal.runtime.sampling_params import SamplingParams
from shoal.runtime.server import convert
from shoal.runtime.server.errors import SERVER_ERROR, APIError, error_body
from shoal.runtime.server.metrics import ServerMetrics
from shoal.runtime.server.streaming import DONE, ChatChunks, CompletionChunks, sse

log = logging.getLogger("shoal.server")


class ClientDisconnected(Exception):
    """The client left before its non-streaming answer; the request was aborted."""


async def generate(
    metrics: ServerMetrics,
    engine: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    collector: convert.LogprobCollector | None,
) -> RequestOutput:
    tracker = metrics.tracker()
    final: RequestOutput | None = None
    outputs = engine.generate(prompt_ids, params, request_id)
    try:
        async for out in outputs:
            tracker.observe(out.metrics, out.finished)
            if collector is not None:
                collector.add(out)
            final = out
    finally:
        await outputs.aclose()  # early exit (disconnect, error) aborts the request
    if final is None or not final.finished:
        raise APIError("the engine ended the request without an answer", status=500)
    return final


async def generate_unless_disconnected(
    request: Request,
    metrics: ServerMetrics,
    engine: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    collector: convert.LogprobCollector | None,
) -> RequestOutput:
    """Run a non-streaming request, aborting it if the client goes away meanwhile."""
    work = asyncio.create_task(generate(metrics, engine, prompt_ids, params, request_id, collector))
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()  # cancelling closes the engine's iterator, which aborts
            with suppress(asyncio.CancelledError):
                await work
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
    if work.cancelled():
        log.info("client went away: aborted %s", request_id)
        raise ClientDisconnected(request_id)
    return work.result()


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream(
    metrics: ServerMetrics,
    engine: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    builder: CompletionChunks | ChatChunks,
    first: list[Any],
) -> AsyncIterator[str]:
    """The SSE body. A client that disconnects closes this generator, which closes the
    engine's iterator and so aborts the request and frees its blocks."""
    outputs = engine.generate(prompt_ids, params, request_id)
    events = stream_outputs(metrics.tracker(), outputs, request_id, builder, first)
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # at once: it closes the engine's iterator, which aborts


async def stream_outputs(
    tracker: Any,
    outputs: AsyncIterator[RequestOutput],
    request_id: str,
    builder: CompletionChunks | ChatChunks,
    first: list[Any],
) -> AsyncIterator[str]:
    """SSE events for a request's outputs (a new request's, or a migrated one's)."""
    final: RequestOutput | None = None
    try:
        for chunk in first:
            yield sse(chunk)
        async for out in outputs:
            tracker.observe(out.metrics, out.finished)
            for chunk in builder.chunks(out):
                yield sse(chunk)
            final = out
        if final is not None:
            usage_chunk = builder.usage_chunk(final)
            if usage_chunk is not None:
                yield sse(usage_chunk)
        yield DONE
    except RequestMigrated as moved:
        # It goes on at another worker: the gateway follows it there; no [DONE] here.
        url = marker.resume_url(moved.target_url, request_id)
        yield marker.sse_event(url, builder.resume_context())
    except Exception as exc:
        # headers are gone already: report in-band as OpenAI does, then end the stream
        log.exception("request %s failed while streaming", request_id)
        yield sse(error_body(one_line(exc), type=SERVER_ERROR))
        yield DONE
    finally:
        await outputs.aclose()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"internal error: {type(exc).__name__}" + (f": {text[0]}" if text else "")
