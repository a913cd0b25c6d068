"""A request's state, to bytes and back: what the target needs to continue a sequence
token for token (tokens, sampling parameters, RNG state, detokenizer offsets, stop
conditions, logprobs so far). Pure: no engine, no I/O.

Fields other parts add to `Sequence` or `SamplingParams` (e.g. an adapter name) travel
too when they hold plain values, so the state follows the dataclasses as they grow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from shoal.runtime.engine.outputs import RequestMetrics, TokenLogprob
from shoal.runtime.engine.sequence import DetokenizerState, Sequence, SequenceStatus
from shoal.runtime.sampling_params import SamplingParams

# Sequence fields handled explicitly, or that belong to one worker only.
_SPECIAL = {
    "request_id",
    "index",
    "prompt_token_ids",
    "params",
    "arrival_time",
    "seq_id",
    "output_token_ids",
    "status",
    "num_computed_tokens",
    "block_table",
    "generator",
    "logprobs",
    "detok",
    "metrics",
    # worker-local handles of the adapter pool: the target resolves params.lora_name
    "lora_uid",
    "lora_slot",
}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _age(now: float, t: float | None) -> float | None:
    return None if t is None else now - t


def encode(seq: Sequence, *, num_computed_tokens: int) -> tuple[bytes, bytes]:
    """(state JSON, generator state). `num_computed_tokens` is how many tokens' K/V the
    target receives (0 for a state-only move: it recomputes them)."""
    now = time.monotonic()
    m = seq.metrics
    extra = {
        f.name: getattr(seq, f.name)
        for f in dataclasses.fields(seq)
        if f.name not in _SPECIAL and _plain(getattr(seq, f.name))
    }
    params = {
        f.name: getattr(seq.params, f.name)
        for f in dataclasses.fields(seq.params)
        if _plain(getattr(seq.params, f.name))
    }
    state = {
        "request_id": seq.request_id,
        "index": seq.index,
        "prompt_token_ids": list(seq.prompt_token_ids),
        "output_token_ids": list(seq.output_token_ids),
        "params": params,
        "num_computed_tokens": num_computed_tokens,
        "logprobs": [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in seq.logprobs],
        "detok": dataclasses.asdict(seq.detok),
        "ages": {
            "arrival": now - seq.arrival_time,
            "first_scheduled": _age(now, m.first_scheduled_time),
            "first_token": _age(now, m.first_token_time),
            "last_token": _age(now, m.last_token_time),
        },
        "extra": extra,
    }
    generator = b""
    if seq.generator is not None:
        generator = seq.generator.get_state().numpy().tobytes()
    return json.dumps(state, separators=(",", ":")).encode(), generator


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def decode(state: bytes, generator: bytes) -> Sequence:
    """A Sequence holding no blocks yet: RUNNING if K/V comes with it, else WAITING."""
    s = json.loads(state)
    now = time.monotonic()
    ages = s["ages"]

    def at(key: str) -> float | None:
        return None if ages.get(key) is None else now - ages[key]

    params = SamplingParams(**_known(SamplingParams, s["params"]))
    seq = Sequence(
        s["request_id"],
        s["index"],
        list(s["prompt_token_ids"]),
        params,
        arrival_time=now - ages["arrival"],
        output_token_ids=list(s["output_token_ids"]),
        metrics=RequestMetrics(
            arrival_time=now - ages["arrival"],
            first_scheduled_time=at("first_scheduled"),
            first_token_time=at("first_token"),
            last_token_time=at("last_token"),
        ),
        **_known(Sequence, {k: v for k, v in s["extra"].items() if k not in _SPECIAL}),
    )
    seq.logprobs = [TokenLogprob(t, lp, [tuple(x) for x in top]) for t, lp, top in s["logprobs"]]
    seq.detok = DetokenizerState(**_known(DetokenizerState, s["detok"]))
    seq.num_computed_tokens = int(s["num_computed_tokens"])
    seq.status = SequenceStatus.RUNNING if seq.num_computed_tokens else SequenceStatus.WAITING
    if generator:
        g = torch.Generator()
        g.set_state(torch.frombuffer(bytearray(generator), dtype=torch.uint8))
        seq.generator = g
    return seq
