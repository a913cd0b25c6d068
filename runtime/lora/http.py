"""The worker's adapter admin API (vLLM-compatible) and adapter model cards.

    POST /v1/load_lora_adapter   {"lora_name": str, "lora_path": str}
         -> 200 {"lora_name", "status": "loaded"} (again with the same path: 200 too)
         -> 400 code lora_rank_too_large | lora_base_mismatch | lora_invalid,
            404 code lora_not_found (no such directory)
    POST /v1/unload_lora_adapter {"lora_name": str} -> 200, unknown: 404 model_not_found
    GET  /v1/lora_adapters -> {"object": "list", "data": [{name, path, rank, resident,
                                                            running}]}

Reading and checking an adapter's files runs in a worker thread (the event loop keeps
serving); the pool's own lock keeps the engine's step thread consistent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from shoal.runtime.lora.adapter import NOT_FOUND, LoRALoadError
from shoal.runtime.server.errors import NOT_FOUND as NOT_FOUND_TYPE
from shoal.runtime.server.errors import APIError, invalid, model_not_found, not_ready

log = logging.getLogger("shoal.server")

router = APIRouter()


def lora_pool(engine: Any) -> Any:
    """The engine's LoRAPool (AsyncLLMEngine -> LLMEngine.lora), or None."""
    if engine is None:
        return None
    inner = getattr(engine, "engine", engine)
    return getattr(inner, "lora", None)


def adapter_cards(pool: Any, base_name: str, created: int, max_model_len: int) -> list[dict]:
    """/v1/models entries for the adapters: parent is the base model's served name."""
    if pool is None:
        return []
    return [
        {
            "id": a["name"],
            "object": "model",
            "created": created,
            "owned_by": "shoal",
            "root": a["path"],
            "parent": base_name,
            "max_model_len": max_model_len,
        }
        for a in pool.list()
    ]


def _ready_pool(request: Request) -> Any:
    state = request.app.state.shoal
    if state.engine is None:
        raise not_ready()
    pool = lora_pool(state.engine)
    if pool is None:
        raise APIError("this worker does not serve LoRA adapters", status=400)
    return pool


async def _body(request: Request, *fields: str) -> dict[str, str]:
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object")
    out = {}
    for name in fields:
        value = payload.get(name)
        if not isinstance(value, str) or not value:
            raise invalid(f"'{name}' is required and must be a non-empty string", name)
        out[name] = value
    return out


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> JSONResponse:
    pool = _ready_pool(request)
    body = await _body(request, "lora_name", "lora_path")
    name, path = body["lora_name"], body["lora_path"]
    if name == request.app.state.shoal.model_name:
        raise invalid(f"'{name}' is the base model's name; pick another adapter name", "lora_name")
    try:
        await asyncio.to_thread(pool.load, name, path)
    except LoRALoadError as exc:
        status = 404 if exc.code == NOT_FOUND else 400
        kind = NOT_FOUND_TYPE if status == 404 else "invalid_request_error"
        log.warning("adapter %s from %s not loaded: %s", name, path, exc.message)
        raise APIError(
            f"cannot load adapter '{name}': {exc.message}",
            status=status,
            type=kind,
            param="lora_path",
            code=exc.code,
        ) from None
    return JSONResponse({"lora_name": name, "status": "loaded"})


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> JSONResponse:
    pool = _ready_pool(request)
    name = (await _body(request, "lora_name"))["lora_name"]
    if not pool.unload(name):
        raise model_not_found(name, request.app.state.shoal.model_name)
    return JSONResponse({"lora_name": name, "status": "unloaded"})


@router.get("/v1/lora_adapters")
async def list_lora_adapters(request: Request) -> JSONResponse:
    pool = _ready_pool(request)
    return JSONResponse({"object": "list", "data": pool.list()})
