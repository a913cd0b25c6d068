"""The worker's HTTP server: OpenAI's completions, chat completions and models, plus
/health and /metrics, over one `AsyncLLMEngine`.

The engine loads in a thread from the app's lifespan, so the server listens at once and
/health says 503 until the model is ready (the readiness probe the operator sets).
Every request is checked completely (fields, model, context window, sampling ranges)
before a response starts, so bad input gets a 400/404 with an OpenAI error body; a
failure inside one request is answered on that request alone and never reaches the
engine's loop or other requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.outputs import RequestMigrated
from shoal.runtime.lora.http import adapter_cards, lora_pool
from shoal.runtime.lora.http import router as lora_router
from shoal.runtime.lora.metrics import LoRACollector
from shoal.runtime.sampling_params import InvalidRequestError, SamplingParams
from shoal.runtime.server import convert, generation
from shoal.runtime.server.errors import (
    NOT_FOUND,
    SERVER_ERROR,
    APIError,
    error_body,
    invalid,
    model_not_found,
    not_ready,
)
from shoal.runtime.server.metrics import ServerMetrics
from shoal.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    parse_request,
)
from shoal.runtime.server.streaming import ChatChunks, CompletionChunks
from shoal.runtime.server.tokens import TokenText

log = logging.getLogger("shoal.server")

EngineFactory = Callable[[EngineConfig], Any]


def _default_engine_factory(config: EngineConfig) -> Any:
    # imported here: torch and the model code load only when an engine is built
    from shoal.runtime.engine.async_engine import AsyncLLMEngine

    return AsyncLLMEngine(config)


class ServerState:
    """What the handlers share: the engine once loaded, or why it failed to load."""

    def __init__(self, config: EngineConfig, pool: str, factory: EngineFactory):
        self.config = config
        self.model_name = config.model_name
        self.pool = pool
        self.factory = factory
        self.engine: Any = None
        self.token_text: TokenText | None = None  # per-token text/bytes for logprobs
        self.load_error: str | None = None
        self.migration: Any = None  # the MigrationAgent when the gRPC service is on
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.model_name, pool)
        self.metrics.watch_engine(lambda: self.engine.stats() if self.engine else None)
        self.metrics.registry.register(
            LoRACollector(lambda: lora_pool(self.engine), self.metrics.labels)
        )

    async def load(self, on_load_error: Callable[[BaseException], None] | None) -> None:
        started = time.monotonic()
        log.info("loading model %s from %s", self.model_name, self.config.model)
        try:
            engine = await asyncio.to_thread(self.factory, self.config)
            await engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", self.load_error)
            if on_load_error is not None:
                on_load_error(exc)
            return
        self.token_text = TokenText(engine.tokenizer)
        self.engine = engine
        log.info(
            "model %s ready in %.1f s (max_model_len %d); /health now answers 200",
            self.model_name,
            time.monotonic() - started,
            engine.max_model_len,
        )

    def ready_engine(self) -> Any:
        if self.engine is None:
            raise not_ready()
        return self.engine

    def check_model(self, requested: str) -> str | None:
        """None for the base model, the name for a loaded LoRA adapter; else a 404."""
        if requested == self.model_name:
            return None
        pool = lora_pool(self.engine)
        if pool is not None and pool.has(requested):
            return requested
        raise model_not_found(requested, self.model_name)


def build_app(
    engine_config: EngineConfig,
    *,
    pool: str | None = None,
    engine_factory: EngineFactory | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    grpc_port: int | None = None,
    grpc_host: str = "127.0.0.1",
    http_port: int = 0,
) -> FastAPI:
    """The worker app. `pool` defaults to $SHOAL_POOL; `on_load_error` lets the CLI exit.
    With `grpc_port` (0 picks one) the migration service runs too; `http_port` is this
    server's own port, told to the workers that migrate requests here."""
    state = ServerState(
        engine_config,
        os.environ.get("SHOAL_POOL", "") if pool is None else pool,
        engine_factory or _default_engine_factory,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.migration is not None:
            state.migration.start()
        loading = asyncio.create_task(state.load(on_load_error))
        try:
            yield
        finally:
            if state.migration is not None:
                await asyncio.to_thread(state.migration.stop)
            loading.cancel()
            with suppress(asyncio.CancelledError):
                await loading
            if state.engine is not None:
                log.info("shutting down the engine")
                await state.engine.shutdown()

    app = FastAPI(title="Shoal worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.shoal = state
    _install_error_handlers(app)
    app.include_router(lora_router)
    if grpc_port is not None:
        from shoal.runtime.migration.http import attach

        state.migration = attach(
            app, state, host=grpc_host, grpc_port=grpc_port, http_port=http_port
        )

    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None:
            # A dead step loop would answer nothing: fail the probe so the pod restarts.
            if not getattr(state.engine, "is_running", True):
                return JSONResponse({"status": "failed", "error": "engine loop stopped"}, 503)
            return JSONResponse({"status": "ok", "model": state.model_name})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        base = _model_card(state)
        cards = [base, *_adapter_cards(state, base)]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if state.check_model(model_id) is None:
            return JSONResponse(_model_card(state).model_dump(mode="json"))
        base = _model_card(state)
        card = next(c for c in _adapter_cards(state, base) if c.id == model_id)
        return JSONResponse(card.model_dump(mode="json"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine = state.ready_engine()
        _refuse_if_draining(state)
        req = parse_request(CompletionRequest, await _read_json(request))
        lora_name = state.check_model(req.model)
        convert.check_completion_supported(req)
        if isinstance(req.prompt, str):
            prompt_ids = engine.tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
        else:
            prompt_ids = list(req.prompt)
        convert.check_token_ids(prompt_ids, _vocab_size(engine))
        max_tokens = convert.resolve_max_tokens(
            req.max_tokens,
            prompt_len=len(prompt_ids),
            max_model_len=engine.max_model_len,
            default=convert.DEFAULT_COMPLETION_MAX_TOKENS,
        )
        params = convert.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs)
        params.lora_name = lora_name
        _engine_check(engine, prompt_ids, params)
        return await _answer(
            request, state, engine, prompt_ids, params, chat=False, stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=req.logprobs is not None,
        )  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine = state.ready_engine()
        _refuse_if_draining(state)
        req = parse_request(ChatCompletionRequest, await _read_json(request))
        lora_name = state.check_model(req.model)
        convert.check_chat_supported(req)
        prompt_ids = _chat_prompt_ids(engine.tokenizer, req)
        convert.check_token_ids(prompt_ids, _vocab_size(engine), param="messages")
        use_new_name = req.max_completion_tokens is not None
        max_tokens = convert.resolve_max_tokens(
            req.max_completion_tokens if use_new_name else req.max_tokens,
            prompt_len=len(prompt_ids),
            max_model_len=engine.max_model_len,
            default=None,
            param="max_completion_tokens" if use_new_name else "max_tokens",
            prompt_param="messages",
        )
        logprobs = convert.chat_logprobs_k(req)
        params = convert.sampling_params(req, max_tokens=max_tokens, logprobs=logprobs)
        params.lora_name = lora_name
        _engine_check(engine, prompt_ids, params)
        return await _answer(
            request, state, engine, prompt_ids, params, chat=True, stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            want_logprobs=logprobs is not None,
        )  # fmt: skip

    return app


async def _answer(
    request: Request,
    state,
    engine,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    chat: bool,
    stream: bool,
    include_usage: bool,
    want_logprobs: bool,
) -> Response:
    """Run a validated request: stream it as SSE, or collect it into one response."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    common = dict(
        request_id=request_id,
        created=int(time.time()),
        model=params.lora_name or state.model_name,  # the name the client asked for
        decode=state.token_text,
    )
    if stream:
        builder_cls = ChatChunks if chat else CompletionChunks
        builder = builder_cls(**common, logprobs=want_logprobs, include_usage=include_usage)
        first = builder.first_chunks(params.n) if chat else []
        body = generation.stream(
            state.metrics, engine, prompt_ids, params, request_id, builder, first
        )
        return _sse_response(body, request_id)
    collector = convert.LogprobCollector() if want_logprobs else None
    try:
        final = await generation.generate_unless_disconnected(
            request, state.metrics, engine, prompt_ids, params, request_id, collector
        )
    except RequestMigrated as moved:  # the gateway re-asks at the target
        from shoal.runtime.migration.http import moved_response

        ctx = dict(chat=chat, created=common["created"], model=state.model_name, stream=False,
                   logprobs=want_logprobs)  # fmt: skip
        return moved_response(moved, ctx)
    to_response = convert.chat_response if chat else convert.completion_response
    response = to_response(**common, final=final, logprobs=collector)
    return _json(response.model_dump(mode="json"), request_id)


# ------------------------------------------------------------------------------ helpers


def _model_card(state: ServerState) -> ModelCard:
    engine = state.ready_engine()
    return ModelCard(
        id=state.model_name,
        created=state.created,
        root=state.config.model,
        max_model_len=engine.max_model_len,
    )


def _adapter_cards(state: ServerState, base: ModelCard) -> list[ModelCard]:
    cards = adapter_cards(lora_pool(state.engine), base.id, base.created, base.max_model_len)
    return [ModelCard(**card) for card in cards]


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _vocab_size(engine: Any) -> int:
    # the model's embedding rows; the tokenizer's length is the fallback (never larger)
    inner = getattr(engine, "engine", None)
    size = getattr(engine, "vocab_size", None) or getattr(inner, "vocab_size", None)
    return int(size or len(engine.tokenizer))


def _refuse_if_draining(state: ServerState) -> None:
    if state.migration is not None:
        from shoal.runtime.migration.http import refuse_if_draining

        refuse_if_draining(state)


def _engine_check(engine: Any, prompt_ids: list[int], params: SamplingParams) -> None:
    try:
        engine.check_request(prompt_ids, params)
    except InvalidRequestError as exc:
        raise convert.from_engine_error(exc) from None


def _chat_prompt_ids(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    """The chat template applied to the messages, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid("this model has no chat template; use /v1/completions", "messages")
    messages = []
    for m in req.messages:
        # "developer" is OpenAI's new name for "system"; templates know only the old one
        message = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content or "",
        }
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt, tokenize=False
        )
    except Exception as exc:  # jinja2 errors from the template (e.g. roles must alternate)
        raise invalid(f"the chat template rejected the messages: {exc}", "messages") from None
    # the template already holds the special tokens (BOS and the turn markers)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _json(payload: dict[str, Any], request_id: str) -> JSONResponse:
    return JSONResponse(payload, headers={"X-Request-Id": request_id})


def _sse_response(body: AsyncIterator[str], request_id: str) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"},
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, type=kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(generation.ClientDisconnected)
    async def disconnected(request: Request, exc: generation.ClientDisconnected) -> Response:
        # nobody is listening; 499 is nginx's "client closed request", for the access log
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # one line here; uvicorn logs the traceback for the operator, never for the client
        log.error("%s %s failed: %s", request.method, request.url.path, generation.one_line(exc))
        return JSONResponse(
            error_body(generation.one_line(exc), type=SERVER_ERROR), status_code=500
        )
