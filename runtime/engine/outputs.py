"""What the engine hands out after each step: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    """One of a request's n choices: everything generated so far, and what is new."""

    index: int
    token_ids: list[int]
    text: str  # detokenized output so far (stop string excluded unless asked)
    new_token_ids: list[int]  # tokens produced since the previous output
    new_text: str  # text delta since the previous output, for streaming
    logprobs: list[TokenLogprob] | None = None  # for new_token_ids
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic()) of a request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine for gauges and counters (cumulative since start)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens found cached
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None


class RequestMigrated(Exception):
    """Ends a request's output stream on this worker: it moved to another worker, whose
    HTTP server resumes it at `target_url` (see shoal.runtime.migration)."""

    def __init__(self, request_id: str, target_url: str):
        super().__init__(f"request {request_id} moved to {target_url}")
        self.request_id = request_id
        self.target_url = target_url
