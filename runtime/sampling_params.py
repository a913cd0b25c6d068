"""Per-request sampling parameters, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked; the message is shown to the client."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and top-k
    include_stop_str_in_output: bool = False
    lora_name: str | None = None  # the adapter this request runs with (None: the base model)

    MAX_N = 16
    MAX_LOGPROBS = 20

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first out-of-range field."""
        checks = [
            (1 <= self.n <= self.MAX_N, "n", f"n must be between 1 and {self.MAX_N}"),
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature", "temperature must be in [0, 2]"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "top_k must be -1 (off) or >= 1"),
            (
                self.seed is None or 0 <= self.seed < 2**63,
                "seed",
                "seed must be a non-negative 64-bit integer",
            ),
            (
                0.0 < self.repetition_penalty <= 2.0,
                "repetition_penalty",
                "repetition_penalty must be in (0, 2]",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                "presence_penalty must be in [-2, 2]",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2]",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
                "logprobs",
                f"logprobs must be in [0, {self.MAX_LOGPROBS}]",
            ),
            (
                len(self.stop) <= 4 and all(self.stop),
                "stop",
                "stop takes at most 4 non-empty strings",
            ),
            (
                all(t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be non-negative token ids",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param)
