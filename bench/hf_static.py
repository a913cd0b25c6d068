"""The transformers baseline: static batching with `model.generate`, in process, no HTTP.

What a server without continuous batching does: take the next `batch_size` requests, pad
them on the left to the longest prompt, generate until the longest requested output is
done, return. Requests in a batch that wanted fewer tokens still ride along, so only the
tokens each request asked for are counted. Timestamps come from a stopping criterion,
which `generate` calls once after every step: the first call is the first token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from bench.stats import RequestRecord
from bench.workload import BenchRequest, static_batches


class _StepClock:
    """A StoppingCriteria that never stops and notes when each step finished."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def load(model_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.eval()


def run_batch(model, batch: Sequence[BenchRequest], pad_id: int) -> list[RequestRecord]:
    """One static batch; every request in it is sent at the batch's start."""
    import torch
    from transformers import StoppingCriteriaList

    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt) :] = 1
    new_tokens = max(r.max_tokens for r in batch)
    clock = _StepClock()
    sent = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # the ignore_eos of generate
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    if out.shape[1] - width != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(
            f"generate made {out.shape[1] - width} tokens over {len(clock.times)} steps, "
            f"asked for {new_tokens}"
        )
    return [
        RequestRecord(
            sent=sent,
            first_token=clock.times[0],
            # a request's last token is out after its own max_tokens-th step
            finished=clock.times[r.max_tokens - 1],
            prompt_tokens=len(r.prompt),
            output_tokens=r.max_tokens,
        )
        for r in batch
    ]


def run_static(
    model, requests: Sequence[BenchRequest], batch_size: int, pad_id: int
) -> list[RequestRecord]:
    """Batches back to back, as a closed loop of `batch_size` clients sees them.

    Timestamps are the step times inside `generate`, as if it streamed: generous to the
    baseline, whose real clients only get their tokens when the whole batch is done.
    """
    records: list[RequestRecord] = []
    for batch in static_batches(requests, batch_size):
        records += run_batch(model, batch, pad_id)
    return records
