"""What the bench sends: seeded request lists and named workloads. Pure, no I/O.

Prompts are lists of token ids drawn from the tokenizer's ordinary (non-special) ids, so
both engines see exactly the same prompt lengths with no re-tokenization drift. Outputs
are forced to an exact length with `ignore_eos` + `max_tokens`, so every engine produces
the same number of tokens for the same request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """A named load pattern.

    `rate` None is a closed loop: `concurrency` clients each send their next request as
    soon as the previous one finishes. Otherwise requests arrive as a Poisson process at
    `rate` requests/s, with no cap on how many are in flight.
    """

    name: str
    num_requests: int
    prompt_len: tuple[int, int]  # inclusive range, uniform
    output_len: tuple[int, int]  # inclusive range, uniform
    concurrency: int = 32
    rate: float | None = None

    @property
    def closed_loop(self) -> bool:
        return self.rate is None

    def describe(self) -> str:
        def span(r: tuple[int, int]) -> str:
            return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"

        load = f"{self.concurrency} concurrent" if self.closed_loop else f"Poisson {self.rate}/s"
        return (
            f"{load}, {self.num_requests} req, in {span(self.prompt_len)}"
            f" / out {span(self.output_len)}"
        )


def default_workloads(quick: bool = False) -> list[Workload]:
    """The default set: the issue's headline config, a mixed-length closed loop and Poisson.

    `quick` shrinks request counts so a smoke run takes a minute or two per engine.
    """
    scale = 4 if quick else 1
    return [
        Workload("headline", 128 // scale, (128, 128), (64, 64)),
        Workload("closed-mixed", 64 // scale, (128, 1024), (64, 256)),
        *[
            Workload(f"poisson-{rate:g}", 32 // scale, (128, 1024), (64, 256), rate=rate)
            for rate in (1.0, 2.0, 4.0)
        ],
    ]


def make_requests(
    workload: Workload, token_ids: Sequence[int], seed: int = 0, variant: int = 0
) -> list[BenchRequest]:
    """`workload.num_requests` requests with seeded random lengths and prompt tokens.

    `token_ids` is the pool prompts are drawn from (the tokenizer's non-special ids).
    The same seed gives the same requests for every engine. `variant` changes the prompt
    tokens but not the lengths: a repeated run does the same work without hitting the
    prefix cache its first run filled.
    """
    if not token_ids:
        raise ValueError("no token ids to build prompts from")
    lengths = random.Random(f"{seed}:{workload.name}")
    tokens = random.Random(f"{seed}:{workload.name}:{variant}")
    requests = []
    for _ in range(workload.num_requests):
        n_in = lengths.randint(*workload.prompt_len)
        n_out = lengths.randint(*workload.output_len)
        requests.append(BenchRequest([tokens.choice(token_ids) for _ in range(n_in)], n_out))
    return requests


def warmup_prompt(token_ids: Sequence[int], length: int = 64) -> list[int]:
    """A prompt no workload uses (its own seed), so warm-up leaves nothing in a prefix cache
    that a measured request could hit."""
    rng = random.Random("warm-up")
    return [rng.choice(token_ids) for _ in range(length)]


def static_batches(requests: Sequence[BenchRequest], batch_size: int) -> list[list[BenchRequest]]:
    """Requests in arrival order cut into fixed batches, as a static-batching server runs them."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
