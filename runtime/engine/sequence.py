"""Request state: one Sequence per choice of a request (n > 1 gives n sequences)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from shoal.runtime.engine.outputs import RequestMetrics, TokenLogprob
from shoal.runtime.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted (its KV was freed)
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    PAUSED = "paused"  # holds KV blocks but is not scheduled: a migration is moving it
    FINISHED = "finished"


@dataclass
class DetokenizerState:
    """Offsets for incremental detokenization (see Detokenizer)."""

    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # output text so far, stop strings not yet cut
    emitted: int = 0  # characters of `text` already handed to the client


@dataclass
class Sequence:
    request_id: str
    index: int  # choice index within the request
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in this sequence's blocks
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    logprobs: list[TokenLogprob] = field(default_factory=list)
    detok: DetokenizerState = field(default_factory=DetokenizerState)
    metrics: RequestMetrics | None = None
    num_reported_tokens: int = 0  # output tokens already handed out
    lora_uid: int = 0  # the adapter pool's id of params.lora_name (0: base model only)
    lora_slot: int = -1  # its resident slot while running (-1: none)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return (
            self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
