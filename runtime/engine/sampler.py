"""Turns a step's logits into tokens: penalties, temperature, top-k/top-p, seeded or
batched random draws, greedy argmax, and logprobs.

Rows are sequences that complete their prompt this step. Work that a row does not
ask for (penalties, top-k/p, logprobs) is skipped for it, so an all-greedy batch costs
one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.runtime.engine.outputs import TokenLogprob
from shoal.runtime.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """HF-style repetition penalty over prompt+output; OpenAI presence/frequency over
    the output. `logits` is one row [V], modified in place."""
    p = seq.params
    vocab = logits.shape[-1]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in seq.token_ids if t < vocab}), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long)
        counts = torch.zeros(vocab, dtype=logits.dtype).scatter_add_(
            0, out, torch.ones_like(out, dtype=logits.dtype)
        )
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask one row [V] to its top-k and nucleus."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [len(seqs), V] on any device; sampling happens on the CPU
        (the draws must be reproducible across devices for seeded requests)."""
        logits = logits.float().cpu()
        raw = logits
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        logprobs = torch.log_softmax(raw, -1) if any(want_logprobs) else None

        token_ids: list[int] = [0] * len(seqs)
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy and not _penalized(s)]
        greedy_set = set(greedy_rows)
        if greedy_rows:
            picked = raw[greedy_rows].argmax(-1).tolist()
            for i, t in zip(greedy_rows, picked, strict=True):
                token_ids[i] = t
        for i, seq in enumerate(seqs):
            if i in greedy_set:
                continue
            token_ids[i] = self._sample_row(raw[i].clone(), seq)

        results: list[TokenLogprob | None] = []
        for i, seq in enumerate(seqs):
            if not want_logprobs[i]:
                results.append(None)
                continue
            row = logprobs[i]
            k = seq.params.logprobs
            top = []
            if k:
                values, ids = torch.topk(row, k)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            results.append(TokenLogprob(token_ids[i], float(row[token_ids[i]]), top))
        return SampleResult(token_ids, results)

    def _sample_row(self, row: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        row = apply_penalties(row, seq)
        if p.greedy:
            return int(row.argmax())
        row = _top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and needs one
        # RNG call per row, so a request's seed alone decides its tokens.
        generator = seq.generator or self.generator
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return int((probs / noise).argmax())


def _penalized(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
