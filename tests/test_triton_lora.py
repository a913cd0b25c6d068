"""BGMV (gathered multi-LoRA matmul): the torch path against its definition, and the Triton
kernels against the torch path under TRITON_INTERPRET=1.

Why a child process for Triton: ``triton.jit`` decides between interpreter and compiler
when a kernel module is imported, from ``TRITON_INTERPRET`` at that moment; setting it in
this pytest process would come too late if the module was already imported, and would
leak into later tests. This process builds inputs and references and never imports
``shoal.runtime.kernels.lora_triton``; one child with ``TRITON_INTERPRET=1`` in its own
environment runs the kernels on saved inputs (this file is its script, see ``__main__``).

Tolerances, against ``bgmv_torch`` on the same inputs upcast to fp32:
- fp32 tensors: atol 1e-5, rtol 1e-5 (summation order only; observed about 1e-6 relative).
- bf16 tensors: atol 1e-3, rtol 2**-7. The kernel computes in fp32 and rounds the sum
  into bf16 once (up to 2**-8 relative); a wrong slot or a lost column is O(1) off.
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

from shoal.runtime.kernels.lora import bgmv, bgmv_torch, check_bgmv_inputs

# Where the kernel child runs: "cpu" (Triton's interpreter, the default) or, on a machine
# with a GPU, SHOAL_TRITON_DEVICE=cuda for the same comparisons compiled on CUDA tensors.
KERNEL_DEVICE = os.environ.get("SHOAL_TRITON_DEVICE", "cpu")


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    in_dim: int
    rank: int
    out_dim: int
    num_slots: int = 4
    dtype: torch.dtype = torch.float32
    indices: str = "mixed"  # "mixed": slots and -1; "none": all -1; "one": all slot 1
    pool_layout: bool = False  # B stored [slots, out, R] as the adapter pool keeps it


CASES = [
    Case("fp32-small", 7, 64, 8, 64),
    Case("fp32-ragged", 9, 96, 12, 80),  # rank and dims not powers of two / block multiples
    # rank 64: blocks of 128, so 3 input blocks accumulate and 2 output blocks are written
    Case("fp32-rank64-wide", 5, 384, 64, 256, num_slots=3),
    Case("fp32-no-adapter", 6, 64, 8, 64, indices="none"),
    Case("fp32-one-adapter", 6, 64, 16, 48, indices="one"),
    Case("bf16-small", 7, 64, 8, 64, dtype=torch.bfloat16),
    Case("bf16-ragged", 9, 96, 12, 80, dtype=torch.bfloat16),
    Case("fp32-empty-batch", 0, 64, 8, 64),
    # the adapter pool's layouts (runtime/lora/layers.py): B [slots, out, R], passed to
    # bgmv as a transposed view, like A
    Case("fp32-pool-layout", 9, 96, 16, 80, pool_layout=True),
    Case("bf16-pool-layout", 7, 64, 16, 48, dtype=torch.bfloat16, pool_layout=True),
]


def _build_stored(case: Case, seed: int) -> dict:
    """Random tensors at LoRA-like scale, as the LoRA layer will hold them: A as
    [slots, rank, in] (PEFT's layout), y inside a wider fused output. ``_args`` makes the
    views bgmv takes."""
    g = torch.Generator().manual_seed(seed)
    t, i, r, o, s = case.num_tokens, case.in_dim, case.rank, case.out_dim, case.num_slots
    x = torch.randn(t, i, generator=g).to(case.dtype)
    a_stored = (torch.randn(s, r, i, generator=g) / i**0.5).to(case.dtype)
    lora_b = (torch.randn(s, r, o, generator=g) / r**0.5).to(case.dtype)
    if case.indices == "none":
        indices = torch.full((t,), -1, dtype=torch.int32)
    elif case.indices == "one":
        indices = torch.ones(t, dtype=torch.int64)  # int64 indices work too
    else:  # every slot 0..s-2 and -1 appear; the last slot is resident but unused
        indices = torch.tensor([(k % s) - 1 for k in range(t)], dtype=torch.int32)
        indices = indices[torch.randperm(t, generator=g)]
    fused = torch.randn(t, o + 32, generator=g).to(case.dtype)
    b_key, b_value = "lora_b", lora_b
    if case.pool_layout:
        b_key, b_value = "b_out_rank", lora_b.transpose(1, 2).contiguous()
    return {
        "fused": fused,
        "a_stored": a_stored,
        "x": x,
        b_key: b_value,
        "indices": indices,
        "scales": torch.rand(s, generator=g) + 0.5,
    }


def _args(stored: dict) -> dict:
    """bgmv's arguments: y a column slice of the fused output, A a transposed view (and B
    too in the pool's layout)."""
    out_dim = stored["fused"].shape[1] - 32
    lora_b = stored["lora_b"] if "lora_b" in stored else stored["b_out_rank"].transpose(1, 2)
    return {
        "y": stored["fused"][:, 16 : 16 + out_dim],
        "x": stored["x"],
        "lora_a": stored["a_stored"].transpose(1, 2),
        "lora_b": lora_b,
        "indices": stored["indices"],
        "scales": stored["scales"],
    }


def _build_inputs(case: Case, seed: int) -> dict:
    return _args(_build_stored(case, seed))


def _definition(y, x, lora_a, lora_b, indices, scales) -> torch.Tensor:
    """The formula, token by token, in fp64: the oracle for the torch path."""
    out = y.double().clone()
    for t, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[t] += (
                (x[t].double() @ lora_a[slot].double())
                @ lora_b[slot].double()
                * float(scales[slot])
            )
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_torch_path_matches_definition(case: Case) -> None:
    x = _build_inputs(case, seed=1)
    expected = _definition(**x)
    y = x["y"]
    before = x["y"].clone()
    out = bgmv(**x)  # on CPU: the torch path
    assert out is y  # in place, into the fused output's slice
    tol = (
        {"atol": 1e-5, "rtol": 1e-5}
        if case.dtype == torch.float32
        else {"atol": 1e-2, "rtol": 2**-6}
    )
    torch.testing.assert_close(out.double(), expected, **tol)
    base_rows = x["indices"] < 0
    assert torch.equal(out[base_rows], before[base_rows])  # base-only tokens untouched


def test_torch_path_leaves_the_rest_of_the_fused_output_alone() -> None:
    case = CASES[0]
    stored = _build_stored(case, seed=2)
    fused = stored["fused"]
    left, right = fused[:, :16].clone(), fused[:, 16 + case.out_dim :].clone()
    bgmv_torch(**_args(stored))
    assert torch.equal(fused[:, :16], left) and torch.equal(fused[:, 16 + case.out_dim :], right)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(7, 63)}, "shapes disagree"),
        ({"indices": torch.zeros(6, dtype=torch.int32)}, "indices must be"),
        ({"indices": torch.zeros(7)}, "indices must be"),
        ({"scales": torch.ones(3)}, "scales must be"),
        ({"lora_b": torch.zeros(4, 8, 64, dtype=torch.bfloat16)}, "dtypes differ"),
        ({"x": torch.zeros(7, 64, 1)}, "expected x"),
    ],
)
def test_bad_inputs_are_named(change: dict, message: str) -> None:
    x = {**_build_inputs(CASES[0], seed=3), **change}
    with pytest.raises(ValueError, match=message):
        check_bgmv_inputs(**x)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict[str, dict], dict[str, dict]]:
    work = tmp_path_factory.mktemp("triton_lora")
    inputs = {}
    for seed, case in enumerate(CASES):
        stored = _build_stored(case, seed)
        torch.save(stored, work / f"{case.name}.in.pt")
        inputs[case.name] = _args(stored)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if KERNEL_DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, str(work)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return inputs, {c.name: torch.load(work / f"{c.name}.out.pt") for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_matches_torch(case: Case, interpreted) -> None:
    inputs, results = interpreted
    result = results[case.name]
    assert result["interpreted"] is (KERNEL_DEVICE == "cpu"), "interpreter on CPU, else not"
    assert "error" not in result, result.get("error")
    x = inputs[case.name]
    expected = bgmv_torch(
        x["y"].float().clone(),
        x["x"].float(),
        x["lora_a"].float(),
        x["lora_b"].float(),
        x["indices"],
        x["scales"],
    )
    out = result["y"]
    assert out.dtype == case.dtype
    if case.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out.float(), expected, atol=1e-3, rtol=2**-7)
    # The columns around the slice belong to other projections: untouched.
    assert torch.equal(result["fused"][:, :16], result["fused_before"][:, :16])
    assert torch.equal(
        result["fused"][:, 16 + case.out_dim :], result["fused_before"][:, 16 + case.out_dim :]
    )


def test_kernels_compile_for_sm90(tmp_path) -> None:
    """Compiled (not interpreted) for sm_90 by Triton's NVIDIA backend; no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "builds.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--compile-sm90", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"compile child failed:\n{proc.stdout}\n{proc.stderr}"
    builds = json.loads(out.read_text())
    assert set(builds) == {f"{k}-{d}" for k in ("shrink", "expand") for d in ("bf16", "fp32")}
    for key, build in builds.items():
        assert build["cubin_bytes"] > 0, key
        assert build["spill_store_bytes"] == 0, (key, build["ptxas"])


def _child(work: Path) -> None:
    """Run in the kernel child: each saved case through bgmv_triton."""
    from shoal.runtime.kernels import lora_triton

    for path in sorted(work.glob("*.in.pt")):
        stored = {k: v.to(KERNEL_DEVICE) for k, v in torch.load(path).items()}
        args = _args(stored)  # views made on the device, so strides are as the layer's
        result: dict = {
            "interpreted": lora_triton.INTERPRETED,
            "fused_before": stored["fused"].cpu().clone(),
        }
        try:
            result["y"] = lora_triton.bgmv_triton(**args).cpu()
            result["fused"] = stored["fused"].cpu()
        except ValueError as e:
            result["error"] = f"ValueError: {e}"
        torch.save(result, path.with_name(path.name.replace(".in.pt", ".out.pt")))


def _compile_sm90(out_path: Path) -> None:
    """Run in the compile child: both kernels for sm_90 at a served shape, ptxas's report."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from shoal.runtime.kernels import lora_triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    block_k, block_r, block_n = lora_triton.lora_blocks(in_dim=4096, rank=64, out_dim=4096)
    kernels = {
        "shrink": (lora_triton._lora_shrink_kernel, {"BLOCK_K": block_k, "BLOCK_R": block_r}),
        "expand": (lora_triton._lora_expand_kernel, {"BLOCK_R": block_r, "BLOCK_N": block_n}),
    }
    weights = ("x_ptr", "a_ptr", "b_ptr", "y_ptr")
    builds = {}
    for name, (kernel, constexprs) in kernels.items():
        for dtype in ("bf16", "fp32"):
            signature = {}
            for arg in kernel.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg in weights:
                    signature[arg] = f"*{dtype}"
                elif arg == "indices_ptr":
                    signature[arg] = "*i32"
                elif arg.endswith("_ptr"):
                    signature[arg] = "*fp32"  # h and scales
                else:
                    signature[arg] = "i32"
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 4},
            )
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(compiled.asm["ptx"])
            report = subprocess.run(
                [str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                capture_output=True,
                text=True,
            ).stderr
            os.unlink(f.name)
            spills = re.search(r"(\d+) bytes spill stores", report)
            builds[f"{name}-{dtype}"] = {
                "cubin_bytes": len(compiled.asm["cubin"]),
                "spill_store_bytes": int(spills.group(1)) if spills else -1,
                "ptxas": report,
            }
    out_path.write_text(json.dumps(builds, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--compile-sm90":
        _compile_sm90(Path(sys.argv[2]))
    else:
        _child(Path(sys.argv[1]))
