"""Shoal's models against transformers, the oracle, on tiny random-weight checkpoints.

Float32 tolerance: max |shoal - transformers| over all logits <= 1e-4. The two compute
the same operations in the same order except attention's and the MoE sum's internal
summation order; measured differences are ~1e-5 on logits of magnitude ~10.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shoal.runtime.models import load_model
from shoal.runtime.testing import PagedRunner, build_metadata, decode_metadata, prefill_metadata

ATOL = 1e-4

# (case id, factory arch, overrides): every architecture, plus the rope variants.
CASES = [
    ("llama", "llama", {}),
    ("llama3-rope-tied", "llama3", {}),
    ("llama-linear-rope", "llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    # Llama 2 7B-style full multi-head attention, plus the optional biases
    (
        "llama-mha-biases",
        "llama",
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ),
    ("mistral", "mistral", {}),
    ("qwen2", "qwen2", {}),
    ("qwen3", "qwen3", {}),
    ("mixtral", "mixtral", {}),
    ("qwen2_moe", "qwen2_moe", {}),
    ("qwen3_moe", "qwen3_moe", {}),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tiny_model_factory):
    """(shoal model, info, transformers model) for one architecture, float32."""
    _, arch, overrides = request.param
    # a different seed per case, so same-shaped architectures get different weights
    path = tiny_model_factory(arch, seed=len(request.param[0]), **overrides)
    model, info = load_model(str(path), dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate a fixed number of tokens
    return model, info, hf


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def test_prompt_logits_match_transformers(case):
    model, info, hf = case
    prompt = random_prompt(29, info.vocab_size)
    runner = PagedRunner(model, info, block_size=8)
    got = runner.step({"a": prompt})["a"]
    assert got.dtype == torch.float32 and got.shape == (29, info.vocab_size)
    assert (got - hf_logits(hf, prompt)).abs().max().item() <= ATOL


def test_chunked_prefill_then_decode_match_transformers_at_every_position(case):
    """A 37-token prompt in two chunks (split mid-block, block_size 4: ten blocks), then six
    decode steps; every position's logits equal transformers' over the whole sequence."""
    model, info, hf = case
    prompt = random_prompt(37, info.vocab_size, seed=1)
    runner = PagedRunner(model, info, block_size=4)
    outs = [runner.step({"a": prompt[:13]})["a"], runner.step({"a": prompt[13:]})["a"]]
    seq = list(prompt)
    for _ in range(6):
        token = int(outs[-1][-1].argmax())
        seq.append(token)
        outs.append(runner.step({"a": [token]})["a"])
    got = torch.cat(outs)
    ref = hf_logits(hf, seq)
    assert got.shape == ref.shape == (43, info.vocab_size)
    assert (got - ref).abs().max().item() <= ATOL


def test_mixed_step_of_decodes_and_prefill_chunks(case):
    """One step holding two decodes and two prefill chunks (one of them a continuation)
    gives each sequence the logits it has alone."""
    model, info, hf = case
    a, b, c, d = (random_prompt(n, info.vocab_size, seed=10 + n) for n in (9, 14, 6, 21))
    runner = PagedRunner(model, info, block_size=4)
    runner.step({"a": a[:-1], "b": b[:-1], "c": c[:3]})  # three prefills in one step
    got = runner.step({"a": a[-1:], "b": b[-1:], "c": c[3:], "d": d})  # 2 decodes + 2 chunks
    for seq, ids in (("a", a), ("b", b)):
        assert (got[seq][-1] - hf_logits(hf, ids)[-1]).abs().max().item() <= ATOL
    assert (got["c"] - hf_logits(hf, c)[3:]).abs().max().item() <= ATOL
    assert (got["d"] - hf_logits(hf, d)).abs().max().item() <= ATOL


def test_greedy_generation_matches_transformers(case):
    model, info, hf = case
    prompt = random_prompt(11, info.vocab_size, seed=2)
    runner = PagedRunner(model, info, block_size=4)
    got = runner.greedy("a", prompt, 32, chunk_size=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert got == ref[0, len(prompt) :].tolist()


def test_tiny_models_generate_varied_text(case):
    """Random weights must not collapse into repeating a token (tests would be weak)."""
    model, info, _ = case
    out = PagedRunner(model, info).greedy("a", random_prompt(7, info.vocab_size, seed=3), 48)
    assert len(set(out)) >= 16
    assert max(out.count(t) for t in set(out)) <= 12


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("source", ["bfloat16-checkpoint", "float32-checkpoint"])
def test_bfloat16_loads_and_runs_close_to_float32(arch, source, tiny_model_factory):
    fp32_path = tiny_model_factory(arch)
    path = tiny_model_factory(arch, dtype="bfloat16") if source.startswith("bf") else fp32_path
    model, info = load_model(str(path), dtype="auto" if source.startswith("bf") else "bfloat16")
    assert info.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref_model, ref_info = load_model(str(fp32_path), dtype="float32")
    prompt = random_prompt(21, info.vocab_size, seed=4)
    got = PagedRunner(model, info).step({"a": prompt})["a"]
    ref = PagedRunner(ref_model, ref_info).step({"a": prompt})["a"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits; through 2 layers the logits stay within a few %.
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8


def test_float16_loads_and_runs(tiny_model_factory):
    model, info = load_model(str(tiny_model_factory("qwen2")), dtype="float16")
    assert info.dtype == torch.float16
    logits = PagedRunner(model, info).step({"a": random_prompt(9, info.vocab_size)})["a"]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_model_info_describes_the_checkpoint(tiny_model_factory):
    path = tiny_model_factory("qwen2_moe")
    _, info = load_model(str(path))
    assert info.architecture == "Qwen2MoeForCausalLM"
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (2, 2, 16)
    assert info.max_model_len == 2048
    assert info.dtype == torch.float32  # "auto": the checkpoint's dtype
    assert info.eos_token_ids == [2, 4]  # config's </s>, then generation_config's <|im_end|>


def test_tied_embeddings_share_one_tensor(tiny_model_factory):
    model, _ = load_model(str(tiny_model_factory("llama3")))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_metadata_helper_maps_slots_through_the_block_table():
    meta = build_metadata([(5, 1, [7, 2]), (0, 6, [3, 9])], block_size=4)
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 12, 13, 14, 15, 36, 37]
    assert meta.num_decodes == 1
    assert meta.query_start_loc == [0, 1, 7]
    assert meta.seq_lens_list == [6, 6]
    with pytest.raises(ValueError, match="decodes"):
        build_metadata([(0, 6, [3, 9]), (5, 1, [7, 2])], block_size=4)
    with pytest.raises(ValueError, match="too short"):
        build_metadata([(0, 9, [3, 9])], block_size=4)


def test_simple_metadata_helpers():
    pre = prefill_metadata(6, block_size=4, start=3)  # positions 3..8, blocks 0, 1, 2
    assert pre.slot_mapping.tolist() == [3, 4, 5, 6, 7, 8]
    assert pre.block_tables.tolist() == [[0, 1, 2]] and pre.seq_lens_list == [9]
    assert pre.num_decodes == 0
    dec = decode_metadata([4, 1], [[5, 6], [2]], block_size=4)
    assert dec.slot_mapping.tolist() == [24, 9] and dec.num_decodes == 2
    assert dec.block_tables.tolist() == [[5, 6], [2, 0]] and dec.seq_lens_list == [5, 2]


def test_experts_group_tokens_like_a_per_token_reference():
    """The grouped expert computation equals summing each token's chosen experts one by
    one, including experts that get no token and a single-token batch."""
    from shoal.runtime.models.config import MoeConfig
    from shoal.runtime.models.moe import SparseMoeBlock

    torch.manual_seed(0)
    block = SparseMoeBlock(16, MoeConfig(num_experts=6, top_k=2, intermediate_size=8,
                                         norm_topk_prob=True))  # fmt: skip
    for p in block.parameters():
        p.data.normal_()
    experts = block.experts

    def reference(x):
        weights, ids = block.gate(x)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for w, e in zip(weights[t], ids[t].tolist(), strict=True):
                gate, up = (experts.w13[e] @ x[t]).chunk(2)
                out[t] += w * (experts.w2[e] @ (torch.nn.functional.silu(gate) * up))
        return out, ids

    for n in (1, 3, 40):
        x = torch.randn(n, 16)
        ref, ids = reference(x)
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    assert len(set(ids.flatten().tolist())) == 6  # the 40-token batch used every expert


def test_bench_preset_is_the_issue_model():
    from shoal.runtime.testing.factory import tiny_config

    cfg = tiny_config("llama", preset="bench-llama", vocab_size=32000)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (512, 8, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (32000, 4096)
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        tiny_config("gpt2", vocab_size=512)
