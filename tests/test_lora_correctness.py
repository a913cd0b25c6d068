"""Multi-LoRA greedy output equals transformers + PEFT, token for token.

Tiny float32 models (Llama, and Qwen2-MoE whose layer 1 is a dense MLP and whose MoE
layers have a shared expert), adapters written by PEFT with ``init_lora_weights=False``
(random A and B: each adapter really changes the tokens) at different ranks, one with
rsLoRA, with different target modules. Each engine run is ONE mixed batch: requests of
several adapters and base-only requests at once, some with the same prompt (so the
prefix cache must keep adapters apart). The references run each request alone through
``PeftModel`` (or the plain base model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.llm_engine import LLMEngine
from shoal.runtime.sampling_params import SamplingParams
from shoal.runtime.testing import make_tiny_adapter

NEW_TOKENS = 16

LLAMA_ADAPTERS = {
    "r4-qv-down": dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=1),
    "r8-rslora-kogu": dict(
        rank=8,
        alpha=8,
        target_modules=("k_proj", "o_proj", "gate_proj", "up_proj"),
        seed=2,
        use_rslora=True,
    ),
    "r16-all": dict(
        rank=16,
        alpha=16,
        target_modules=(
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
        seed=3,
        weight_scale=0.5,
    ),
    "r2-mlp": dict(rank=2, alpha=4, target_modules=("gate_proj", "up_proj", "down_proj"), seed=4),
}
MOE_ADAPTERS = {
    # attention everywhere, the dense MLP of layer 1 only
    "attn-dense": dict(
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"),
        seed=5,
        layers=None,
    ),  # fmt: skip
    # attention and o_proj, rsLoRA, rank 4; (its gate_proj also hits layer 0's shared expert)
    "attn-rslora": dict(
        rank=4,
        alpha=8,
        target_modules=("k_proj", "o_proj", "up_proj"),
        seed=6,
        use_rslora=True,
    ),  # fmt: skip
}


def prompts_for(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(99)
    lengths = [5, 17, 30, 9, 12, 3, 21, 40, 7, 26]
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]  # fmt: skip


def reference(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    model.generation_config.eos_token_id = None
    out = []
    for prompt in prompts:
        with torch.no_grad():
            tokens = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        out.append(tokens[0, len(prompt) :].tolist())
    return out


def build_case(base: Path, root: Path, specs: dict) -> dict:
    """Adapters on disk, the mixed workload and its references."""
    adapters = {name: make_tiny_adapter(base, root / name, **kw) for name, kw in specs.items()}
    names = [None, *adapters]
    prompts = prompts_for(200, 2 * len(names) + 2)
    shared = max(prompts, key=len)  # several full KV blocks: the prefix cache sees it
    # request i: adapter names[i % len], plus the first prompt under every adapter too
    workload = [(names[i % len(names)], p) for i, p in enumerate(prompts)]
    workload += [(name, shared) for name in names]
    expected: dict[int, list[int]] = {}
    for name in names:
        rows = [i for i, (n, _) in enumerate(workload) if n == name]
        refs = reference(base, adapters.get(name), [workload[i][1] for i in rows])
        expected.update(zip(rows, refs, strict=True))
    return {
        "base": base,
        "adapters": adapters,
        "workload": workload,
        "expected": expected,
        "shared": shared,
    }


@pytest.fixture(scope="module")
def llama_case(tiny_llama, tmp_path_factory):
    return build_case(tiny_llama, tmp_path_factory.mktemp("llama-adapters"), LLAMA_ADAPTERS)


@pytest.fixture(scope="module")
def moe_case(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("qwen2_moe")
    return build_case(base, tmp_path_factory.mktemp("moe-adapters"), MOE_ADAPTERS)


def run_engine(case: dict, **overrides) -> tuple[LLMEngine, list[list[int]]]:
    cfg = dict(
        model=str(case["base"]),
        dtype="float32",
        device="cpu",
        block_size=8,
        num_kv_blocks=256,
        lora_modules={name: str(path) for name, path in case["adapters"].items()},
    )
    cfg.update(overrides)
    engine = LLMEngine(EngineConfig(**cfg))
    params = [
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, lora_name=name)
        for name, _ in case["workload"]
    ]
    outs = engine.generate([p for _, p in case["workload"]], params)
    return engine, [o.outputs[0].token_ids for o in outs]


def assert_exact(case: dict, got: list[list[int]]) -> None:
    for i, (name, _) in enumerate(case["workload"]):
        assert got[i] == case["expected"][i], f"request {i} (adapter {name}) differs"


def test_adapters_change_the_output(llama_case):
    """Guard: each adapter's reference differs from the base model's on the same prompt,
    so the exactness tests below could fail."""
    shared_rows = {name: i for i, (name, p) in enumerate(llama_case["workload"])
                   if p == llama_case["shared"]}  # fmt: skip
    base_tokens = llama_case["expected"][shared_rows[None]]
    for name in LLAMA_ADAPTERS:
        assert llama_case["expected"][shared_rows[name]] != base_tokens, name


def test_llama_mixed_batch_matches_peft(llama_case):
    engine, got = run_engine(llama_case)
    assert_exact(llama_case, got)
    stats = engine.lora.stats()
    assert stats["resident"] == len(LLAMA_ADAPTERS)
    assert stats["evictions_total"] == 0


def test_llama_chunked_prefill_and_no_prefix_cache(llama_case):
    """Prefill chunks of at most 16 tokens share steps with decodes of other adapters."""
    _, got = run_engine(llama_case, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert_exact(llama_case, got)


def test_two_slots_four_adapters_swap_and_stay_exact(llama_case):
    """--max-loras 2 with 4 adapters in flight: requests wait for a slot, idle adapters
    are evicted and swapped back in, and every output is still exact."""
    engine, got = run_engine(llama_case, max_loras=2)
    assert_exact(llama_case, got)
    stats = engine.lora.stats()
    assert stats["resident"] == 2
    assert stats["evictions_total"] >= 2
    assert stats["loads_total"] >= 4


def test_host_cache_of_one_reads_adapters_back_from_disk(llama_case):
    """--max-cpu-loras 1: most adapters leave host memory and are read from disk again in
    the background when their turn comes; outputs stay exact."""
    engine, got = run_engine(llama_case, max_loras=2, max_cpu_loras=1)
    assert_exact(llama_case, got)
    assert engine.lora.stats()["cpu_cached"] == 1


def test_moe_mixed_batch_matches_peft(moe_case):
    engine, got = run_engine(moe_case)
    assert_exact(moe_case, got)
    # the adapters reach the dense layer's MLP and the MoE layer's shared expert
    modules = {m for adapter in engine.lora.host.values() for m in adapter.modules}
    assert "model.layers.1.mlp.gate_proj" in modules
    assert "model.layers.0.mlp.shared_expert.up_proj" in modules


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-gather"])
def test_gathered_decodes_are_exact(llama_case, monkeypatch, kernel):
    """Many adapters decoding at once go through the gathered batch (the compiled kernel,
    or torch's gather + bmm without it); outputs stay exact either way."""
    from shoal.runtime.kernels import lora_cpu
    from shoal.runtime.lora.layers import LoRAStack

    if not kernel:
        monkeypatch.setattr(lora_cpu, "bgmv_cpu", lambda *args: False)
    calls = []
    original = LoRAStack._apply_gathered

    def spy(self, *args):
        calls.append(args[3] - args[2])  # rows in the gathered batch
        return original(self, *args)

    monkeypatch.setattr(LoRAStack, "_apply_gathered", spy)
    _, got = run_engine(llama_case)
    assert_exact(llama_case, got)
    assert calls and max(calls) >= 4


def test_prefix_cache_never_crosses_adapters(llama_case):
    """The shared prompt runs first on the base model alone (its KV blocks cached), then
    under every adapter: each must compute its own KV and match PEFT; the base model
    asked again does hit its cache."""
    rows = {name: i for i, (name, p) in enumerate(llama_case["workload"])
            if p == llama_case["shared"]}  # fmt: skip
    case = dict(llama_case, workload=[(None, llama_case["shared"])])
    engine, got = run_engine(case)
    assert got == [llama_case["expected"][rows[None]]]
    order = [None, *LLAMA_ADAPTERS, None]
    for name in order:
        params = SamplingParams(
            temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, lora_name=name
        )
        hits_before = engine.block_manager.prefix_hits
        (out,) = engine.generate([llama_case["shared"]], params)
        assert out.outputs[0].token_ids == llama_case["expected"][rows[name]], name
        hit = engine.block_manager.prefix_hits > hits_before
        assert hit == (name is None), name  # only the base model finds its blocks


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-path"])
def test_bfloat16_mixed_batch_runs_on_both_cpu_paths(llama_case, monkeypatch, kernel):
    """bf16 models keep float32 adapter stacks on CPU: the kernel takes bf16 activations,
    the torch path upcasts. Not token-exact against PEFT (bf16 rounding differs), so:
    every request completes, and most of them agree with the float32 references on
    their first tokens (a wrong slot or a lost module would disagree at once)."""
    from shoal.runtime.kernels import lora_cpu

    if not kernel:
        monkeypatch.setattr(lora_cpu, "load", lambda: None)
        monkeypatch.setattr(lora_cpu, "bgmv_cpu", lambda *args: False)
    engine, got = run_engine(llama_case, dtype="bfloat16")
    assert all(len(tokens) == NEW_TOKENS for tokens in got)
    agree = sum(got[i][:3] == llama_case["expected"][i][:3] for i in range(len(got)))
    assert agree >= 0.8 * len(got), f"{agree}/{len(got)} agree on the first 3 tokens"
    assert next(iter(engine.lora.stacks.values())).a.dtype == torch.float32


def test_adapter_unreadable_after_eviction_fails_its_requests_only(llama_case, tmp_path):
    """An adapter dropped from host memory whose files then went bad cannot be swapped
    back in: its requests end (abort) instead of waiting forever; others are exact."""
    import shutil

    names = list(LLAMA_ADAPTERS)
    broken = tmp_path / "broken"
    shutil.copytree(llama_case["adapters"][names[0]], broken)
    adapters = {"broken": broken, **llama_case["adapters"]}  # first: evicted by the rest
    case = dict(llama_case, adapters=adapters)
    cfg = dict(model=str(case["base"]), dtype="float32", device="cpu", block_size=8,
               num_kv_blocks=256, max_loras=1, max_cpu_loras=1,
               lora_modules={name: str(path) for name, path in adapters.items()})  # fmt: skip
    engine = LLMEngine(EngineConfig(**cfg))
    assert all(engine.lora.by_uid[uid].name != "broken" for uid in engine.lora.host)
    (broken / "adapter_model.safetensors").write_bytes(b"gone bad")
    work = [(None, llama_case["shared"]), ("broken", llama_case["shared"])]
    work += [(n, p) for n, p in llama_case["workload"] if n == names[1]][:2]
    params = [
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, lora_name=n)
        for n, _ in work
    ]
    outs = engine.generate([p for _, p in work], params)
    assert outs[1].outputs[0].finish_reason == "abort"
    for (name, prompt), out in zip(work, outs, strict=True):
        if name == "broken":
            continue
        i = next(i for i, (n, p) in enumerate(llama_case["workload"]) if n == name and p == prompt)
        assert out.outputs[0].token_ids == llama_case["expected"][i], name
