"""The engine's greedy tokens equal transformers' generate(), token for token.

Every architecture, float32, tiny random models. The scenarios stress the paged cache:
prompts of different lengths crossing block boundaries, shared prefixes, requests
arriving while others decode, chunked prefill, prefix caching on and off, and a KV
cache so small that sequences are preempted and recomputed. The sampled token's
logprob is compared with transformers' log-softmax at the same step (tolerance below).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.llm_engine import LLMEngine
from shoal.runtime.sampling_params import SamplingParams
from shoal.runtime.testing import make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-4  # fp32: the two implementations differ only in summation order


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    shared = torch.randint(3, vocab, (19,), generator=g).tolist()

    def rand(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        rand(3),  # shorter than a block
        rand(8),  # exactly one block (block_size 8)
        rand(23),  # crosses block boundaries
        shared + rand(5),  # these two share a 19-token prefix (two full blocks + 3)
        shared + rand(11),
        rand(41),
    ]


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tmp_path_factory):
    """(model dir, prompts, transformers' greedy tokens and logprobs) per architecture."""
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, like ignore_eos
    prompts = prompts_for(min(hf.config.vocab_size, 200))
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logprobs = [
            torch.log_softmax(score[0].float(), -1)[t].item()
            for score, t in zip(out.scores, tokens, strict=True)
        ]
        expected.append((tokens, logprobs))
    return path, prompts, expected


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)


def engine_for(path, **overrides) -> LLMEngine:
    cfg = dict(model=str(path), dtype="float32", device="cpu", block_size=8, num_kv_blocks=256)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def assert_matches(outputs, expected, indices=None):
    indices = range(len(expected)) if indices is None else indices
    for out, i in zip(outputs, indices, strict=True):
        assert out.outputs[0].token_ids == expected[i][0], f"prompt {i} diverged"


def test_batch_matches_transformers_with_logprobs(arch_case):
    path, prompts, expected = arch_case
    engine = engine_for(path)
    outputs = engine.generate(prompts, greedy(logprobs=1))
    assert_matches(outputs, expected)
    for out, (_, want) in zip(outputs, expected, strict=True):
        got = [lp.logprob for lp in out.outputs[0].logprobs]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=LOGPROB_ATOL)


def test_requests_arriving_while_others_decode(arch_case):
    path, prompts, expected = arch_case
    engine = engine_for(path, max_num_batched_tokens=16)  # chunked prefill on
    finished, mixed_steps = {}, 0
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:  # one new request every second step
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, greedy())
        sched_before = engine.scheduler
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if len(sched_before.running) > 1:
            mixed_steps += 1
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    assert mixed_steps > 0
    assert_matches([finished[f"r{i}"] for i in range(len(prompts))], expected)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_on_and_off(arch_case, prefix_caching):
    path, prompts, expected = arch_case
    engine = engine_for(path, enable_prefix_caching=prefix_caching)
    first = engine.generate([prompts[3]], greedy())
    second = engine.generate([prompts[4]], greedy())  # shares 19 tokens with prompts[3]
    again = engine.generate([prompts[3]], greedy())  # fully cached but its last block
    assert_matches(first + second + again, expected, [3, 4, 3])
    hits = engine.stats().prefix_cache_hits_total
    assert (hits >= 16 + 16) if prefix_caching else hits == 0


def test_preemption_by_recompute(arch_case):
    path, prompts, expected = arch_case
    # 12 blocks of 8 tokens: not enough for all six sequences' 35..73 tokens at once.
    engine = engine_for(path, num_kv_blocks=12, max_num_batched_tokens=32)
    outputs = engine.generate(prompts, greedy())
    assert engine.stats().num_preemptions_total > 0
    assert_matches(outputs, expected)
