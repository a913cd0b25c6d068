"""Load a Hugging Face checkpoint directory into a Shoal model.

I/O lives here (config.json, generation_config.json, *.safetensors, sharded or not); the
decisions are in ``config.parse_config`` and ``weights.map_name``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shoal.runtime.models.config import ModelConfig, ModelLoadError, parse_config
from shoal.runtime.models.llama import CausalLM
from shoal.runtime.models.weights import WeightFiller

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class ModelInfo:
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    dtype: torch.dtype


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> tuple[CausalLM, ModelInfo]:
    """Build the model for the checkpoint at ``path`` and fill it with its weights.

    Raises ModelLoadError (a ValueError) with a message for people when the directory,
    its config or its tensors do not fit a supported architecture.
    """
    start = time.monotonic()
    root = Path(path)
    cfg = read_config(root)
    torch_dtype = resolve_dtype(dtype, cfg.torch_dtype)
    files = safetensors_files(root)
    device = torch.device(device)

    with torch.device(device), _default_dtype(torch_dtype):
        model = CausalLM(cfg)
    filler = WeightFiller(model, cfg)
    filler.fill_all(_read_tensors(files))
    filler.finish()
    model.eval()

    info = ModelInfo(
        architecture=cfg.architecture,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        max_model_len=cfg.max_model_len,
        eos_token_ids=list(dict.fromkeys([*cfg.eos_token_ids, *_generation_eos(root)])),
        dtype=torch_dtype,
    )
    if cfg.max_model_len < cfg.max_position_embeddings:
        log.info(
            "%s uses sliding-window attention (window %d), which Shoal does not implement: "
            "the context is capped at %d tokens, where the two are identical",
            cfg.architecture,
            cfg.sliding_window,
            cfg.max_model_len,
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s from %s: %.1fM parameters, %s on %s, in %.1f s",
        cfg.architecture,
        root,
        n_params / 1e6,
        str(torch_dtype).removeprefix("torch."),
        device,
        time.monotonic() - start,
    )
    return model, info


def read_config(root: Path) -> ModelConfig:
    if not root.is_dir():
        raise ModelLoadError(f"model directory {str(root)!r} does not exist")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{root} has no config.json; is it a Hugging Face model directory?")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    return parse_config(raw)


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None) -> torch.dtype:
    """``auto`` means the checkpoint's dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(
                f"unsupported dtype {dtype}; supported: float32, bfloat16, float16"
            )
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        name = (checkpoint_dtype or "float32").lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ModelLoadError(
            f"unsupported dtype {dtype!r}; supported: auto, float32, bfloat16, float16"
        )
    return DTYPES[name]


def safetensors_files(root: Path) -> list[Path]:
    """The checkpoint's weight files: those of the sharded index if there is one."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index: {e!r}") from None
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index.name} lists shard(s) that are missing: {absent}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {root} (PyTorch .bin checkpoints are not supported)"
        )
    return files


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad files
            raise ModelLoadError(f"cannot read {file}: {e}") from None
        with f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def _generation_eos(root: Path) -> list[int]:
    path = root / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        log.warning("ignoring unreadable %s", path)
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
