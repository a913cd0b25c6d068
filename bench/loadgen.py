"""Drives an OpenAI-compatible server: streaming `/v1/completions`, one record per request.

The same client measures every HTTP engine, so differences are the engines', not the
clients'. Times are taken when each SSE chunk arrives; token counts come from the final
usage chunk when the server sends one (`stream_options.include_usage`), else from the
number of chunks that carried a choice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx

from bench.stats import RequestRecord, poisson_arrivals
from bench.workload import BenchRequest, Workload


def completion_body(model: str, request: BenchRequest) -> dict:
    """The request body: greedy, exact output length, streaming with usage."""
    return {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        # Both engines must produce exactly max_tokens tokens: a random-weight model hits
        # its EOS at random, which would make the engines' work differ.
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_sse_line(line: str) -> dict | None:
    """One SSE line to its JSON payload; None for blank lines, comments and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


async def send_one(client: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestRecord:
    sent = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream(
            "POST", "/v1/completions", json=completion_body(model, request)
        ) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                return _failed(sent, request, f"HTTP {r.status_code}: {body[:200]}")
            async for line in r.aiter_lines():
                payload = parse_sse_line(line)
                if payload is None:
                    continue
                if "error" in payload:
                    return _failed(sent, request, f"stream error: {payload['error']}")
                if payload.get("choices"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
                if payload.get("usage"):
                    usage_tokens = payload["usage"].get("completion_tokens")
    except httpx.HTTPError as e:
        return _failed(sent, request, f"{type(e).__name__}: {e}")
    finished = time.perf_counter()
    if first is None:
        return _failed(sent, request, "stream ended without a token")
    return RequestRecord(
        sent=sent,
        first_token=first,
        finished=finished,
        prompt_tokens=len(request.prompt),
        output_tokens=usage_tokens if usage_tokens is not None else chunks,
    )


def _failed(sent: float, request: BenchRequest, error: str) -> RequestRecord:
    now = time.perf_counter()
    return RequestRecord(sent, now, now, len(request.prompt), 0, error=error)


async def run_workload(
    base_url: str, model: str, workload: Workload, requests: Sequence[BenchRequest]
) -> list[RequestRecord]:
    """Send `requests` the way `workload` says; return one record per request, in order."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(900.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        if workload.closed_loop:
            return await _closed_loop(client, model, workload.concurrency, requests)
        return await _poisson(client, model, workload, requests)


async def _closed_loop(
    client: httpx.AsyncClient, model: str, concurrency: int, requests: Sequence[BenchRequest]
) -> list[RequestRecord]:
    results: list[RequestRecord | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        for i in next_index:  # the shared iterator hands each index to one worker
            results[i] = await send_one(client, model, requests[i])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


async def _poisson(
    client: httpx.AsyncClient, model: str, workload: Workload, requests: Sequence[BenchRequest]
) -> list[RequestRecord]:
    assert workload.rate is not None
    offsets = poisson_arrivals(workload.rate, len(requests), seed=len(requests))
    start = time.perf_counter()

    async def at(offset: float, request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await send_one(client, model, request)

    return list(await asyncio.gather(*(at(o, r) for o, r in zip(offsets, requests, strict=True))))


async def warm_up(base_url: str, model: str, prompt: list[int], n: int = 8) -> str | None:
    """A few short requests so one-time costs (compilation, first allocations) stay out of
    the measurement. Returns an error line if the server cannot serve the bench's requests."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        records = await asyncio.gather(
            *(send_one(client, model, BenchRequest(prompt, 16)) for _ in range(n))
        )
    errors = [r.error for r in records if r.error]
    if errors:
        return errors[0]
    if any(r.output_tokens != 16 for r in records):
        got = sorted({r.output_tokens for r in records})
        return (
            f"asked for 16 tokens with ignore_eos, got {got}: the engines would not be comparable"
        )
    return None
