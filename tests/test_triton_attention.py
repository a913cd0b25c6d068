"""The Triton paged-attention kernels against the torch path, under TRITON_INTERPRET=1.

Why a child process: ``triton.jit`` decides between interpreter and compiler when a kernel
is decorated, i.e. when its module is imported, from ``TRITON_INTERPRET`` at that moment.
Setting the variable inside this pytest process would come too late if any earlier test
had imported the kernel module, and would leak into every later test that imports a
Triton kernel (they would silently run interpreted). So this process builds the inputs
and the torch reference and never imports the kernel module; one child Python process,
started with ``TRITON_INTERPRET=1`` in its own environment, runs the kernels on the saved
inputs and saves the outputs (this file is the child's script: see ``__main__``); the
parametrized tests below compare. One child for all cases keeps Triton's import cost to
once per run.

Tolerances (outputs compared with the torch path run in fp32 on the same inputs):
- fp32 inputs: atol 1e-5, rtol 1e-5. Both sides compute in fp32; they differ only in
  summation order and the online softmax's rescaling (observed about 1e-6).
- bf16 and fp16 inputs: rtol 2**-7, atol 1e-3. The kernel computes in fp32 and rounds
  its output once, which alone costs up to 2**-8 relative for bf16 (half an ulp of its
  8-bit significand; fp16 is finer); twice that leaves room for fp32 differences without
  hiding a real error (a wrong mask or a wrong page moves outputs by O(1)).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shoal.runtime.kernels.tiling import (
    MIN_SPLIT_TOKENS,
    choose_tiles,
    decode_splits,
    next_power_of_2,
    prefill_tiles,
    split_size_for,
)
from shoal.runtime.layers.attention import AttentionMetadata, paged_attention_torch

# A step of decodes only: context lengths around the page sizes 16 and 32.
DECODE_SEQ_LENS = [1, 15, 16, 17, 32, 33, 64, 100]
LONG_DECODE_SEQ_LENS = [1, 17, 100, 300]

# Where the kernel children run: "cpu" (Triton's interpreter, the default) or, on a machine
# with a GPU, SHOAL_TRITON_DEVICE=cuda for the same comparisons with the kernels compiled
# and run on CUDA tensors (references stay on the CPU).
KERNEL_DEVICE = os.environ.get("SHOAL_TRITON_DEVICE", "cpu")


def _kernel_child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if KERNEL_DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    return env


# A mixed step, as the scheduler builds it: decodes first, then prefill chunks
# (query tokens, context length after the step): a whole prompt, a chunk after 30 cached
# tokens, a one-token chunk, a chunk longer than one prefill tile.
MIXED_DECODE_SEQ_LENS = [1, 16, 17, 33]
MIXED_CHUNKS = [(40, 40), (20, 50), (1, 31), (70, 73)]


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # "decode" -> paged_decode_attention_triton, "mixed" -> paged_attention_triton
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.float32
    layout: str = "default"  # "prefill_only": no decodes; "strided": query is a qkv view;
    # "long": decodes of contexts up to 300 (for splits)
    num_splits: int | None = None  # split decodes' contexts (flash-decoding); None: auto
    expect_error: str | None = None  # substring of the ValueError the kernel must raise


def _cases() -> list[Case]:
    cases = []
    for entry in ("decode", "mixed"):
        for hq, hkv in ((4, 4), (4, 2), (8, 2)):
            for d in (32, 64):
                for bs in (16, 32):
                    cases.append(
                        Case(f"{entry}-fp32-h{hq}kv{hkv}-d{d}-bs{bs}", entry, hq, hkv, d, bs)
                    )
        for hq, hkv, d, bs in ((4, 4, 64, 16), (4, 2, 32, 32), (8, 2, 64, 32)):
            cases.append(
                Case(
                    f"{entry}-bf16-h{hq}kv{hkv}-d{d}-bs{bs}", entry, hq, hkv, d, bs, torch.bfloat16
                )
            )
        # A group of 7 (Qwen2-7B's 28/4), head_dim 48 (padded to 64), pages smaller than
        # a tile: the masked and non-power-of-two paths.
        cases.append(Case(f"{entry}-fp32-h7kv1-d48-bs8", entry, 7, 1, 48, 8))
    cases += [
        Case("mixed-prefill-only", "mixed", 4, 2, 32, 16, layout="prefill_only"),
        # Decode contexts split into parallel parts and merged; short sequences get empty
        # parts, 40 asks for more parts than the longest context has tiles.
        Case("decode-split3-fp32", "decode", 4, 4, 32, 16, layout="long", num_splits=3),
        Case("decode-split40-fp32", "decode", 8, 2, 64, 32, layout="long", num_splits=40),
        Case("decode-split5-bf16", "decode", 8, 2, 64, 16, torch.bfloat16, "long", 5),
        Case("mixed-split2-fp32", "mixed", 4, 2, 32, 16, num_splits=2),
        Case("mixed-strided-query", "mixed", 8, 2, 64, 16, layout="strided"),
        Case("decode-strided-query-bf16", "decode", 4, 2, 32, 16, torch.bfloat16, "strided"),
        Case("decode-fp16-h8kv2-d64-bs16", "decode", 8, 2, 64, 16, torch.float16),
        Case("mixed-fp16-h8kv2-d64-bs16", "mixed", 8, 2, 64, 16, torch.float16),
        Case("error-decode-given-prefill", "decode", 4, 2, 32, 16, expect_error="one token per"),
        Case("error-heads-not-multiple", "mixed", 6, 4, 32, 16, expect_error="not a multiple"),
    ]
    return cases


CASES = _cases()


def _build_inputs(case: Case, seed: int) -> dict:
    """Random caches and queries for one case. Pages are handed out in a shuffled order and
    block tables are padded with page 0 (another sequence's page), so reading a wrong page
    or a position past the context changes the output."""
    g = torch.Generator().manual_seed(seed)
    if case.entry == "decode" and case.expect_error is None:
        seq_lens = LONG_DECODE_SEQ_LENS if case.layout == "long" else DECODE_SEQ_LENS
        q_lens, num_decodes = [1] * len(seq_lens), len(seq_lens)
    else:
        decodes = [] if case.layout == "prefill_only" else MIXED_DECODE_SEQ_LENS
        q_lens = [1] * len(decodes) + [q for q, _ in MIXED_CHUNKS]
        seq_lens = decodes + [s for _, s in MIXED_CHUNKS]
        num_decodes = len(decodes)
    bs = case.block_size
    pages_per_seq = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(pages_per_seq) + 2  # two spare pages nobody owns
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=g).to(case.dtype)
    v_cache = torch.randn(shape, generator=g).to(case.dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(len(seq_lens), max(pages_per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_seq):
        block_tables[i, :n] = torch.tensor(order[used : used + n], dtype=torch.int32)
        used += n
    query_start_loc = [0]
    for n in q_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    num_tokens, hq, hkv, d = query_start_loc[-1], case.num_heads, case.num_kv_heads, case.head_dim
    # "strided": as a model passes it, the query part of a fused qkv projection (a view).
    width = (hq + 2 * hkv) * d if case.layout == "strided" else hq * d
    qkv = torch.randn(num_tokens, width, generator=g).to(case.dtype)
    assert _query_of(qkv, hq, d).is_contiguous() is (case.layout != "strided")
    meta = {
        "slot_mapping": torch.zeros(num_tokens, dtype=torch.int64),  # unused: cache is filled
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "query_start_loc": query_start_loc,
        "seq_lens_list": list(seq_lens),
        "num_decodes": num_decodes,
    }
    return {
        "entry": case.entry,
        "qkv": qkv,
        "query": _query_of(qkv, hq, d),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "meta": meta,
        "scale": d**-0.5,
        "num_splits": case.num_splits,
    }


def _query_of(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The query heads of a (fused) projection output, as a [T, Hq, D] view."""
    return qkv[:, : num_heads * head_dim].view(qkv.shape[0], num_heads, head_dim)


def _to(obj, device: str):
    """Tensors in nested dicts moved to ``device`` (a no-op on cpu)."""
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict[str, dict], dict[str, dict]]:
    """Inputs per case, and what the child process under TRITON_INTERPRET=1 returned."""
    work = tmp_path_factory.mktemp("triton_attention")
    inputs = {}
    for seed, case in enumerate(CASES):
        inputs[case.name] = _build_inputs(case, seed)
        torch.save(inputs[case.name], work / f"{case.name}.in.pt")
    proc = subprocess.run(
        [sys.executable, __file__, str(work)],
        env=_kernel_child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    results = {c.name: torch.load(work / f"{c.name}.out.pt") for c in CASES}
    return inputs, results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_matches_torch(case: Case, interpreted) -> None:
    inputs, results = interpreted
    result = results[case.name]
    assert result["interpreted"] is (KERNEL_DEVICE == "cpu"), "interpreter on CPU, else not"
    if case.expect_error is not None:
        assert result.get("error", "").startswith("ValueError"), result
        assert case.expect_error in result["error"]
        return
    assert "error" not in result, result.get("error")
    x = inputs[case.name]
    meta = AttentionMetadata(**x["meta"])
    expected = paged_attention_torch(
        x["query"].float(), x["k_cache"].float(), x["v_cache"].float(), meta, x["scale"]
    )
    out = result["out"]
    assert out.dtype == case.dtype and out.shape == x["query"].shape
    if case.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out.float(), expected, atol=1e-3, rtol=2**-7)


def test_prefill_tiles_cover_every_chunk_token_once() -> None:
    # Two decodes, then chunks of 5, 1 and 9 tokens, cut into tiles of 4 tokens.
    query_start_loc = [0, 1, 2, 7, 8, 17]
    seqs, starts = prefill_tiles(query_start_loc, first_seq=2, block_q=4)
    assert seqs == [2, 2, 3, 4, 4, 4]
    assert starts == [2, 6, 7, 8, 12, 16]


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8, 32])
@pytest.mark.parametrize("decode", [True, False])
def test_tiles_fit_tl_dot_and_the_group(group: int, decode: bool) -> None:
    cfg = choose_tiles(group, head_dim=80, decode=decode)
    assert cfg.block_m >= 16 and cfg.tile_n >= 16 and cfg.block_d >= 16  # tl.dot minimum
    assert cfg.block_d == 128 and next_power_of_2(cfg.block_m) == cfg.block_m
    assert cfg.block_q >= 1 and cfg.block_q * group <= cfg.block_m  # a whole group per token
    if decode:
        assert cfg.block_q == 1  # one query token per decode
    else:
        assert cfg.block_q == cfg.block_m // group and cfg.block_m >= 64


def test_choose_tiles_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="need group >= 1"):
        choose_tiles(0, 64, decode=True)
    with pytest.raises(ValueError, match="elem_bytes 2 or 4"):
        choose_tiles(4, 64, decode=True, elem_bytes=1)


def test_split_sizes_cover_the_context_in_whole_tiles() -> None:
    for max_context in (1, 31, 32, 33, 300, 4096):
        for wanted in (1, 2, 3, 7, 40):
            splits, size = split_size_for(max_context, wanted, tile_n=32)
            assert 1 <= splits <= wanted and size % 32 == 0
            assert (splits - 1) * size < max_context <= splits * size  # none empty, all covered
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        split_size_for(100, 0, 32)


def test_decodes_split_only_when_sms_would_idle() -> None:
    # 1 sequence x 8 KV heads on 132 SMs, 8k context: split, in parts of >= 256 positions.
    splits, size = decode_splits(1, 8, 8192, tile_n=64, num_sms=132)
    assert splits > 1 and size >= MIN_SPLIT_TOKENS and splits * size >= 8192
    # 64 sequences x 8 KV heads already fill the GPU; a 200-token context is too short.
    assert decode_splits(64, 8, 8192, tile_n=64, num_sms=132)[0] == 1
    assert decode_splits(1, 8, 200, tile_n=64, num_sms=132)[0] == 1


# Compiled (not interpreted) for an H100/H200 (sm_90) by Triton's NVIDIA backend and the
# ptxas bundled with Triton; this needs no GPU and no driver. Shapes of served models:
# (dtype, query heads per KV head, head_dim).
SM90_CONFIGS = [
    ("bf16", 1, 64),
    ("bf16", 4, 128),
    ("bf16", 8, 128),
    ("fp16", 7, 80),
    ("bf16", 2, 256),
    ("fp32", 4, 64),
]
SM90_MAX_SHARED_BYTES = 227 * 1024  # per block on sm_90


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("triton_sm90")
    # Without TRITON_INTERPRET (so triton.jit builds a real JITFunction), with a private
    # cache so every run really compiles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "cache")
    proc = subprocess.run(
        [sys.executable, __file__, "--compile-sm90", str(work / "builds.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"compile child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((work / "builds.json").read_text())


SM90_MODES = ["decode", "decode-split", "combine", "prefill"]


@pytest.mark.parametrize("mode", SM90_MODES)
@pytest.mark.parametrize("config", SM90_CONFIGS, ids=["-".join(map(str, c)) for c in SM90_CONFIGS])
def test_kernel_compiles_for_sm90(config, mode: str, sm90_builds) -> None:
    build = sm90_builds[_build_key(*config, mode)]
    assert "error" not in build, build.get("error")
    assert build["cubin_bytes"] > 0
    assert build["shared_bytes"] <= SM90_MAX_SHARED_BYTES
    if config[0] != "fp32":  # fp32 on a GPU is a correctness path; spills are tolerated
        assert build["spill_store_bytes"] == 0, build["ptxas"]


def _build_key(dtype: str, group: int, head_dim: int, mode: str) -> str:
    return f"{dtype}-{group}-{head_dim}-{mode}"


def _arg_type(name: str, dtype: str, constexprs: dict) -> str:
    """Triton signature type of a kernel argument, as a launch with real tensors gives it."""
    if name in constexprs:
        return "constexpr"
    if name in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"):
        return f"*{dtype}"
    if name.startswith("partial_"):
        return "*fp32"  # split states
    if name.endswith("_ptr"):
        return "*i32"  # block tables, lengths, schedule
    return "fp32" if name == "scale_log2" else "i32"  # strides, counts


def _sm90_build(kernel, dtype: str, constexprs: dict, num_warps: int) -> dict:
    """Compile one specialisation for sm_90 and ask ptxas for its register report."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: _arg_type(name, dtype, constexprs) for name in kernel.arg_names}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps},
        )
    except Exception as e:  # reported per config by the test
        return {"error": f"{type(e).__name__}: {e}"}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run(
        [str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
        capture_output=True,
        text=True,
    ).stderr
    os.unlink(f.name)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
        "spill_store_bytes": int(spills.group(1)) if spills else -1,
        "ptxas": report,
    }


def _compile_sm90(out_path: Path) -> None:
    """Run in the compile child: every SM90_CONFIGS x SM90_MODES build, ptxas's report."""
    from shoal.runtime.kernels import paged_attention as kernels

    builds = {}
    for dtype, group, head_dim in SM90_CONFIGS:
        for mode in SM90_MODES:
            decode = mode != "prefill"
            cfg = choose_tiles(group, head_dim, decode, 4 if dtype == "fp32" else 2)
            if mode == "combine":
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": cfg.block_d, "BLOCK_S": 32}
                build = _sm90_build(kernels._combine_splits_kernel, dtype, constexprs, 4)
            else:
                constexprs = {
                    "HEAD_DIM": head_dim,
                    "BLOCK_D": cfg.block_d,
                    "GROUP": group,
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_Q": cfg.block_q,
                    "TILE_N": cfg.tile_n,
                    "PAGE_SIZE": 16,
                    "DECODE_ONLY": decode,
                    "SPLIT": mode == "decode-split",
                    "DOT_FP32": False,
                    "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                }
                build = _sm90_build(
                    kernels._paged_attention_kernel, dtype, constexprs, cfg.num_warps
                )
            builds[_build_key(dtype, group, head_dim, mode)] = build
    out_path.write_text(json.dumps(builds, indent=1))


# A tiny model run over the paged cache, step by step as the engine mixes requests, once
# with the torch path and once (in the interpreter child) on the Triton kernels: the
# kernels on the metadata build_metadata really makes and on the strided q/k/v the model
# really passes. Both runs route the model's attention calls through _route_attention, so
# the comparison is torch path vs Triton whatever else paged_attention() dispatches to.
MODEL_STEPS = [
    {"a": (0, 10)},  # a prompt alone
    {"a": (10, 13), "b": (0, 7)},  # two chunks, one with cached context
    {"a": (13, 14), "b": (7, 12), "c": (0, 9)},  # a decode and two chunks
    {"a": (14, 15), "b": (12, 13), "c": (9, 10)},  # decodes only, from here on
    {"a": (15, 16), "b": (13, 14), "c": (10, 11)},
    {"a": (16, 17), "b": (14, 15), "c": (11, 12)},
]


def _route_attention(attend, set_attr=setattr) -> None:
    """Point every loaded module's ``paged_attention`` (the model layers import it by
    name) at write_kv + ``attend(query, k_cache, v_cache, meta, scale)``."""
    import shoal.runtime.layers.attention as attention

    original = attention.paged_attention

    def paged_attention(query, key, value, k_cache, v_cache, meta, scale):
        attention.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return attend(query, k_cache, v_cache, meta, scale)

    for module in list(sys.modules.values()):
        if getattr(module, "paged_attention", None) is original:
            set_attr(module, "paged_attention", paged_attention)


def _run_model_steps(model_dir: str, attend, set_attr=setattr, device: str = "cpu"):
    """Float32 logits of every step, and the number of layers. Tokens are fixed in
    advance (not sampled), so both paths see the same inputs even if their logits differ."""
    from shoal.runtime.models import load_model
    from shoal.runtime.testing import PagedRunner

    model, info = load_model(model_dir, dtype="float32", device=device)
    _route_attention(attend, set_attr)  # after loading: the model modules are imported
    g = torch.Generator().manual_seed(7)
    tokens = {s: torch.randint(0, info.vocab_size, (20,), generator=g).tolist() for s in "abc"}
    runner = PagedRunner(model, info, block_size=4)
    logits = [
        {
            s: out.cpu()
            for s, out in runner.step({s: tokens[s][lo:hi] for s, (lo, hi) in st.items()}).items()
        }
        for st in MODEL_STEPS
    ]
    return logits, info.num_layers


def test_tiny_model_over_the_triton_kernel_matches_the_torch_path(
    tiny_model_factory, tmp_path, monkeypatch
):
    model_dir = str(tiny_model_factory("llama3"))  # GQA 4/2, head_dim 16, pages of 4
    # monkeypatch undoes the routing after this test.
    expected, _ = _run_model_steps(model_dir, paged_attention_torch, monkeypatch.setattr)
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, __file__, "--model", model_dir, str(out)],
        env=_kernel_child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    got = torch.load(out)
    # Both kernels ran: a mixed step per layer for the first three steps, decodes after.
    layers = got["num_layers"]
    assert got["calls"] == {"decode": 3 * layers, "mixed": 3 * layers}
    for step, (want, have) in enumerate(zip(expected, got["logits"], strict=True)):
        for seq in want:
            # fp32 through two layers: the kernels' ~1e-6 differences stay far below 1e-4.
            torch.testing.assert_close(
                have[seq],
                want[seq],
                atol=1e-4,
                rtol=1e-4,
                msg=lambda m, s=step, q=seq: f"step {s} seq {q}: {m}",
            )


def _model_child(model_dir: str, out_path: Path) -> None:
    """Run in the interpreter child: the model steps with attention on the Triton kernels."""
    from shoal.runtime.kernels import paged_attention as kernels

    assert kernels.INTERPRETED is (KERNEL_DEVICE == "cpu")
    calls = {"decode": 0, "mixed": 0}

    def triton_attention(query, k_cache, v_cache, meta, scale):
        # What the CUDA dispatch does: the decode kernel for decode-only steps (the same
        # launch paged_attention_triton makes for them), the mixed one otherwise.
        if meta.num_decodes == meta.num_seqs:
            calls["decode"] += 1
            return kernels.paged_decode_attention_triton(query, k_cache, v_cache, meta, scale)
        calls["mixed"] += 1
        return kernels.paged_attention_triton(query, k_cache, v_cache, meta, scale)

    logits, num_layers = _run_model_steps(model_dir, triton_attention, device=KERNEL_DEVICE)
    torch.save({"logits": logits, "calls": calls, "num_layers": num_layers}, out_path)


def _child(work: Path) -> None:
    """Run in the child: every saved case through its kernel, outputs saved beside it."""
    from shoal.runtime.kernels import paged_attention as kernels

    entries = {
        "decode": kernels.paged_decode_attention_triton,
        "mixed": kernels.paged_attention_triton,
    }
    for path in sorted(work.glob("*.in.pt")):
        saved = torch.load(path)
        x = _to({k: v for k, v in saved.items() if k != "query"}, KERNEL_DEVICE)
        # Rebuilt from the moved projection, so a strided query stays strided on the device.
        query = _query_of(x["qkv"], *saved["query"].shape[1:])
        meta = AttentionMetadata(**x["meta"])
        result: dict = {"interpreted": kernels.INTERPRETED}
        try:
            out = entries[x["entry"]](
                query, x["k_cache"], x["v_cache"], meta, x["scale"], x["num_splits"]
            )
            result["out"] = out.cpu()
        except ValueError as e:
            result["error"] = f"ValueError: {e}"
        torch.save(result, path.with_name(path.name.replace(".in.pt", ".out.pt")))


if __name__ == "__main__":
    if sys.argv[1] == "--compile-sm90":
        _compile_sm90(Path(sys.argv[2]))
    elif sys.argv[1] == "--model":
        _model_child(sys.argv[2], Path(sys.argv[3]))
    else:
        _child(Path(sys.argv[1]))
