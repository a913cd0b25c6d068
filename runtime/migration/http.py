"""The worker's HTTP side of migration: the resume endpoint the gateway follows a moved
request to, the 307 a non-streaming request answers with when it moved, and the admin
mirror of the control RPCs (`POST /admin/drain`, `POST /admin/undrain`, `GET /admin/load`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shoal.runtime.engine.outputs import RequestMigrated, RequestOutput
from shoal.runtime.migration import marker
from shoal.runtime.migration.metrics import MigrationMetrics
from shoal.runtime.migration.service import MigrationAgent
from shoal.runtime.server import convert, generation
from shoal.runtime.server.errors import NOT_FOUND, UNAVAILABLE, APIError, invalid
from shoal.runtime.server.metrics import RequestTracker
from shoal.runtime.server.streaming import ChatChunks, CompletionChunks

log = logging.getLogger("shoal.migration")


def attach(
    app: FastAPI, state: Any, *, host: str, grpc_port: int, http_port: int
) -> MigrationAgent:
    """Create the worker's migration agent and its HTTP routes (started by the lifespan)."""
    metrics = MigrationMetrics(state.metrics.registry, state.model_name, state.pool)
    agent = MigrationAgent(state, host=host, grpc_port=grpc_port, metrics=metrics)
    agent.http_port = http_port
    _routes(app, state, agent)
    return agent


def refuse_if_draining(state: Any) -> None:
    agent = getattr(state, "migration", None)
    if agent is not None and agent.draining:
        raise APIError(
            "this worker is draining and takes no new requests; send it to another worker",
            status=503,
            type=UNAVAILABLE,
            code="worker_draining",
        )


def moved_response(moved: RequestMigrated, ctx: dict[str, Any]) -> Response:
    """A non-streaming request that moved: the gateway re-asks at the target."""
    url = marker.resume_url(moved.target_url, moved.request_id)
    return JSONResponse(
        marker.body(url, ctx),
        status_code=307,
        headers={"Location": url, marker.HEADER: "1", "X-Request-Id": moved.request_id},
    )


def load_json(reply: Any) -> dict[str, Any]:
    """GetLoad's reply as JSON with numbers as numbers (protobuf's JSON quotes int64)."""
    fields = ("num_running", "num_waiting", "kv_usage", "free_blocks", "total_blocks")
    out: dict[str, Any] = {name: getattr(reply, name) for name in fields}
    out["draining"] = reply.draining
    out["requests"] = [
        {
            "request_id": r.request_id,
            "num_computed_tokens": r.num_computed_tokens,
            "num_output_tokens": r.num_output_tokens,
            "max_tokens": r.max_tokens,
        }
        for r in reply.requests
    ]
    return out


class _ResumedTracker(RequestTracker):
    """The source already observed queue time and TTFT; the rest is observed here."""

    def __init__(self, metrics: Any):
        super().__init__(metrics)
        self._queued = self._first = True


def _routes(app: FastAPI, state: Any, agent: MigrationAgent) -> None:
    @app.post(marker.RESUME_PATH + "{request_id}")
    async def resume(request_id: str, request: Request) -> Response:
        engine = state.ready_engine()
        try:
            ctx = json.loads(await request.body())
            chat, created, model = bool(ctx["chat"]), int(ctx["created"]), str(ctx["model"])
        except (ValueError, KeyError, TypeError):
            raise invalid(
                "the resume body must be the context of a shoal-migrated marker"
            ) from None
        waiting = agent.target.take_resumable(request_id)
        if waiting is None:
            raise APIError(
                f"no migrated request {request_id} waits here (never arrived, or resumed already)",
                status=404,
                type=NOT_FOUND,
                code="request_not_found",
            )
        outputs = engine.follow(request_id)
        tracker = _ResumedTracker(state.metrics)
        logprobs = bool(ctx.get("logprobs"))
        if ctx.get("stream", True):
            cls = ChatChunks if chat else CompletionChunks
            builder = cls(
                request_id=request_id,
                created=created,
                model=model,
                decode=state.token_text,
                logprobs=logprobs,
                include_usage=bool(ctx.get("include_usage")),
            )
            builder.restore(ctx)
            body = generation.stream_outputs(tracker, outputs, request_id, builder, [])
            return StreamingResponse(
                body,
                media_type="text/event-stream",
                headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
            )
        collector = convert.LogprobCollector() if logprobs else None
        if collector is not None and waiting.reported_logprobs:
            collector.by_choice[0] = list(waiting.reported_logprobs)
        final: RequestOutput | None = None
        try:
            async for out in outputs:
                tracker.observe(out.metrics, out.finished)
                if collector is not None:
                    collector.add(out)
                final = out
        except RequestMigrated as moved:  # it moved on again
            return moved_response(moved, ctx)
        finally:
            await outputs.aclose()
        if final is None or not final.finished:
            raise APIError("the engine ended the migrated request without an answer", status=500)
        to_response = convert.chat_response if chat else convert.completion_response
        response = to_response(
            request_id=request_id,
            created=created,
            model=model,
            final=final,
            logprobs=collector,
            decode=state.token_text,
        )
        return JSONResponse(response.model_dump(mode="json"), headers={"X-Request-Id": request_id})

    @app.get("/admin/load")
    async def admin_load() -> Response:
        state.ready_engine()
        reply = await asyncio.to_thread(agent.load)
        return JSONResponse(load_json(reply))

    @app.post("/admin/drain")
    async def admin_drain(request: Request) -> Response:
        state.ready_engine()
        try:
            body = json.loads(await request.body() or b"{}")
            targets = [str(t) for t in body.get("targets", [])]
            timeout_s = float(body.get("timeout_s", 0))
            max_concurrent = int(body.get("max_concurrent", 0))
            max_stages = int(body.get("max_stages", 0))
        except (ValueError, TypeError, AttributeError):
            raise invalid(
                'the body must be {"targets": ["host:grpc_port", ...]}', "targets"
            ) from None
        r = await asyncio.to_thread(agent.drain, targets, timeout_s, max_concurrent, max_stages)
        return JSONResponse(
            {
                "migrated": r.migrated,
                "failed": r.failed,
                "remaining": r.remaining,
                "errors": r.errors,
            }
        )

    @app.post("/admin/undrain")
    async def admin_undrain() -> Response:
        agent.set_draining(False)
        return JSONResponse({"draining": False})
