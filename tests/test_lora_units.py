"""The LoRA runtime's deciding parts without a model: PEFT names and config checks, the
step's segments and gathered decodes, slot choice, and the CPU BGMV kernel against its
definition."""

from __future__ import annotations

import pytest
import torch

from shoal.runtime.kernels.lora import bgmv_torch
from shoal.runtime.lora.adapter import (
    BASE_MISMATCH,
    INVALID,
    RANK_TOO_LARGE,
    LoRALoadError,
    TargetShape,
    build_adapter,
    check_config,
    module_key,
)
from shoal.runtime.lora.layers import build_segments, split_decodes
from shoal.runtime.lora.pool import AdapterEntry, SwapHistogram, choose_slot

Q = "model.layers.0.self_attn.q_proj"


def test_module_key():
    assert module_key(f"base_model.model.{Q}.lora_A.weight") == (Q, "A")
    assert module_key(f"base_model.model.{Q}.lora_B.default.weight") == (Q, "B")
    assert module_key("base_model.model.lm_head.weight") is None


@pytest.mark.parametrize(
    "config, code",
    [
        ({"r": 32}, RANK_TOO_LARGE),
        ({"r": 8, "rank_pattern": {"q_proj": 64}}, RANK_TOO_LARGE),
        ({"r": 8, "use_dora": True}, INVALID),
        ({"r": 8, "modules_to_save": ["lm_head"]}, INVALID),
        ({"r": 8, "peft_type": "IA3"}, INVALID),
        ({"r": "eight"}, INVALID),
        ([1, 2], INVALID),
    ],
)
def test_check_config_rejects(config, code):
    with pytest.raises(LoRALoadError) as err:
        check_config(config, max_rank=16)
    assert err.value.code == code


def _tensors(r: int, i: int, o: int, module: str = Q) -> dict[str, torch.Tensor]:
    return {
        f"base_model.model.{module}.lora_A.weight": torch.randn(r, i),
        f"base_model.model.{module}.lora_B.weight": torch.randn(o, r),
    }


def test_build_adapter_scales_and_checks_shapes():
    targets = {Q: TargetShape(64, 64)}
    plain = build_adapter("a", "/x", {"r": 4, "lora_alpha": 8}, _tensors(4, 64, 64), targets, 16)
    assert plain.modules[Q].scale == 2.0 and plain.rank == 4
    rs = build_adapter(
        "a", "/x", {"r": 4, "lora_alpha": 8, "use_rslora": True}, _tensors(4, 64, 64), targets, 16
    )
    assert rs.modules[Q].scale == 4.0  # alpha / sqrt(r)
    with pytest.raises(LoRALoadError) as err:
        build_adapter(
            "a", "/x", {"base_model_name_or_path": "other"}, _tensors(4, 32, 64), targets, 16
        )
    assert err.value.code == BASE_MISMATCH and "other" in err.value.message
    with pytest.raises(LoRALoadError) as err:
        build_adapter("a", "/x", {}, _tensors(4, 64, 64, "model.layers.9.self_attn.q_proj"),
                      targets, 16)  # fmt: skip
    assert err.value.code == BASE_MISMATCH
    with pytest.raises(LoRALoadError) as err:
        build_adapter("a", "/x", {}, _tensors(4, 64, 64, "model.layers.0.mlp.gate"), targets, 16)
    assert err.value.code == INVALID


def test_segments_and_gathered_decodes():
    # decodes first: base, base, slot 2, slot 2, slot 0, slot 5, slot 1; then prefills
    seqs = [(-1, 1), (-1, 1), (2, 1), (2, 1), (0, 1), (5, 1), (1, 1), (3, 10), (-1, 4), (3, 6)]
    segments = build_segments(seqs)
    assert segments == [(2, 4, 2), (4, 5, 0), (5, 6, 5), (6, 7, 1), (7, 17, 3), (21, 27, 3)]
    gather, slots, rest = split_decodes(segments, num_decode_tokens=7)
    assert gather == (2, 7) and slots == [2, 2, 0, 5, 1]
    assert rest == [(7, 17, 3), (21, 27, 3)]
    # few decoding adapters: segments only
    few = build_segments([(1, 1), (1, 1), (2, 1), (4, 8)])
    assert split_decodes(few, num_decode_tokens=3) == (None, [], few)


def test_choose_slot_prefers_free_then_least_recent_idle():
    def entry(name, last, pins=0):
        return AdapterEntry(name=name, path="/", uid=1, rank=8, pins=pins, last_used=last)

    assert choose_slot([entry("a", 1.0), None]) == 1
    assert choose_slot([entry("a", 5.0), entry("b", 2.0), entry("c", 1.0, pins=1)]) == 1
    assert choose_slot([entry("a", 5.0, pins=2), entry("b", 2.0, pins=1)]) is None


def test_swap_histogram_is_cumulative():
    h = SwapHistogram()
    for s in (0.0001, 0.002, 100.0):
        h.observe(s)
    buckets = dict(h.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.0025"] == 2 and buckets["+Inf"] == 3


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cpu_kernel_matches_definition(dtype, atol):
    from shoal.runtime.kernels.lora_cpu import bgmv_cpu, load

    if load() is None:
        pytest.fail("the CPU LoRA kernel did not build (a C++ compiler is part of the setup)")
    g = torch.Generator().manual_seed(0)
    slots_n, rank, in_dim, out_dim, t = 5, 12, 96, 80, 9
    a = torch.randn(slots_n, rank, in_dim, generator=g)  # [slots, R, in], float32 always
    b = torch.randn(slots_n, rank, out_dim, generator=g)  # [slots, R, out]
    x = torch.randn(t, in_dim, generator=g).to(dtype)
    fused = torch.randn(t, out_dim + 24, generator=g).to(dtype)
    slots = torch.tensor([0, -1, 3, 3, 4, -1, 1, 0, 2])
    scales = torch.rand(slots_n, generator=g)
    expected = fused.float().clone()
    bgmv_torch(
        expected[:, 8 : 8 + out_dim],
        x.float(),
        a.transpose(1, 2),
        b,
        slots,
        scales,
    )
    assert bgmv_cpu(fused[:, 8 : 8 + out_dim], x, a, b, slots, scales)
    torch.testing.assert_close(fused.float(), expected, atol=atol, rtol=2**-7)
    untouched = fused[:, :8].float()
    torch.testing.assert_close(untouched, expected[:, :8])


def test_bench_cases_and_popularity():
    from collections import Counter

    from bench.lora import Case, assign_models, cases

    names = [c.name for c in cases((1, 8, 64))]
    assert names == ["base-only", "1 uniform", "8 uniform", "8 zipf", "64 uniform", "64 zipf"]
    assert set(assign_models(Case(0, "-"), 5, 0)) == {"bench-llama"}
    uniform = Counter(assign_models(Case(8, "uniform"), 4000, 0))
    zipf = Counter(assign_models(Case(8, "zipf"), 4000, 0))
    assert len(uniform) == 8 and max(uniform.values()) < 600
    assert zipf["a0"] > 3 * zipf["a7"]  # the most popular adapter dominates
    assert assign_models(Case(8, "zipf"), 50, 1) == assign_models(Case(8, "zipf"), 50, 1)
