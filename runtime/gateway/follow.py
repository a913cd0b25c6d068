"""Following a request that a worker migrated to another worker (issue 5).

Streaming: the worker ends its SSE stream with a `shoal-migrated` marker event naming
the target's resume URL; the relay drops the marker, asks the target, and relays its
events, so the client sees one stream with every token once. Non-streaming: the worker
answers 307 with the marker header; the gateway asks the target for the whole answer.
A request may move more than once; each hop is followed the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import httpx

from shoal.runtime.migration import marker

log = logging.getLogger("shoal.gateway")

MAX_HOPS = 16  # a request moving more often than this is bouncing: give up on it


class FollowError(httpx.HTTPError):
    """The request's new worker could not be reached or would not resume it."""


def is_moved(response: httpx.Response) -> bool:
    return response.status_code == 307 and marker.HEADER in response.headers


async def _prepend(first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in chunks:
        yield chunk


async def relay_following(
    client: httpx.AsyncClient,
    first: bytes,
    chunks: AsyncIterator[bytes],
    origin: httpx.Response | None = None,
) -> AsyncIterator[bytes]:
    """The client's stream: the worker's events, then each target's, markers removed.
    `origin` (the first worker's response) is closed once the request left it, so a
    drained worker that goes away breaks no connection still in use."""
    followed: httpx.Response | None = None
    source: AsyncIterator[bytes] = _prepend(first, chunks)
    try:
        for _ in range(MAX_HOPS + 1):
            events = marker.SSEEvents()
            moved = None
            async for chunk in source:
                for event in events.feed(chunk):
                    moved = marker.parse_event(event)
                    if moved is not None:
                        break
                    yield event
                if moved is not None:
                    break
            if moved is None:
                rest = events.rest()
                if rest:
                    yield rest
                return
            url, ctx = moved
            log.info("stream moved: following it to %s", url)
            with anyio.CancelScope(shield=True):
                if followed is not None:
                    await followed.aclose()
                elif origin is not None:
                    await origin.aclose()
            followed = await client.send(client.build_request("POST", url, json=ctx), stream=True)
            if followed.status_code != 200:
                detail = (await followed.aread())[:300].decode(errors="replace")
                raise FollowError(
                    f"the request moved to {url}, which did not resume it: "
                    f"HTTP {followed.status_code} {detail}"
                )
            source = followed.aiter_raw()
        raise FollowError(f"the request moved more than {MAX_HOPS} times")
    finally:
        if followed is not None:
            with anyio.CancelScope(shield=True):
                await followed.aclose()


async def follow_moved(client: httpx.AsyncClient, moved: httpx.Response) -> httpx.Response:
    """The whole answer of a non-streaming request that moved (read, not streamed)."""
    response = moved
    for _ in range(MAX_HOPS):
        if not is_moved(response):
            return response
        try:
            body = response.json()
            url, ctx = str(body["url"]), dict(body["ctx"])
        except (ValueError, KeyError, TypeError):
            raise FollowError("a worker answered 307 without a resume target") from None
        log.info("request moved: asking %s for its answer", url)
        response = await client.post(url, json=ctx)
    raise FollowError(f"the request moved more than {MAX_HOPS} times")
