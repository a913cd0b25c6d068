"""Pure translations between the OpenAI protocol and the engine's types.

Requests become `SamplingParams` (after rejecting what this server does not implement),
engine outputs become OpenAI responses. No I/O: the app wires these to HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shoal.runtime.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from shoal.runtime.sampling_params import InvalidRequestError, SamplingParams
from shoal.runtime.server.errors import APIError, invalid, unsupported
from shoal.runtime.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)


class DecodeToken(Protocol):
    """Single-token text and raw bytes (see shoal.runtime.server.tokens.TokenText)."""

    def text(self, token_id: int) -> str: ...

    def bytes(self, token_id: int) -> list[int]: ...


# JSON has no -Infinity; a token the model rules out entirely is reported as this.
MIN_LOGPROB = -9999.0

# OpenAI's default for /v1/completions; chat defaults to the rest of the context window.
DEFAULT_COMPLETION_MAX_TOKENS = 16


# ------------------------------------------------------------------- unsupported fields


def check_completion_supported(req: CompletionRequest) -> None:
    if req.echo:
        raise unsupported("echo", "the prompt is not repeated in the output")
    if req.suffix:
        raise unsupported("suffix", "insertion (fill-in-the-middle) is not implemented")
    if req.best_of is not None and req.best_of != 1:
        raise unsupported("best_of", "use n for several choices")
    _check_common(req)


def check_chat_supported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise unsupported("tools", "tool calling is not implemented")
    if req.tool_choice not in (None, "none"):
        raise unsupported("tool_choice", "tool calling is not implemented")
    for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
        if getattr(req, name) is not None:
            raise unsupported(name)
    if req.reasoning_effort is not None:
        raise unsupported("reasoning_effort")
    if req.parallel_tool_calls:
        raise unsupported("parallel_tool_calls", "tool calling is not implemented")
    fmt = req.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise unsupported("response_format", f"only type 'text' is supported, got {kind!r}")
    if req.modalities is not None and req.modalities != ["text"]:
        raise unsupported("modalities", "only ['text'] is supported")
    for i, message in enumerate(req.messages):
        if message.role == "tool" or message.tool_calls is not None:
            raise unsupported(f"messages[{i}]", "tool messages and tool_calls need tool calling")
        if message.tool_call_id is not None:
            raise unsupported(f"messages[{i}].tool_call_id", "tool calling is not implemented")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    _check_common(req)


def _check_common(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.logit_bias:
        raise unsupported("logit_bias")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed with stream set to true", "stream_options")


# -------------------------------------------------------------------- sampling params


def resolve_max_tokens(
    requested: int | None,
    *,
    prompt_len: int,
    max_model_len: int,
    default: int | None,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> int:
    """How many tokens to generate; the prompt plus them must fit the context window."""
    if prompt_len >= max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {prompt_len} tokens, leaving no room to generate. Shorten the prompt.",
            prompt_param,
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise invalid(f"{param} must be at least 1, got {requested}", param, code="invalid_value")
    if requested > room:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len + requested} were requested ({prompt_len} in the prompt, "
            f"{requested} for the completion). Lower {param} or shorten the prompt.",
            param,
            code="context_length_exceeded",
        )
    return requested


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, *, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    """The engine's parameters for a request, validated (400 naming the bad field as the
    client spelled it: chat's top-k logprobs are `top_logprobs`, the engine's `logprobs`)."""

    def pick(value, default):
        return default if value is None else value

    params = SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        temperature=pick(req.temperature, 1.0),
        top_p=pick(req.top_p, 1.0),
        top_k=pick(req.top_k, -1),
        seed=req.seed,
        repetition_penalty=pick(req.repetition_penalty, 1.0),
        presence_penalty=pick(req.presence_penalty, 0.0),
        frequency_penalty=pick(req.frequency_penalty, 0.0),
        stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        error = from_engine_error(exc)
        if isinstance(req, ChatCompletionRequest) and error.param == "logprobs":
            error.param = "top_logprobs"
            error.message = error.message.replace("logprobs", "top_logprobs", 1)
        raise error from None
    return params


def chat_logprobs_k(req: ChatCompletionRequest) -> int | None:
    """Chat's `logprobs: bool` + `top_logprobs: int` as the engine's single `logprobs`."""
    if not req.logprobs:
        return None
    return req.top_logprobs or 0


def from_engine_error(exc: InvalidRequestError) -> APIError:
    return invalid(str(exc), exc.param, code="invalid_value")


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    if not token_ids:
        raise invalid("the prompt is empty after tokenization", param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(
            f"token id {bad} is out of range [0, {vocab_size})", param, code="invalid_value"
        )


# ------------------------------------------------------------------------- responses


def usage(out: RequestOutput) -> Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(choice.token_ids) for choice in out.outputs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens),
    )


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(
    entries: Sequence[TokenLogprob], decode: DecodeToken, start_offset: int = 0
) -> CompletionLogprobs:
    """Legacy completions logprobs; text_offset counts from the start of the completion."""
    result = CompletionLogprobs()
    offset = start_offset
    for entry in entries:
        token = decode.text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_lp(entry.logprob))
        result.top_logprobs.append({decode.text(tid): _lp(lp) for tid, lp in entry.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def chat_logprobs(entries: Sequence[TokenLogprob], decode: DecodeToken) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(
            token=decode.text(token_id), logprob=_lp(logprob), bytes=decode.bytes(token_id)
        )

    content = []
    for entry in entries:
        head = top(entry.token_id, entry.logprob)
        content.append(
            ChatTokenLogprob(
                **head.model_dump(), top_logprobs=[top(tid, lp) for tid, lp in entry.top]
            )
        )
    return ChatLogprobs(content=content)


class LogprobCollector:
    """Gathers each choice's per-token logprobs across streamed outputs (they come as deltas)."""

    def __init__(self) -> None:
        self.by_choice: dict[int, list[TokenLogprob]] = {}

    def add(self, out: RequestOutput) -> None:
        for choice in out.outputs:
            if choice.logprobs:
                self.by_choice.setdefault(choice.index, []).extend(choice.logprobs)

    def get(self, index: int) -> list[TokenLogprob]:
        return self.by_choice.get(index, [])


def completion_response(
    *,
    request_id: str,
    created: int,
    model: str,
    final: RequestOutput,
    logprobs: LogprobCollector | None,
    decode: DecodeToken,
) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=c.index,
            text=c.text,
            logprobs=None
            if logprobs is None
            else completion_logprobs(logprobs.get(c.index), decode),
            finish_reason=c.finish_reason,
        )
        for c in _ordered(final.outputs)
    ]
    return CompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=usage(final)
    )


def chat_response(
    *,
    request_id: str,
    created: int,
    model: str,
    final: RequestOutput,
    logprobs: LogprobCollector | None,
    decode: DecodeToken,
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatResponseMessage(content=c.text),
            logprobs=None if logprobs is None else chat_logprobs(logprobs.get(c.index), decode),
            finish_reason=c.finish_reason,
        )
        for c in _ordered(final.outputs)
    ]
    return ChatCompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=usage(final)
    )


def _ordered(outputs: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    return sorted(outputs, key=lambda c: c.index)
