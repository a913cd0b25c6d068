"""How a worker's answer tells the gateway that its request moved (pure).

Streaming: the source ends its SSE stream with a comment event (SSE comments are
ignored by clients, and the gateway never relays this one):

    : shoal-migrated {"url": "http://TARGET/internal/resume/ID", "ctx": {...}}

Non-streaming: the source answers 307 with the `x-shoal-migrated` header and the same
JSON as body. Either way the gateway POSTs `ctx` to `url` and relays what comes back;
`ctx` is what the target needs to keep the answer's format (id, created, model, chat or
completion, logprobs, usage, the text already sent).
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = b": shoal-migrated "
HEADER = "x-shoal-migrated"
RESUME_PATH = "/internal/resume/"


def resume_url(base_url: str, request_id: str) -> str:
    return f"{base_url.rstrip('/')}{RESUME_PATH}{request_id}"


def body(url: str, ctx: dict[str, Any]) -> dict[str, Any]:
    return {"url": url, "ctx": ctx}


def sse_event(url: str, ctx: dict[str, Any]) -> str:
    return f"{PREFIX.decode()}{json.dumps(body(url, ctx), separators=(',', ':'))}\n\n"


def parse_event(event: bytes) -> tuple[str, dict[str, Any]] | None:
    """(url, ctx) if `event` (one whole SSE event) is the marker, else None."""
    if not event.startswith(PREFIX):
        return None
    try:
        payload = json.loads(event[len(PREFIX) :].strip())
        return str(payload["url"]), dict(payload["ctx"])
    except (ValueError, KeyError, TypeError):
        return None


class SSEEvents:
    """Cuts a byte stream into whole SSE events (each ending in a blank line)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        events = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return events
            events.append(self._buf[: end + 2])
            self._buf = self._buf[end + 2 :]

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest
