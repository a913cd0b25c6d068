"""OpenAI API request and response types (pydantic), shared by the worker and the gateway.

Requests forbid unknown fields: a field this server does not implement is answered with
a 400 naming it, never silently ignored (a client asking for `tools` or a JSON schema
must learn it did not get them). Fields whose shapes are unions (`prompt`, `stop`,
message `content`) are checked by validators with messages written for people, since
pydantic's own union errors are hard to read.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
)

from shoal.runtime.server.errors import APIError, invalid, unsupported

# ---------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extras)."""

    model: str
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit seed
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's records: no effect on output
    logit_bias: dict[str, float] | None = None  # rejected unless empty
    # vLLM's extra sampling fields (the openai client sends them through `extra_body`)
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None or isinstance(value, list):
            if isinstance(value, list) and not all(isinstance(s, str) for s in value):
                raise ValueError("stop must be a string or a list of strings")
            return value
        if isinstance(value, str):
            return [value]
        raise ValueError("stop must be a string or a list of strings")


class CompletionRequest(_SamplingRequest):
    # str or token ids after validation; a list of one prompt is unwrapped
    prompt: str | list[int]
    logprobs: int | None = None
    echo: bool = False  # rejected if true
    suffix: str | None = None  # rejected unless empty
    best_of: int | None = None  # rejected unless 1

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        return normalize_prompt(value)


def normalize_prompt(value: Any) -> str | list[int]:
    """A prompt as OpenAI accepts it, reduced to one string or one list of token ids."""
    shape = "prompt must be a string, a list of token ids, or a list of one of those"
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(shape if not isinstance(value, list) else "prompt must not be empty")
    if all(_is_token_id(t) for t in value):
        return list(value)
    if len(value) > 1:
        raise ValueError("batched prompts are not supported: send one prompt per request")
    return normalize_prompt(value[0]) if isinstance(value[0], (str, list)) else _fail(shape)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(message: str) -> Any:
    raise ValueError(message)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string after validation: text content parts are joined, other parts rejected
    content: str | None = None
    name: str | None = None
    tool_calls: Any = None  # rejected if set
    tool_call_id: Any = None  # rejected if set

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError("each content part must be an object with a 'type'")
            if part["type"] != "text":
                raise ValueError(f"only text content parts are supported, got '{part['type']}'")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extra: end the prompt with the assistant's turn
    # OpenAI fields this server does not implement: accepted by the parser only so that
    # the answer can name them (see unsupported_chat_fields)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends the role only in a choice's first delta, not "role": null after
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shoal"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model; None for the base itself
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------ parsing


T = TypeVar("T", bound=BaseModel)


def parse_request(model: type[T], payload: Any) -> T:
    """Validate a decoded JSON body into `model`, or raise an APIError naming the field."""
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise api_error_from_validation(exc) from None


def api_error_from_validation(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as one sentence a client can act on."""
    err = exc.errors(include_url=False)[0]
    param = _loc_to_param(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return unsupported(param)
    if kind == "missing":
        return invalid(f"'{param}' is required", param, code="missing_required_parameter")
    message = str(err["msg"]).removeprefix("Value error, ")
    return invalid(f"invalid value for '{param}': {message}", param, code="invalid_value")


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
