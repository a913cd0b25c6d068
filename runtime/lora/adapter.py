"""Reading and checking one PEFT LoRA adapter directory against the served base model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(what ``peft``'s ``save_pretrained`` writes). Every way it can be unusable is a
``LoRALoadError`` with a code the admin API answers with and one line naming the
problem, so the client (and the operator's status) learns why without a traceback.

The checks that decide are pure functions of the parsed config and tensor shapes
(``module_key``, ``check_config``, ``build_adapter``); ``read_adapter`` is the I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Codes of the admin API's 400/404 answers (the LoRA contract).
RANK_TOO_LARGE = "lora_rank_too_large"
BASE_MISMATCH = "lora_base_mismatch"
INVALID = "lora_invalid"
NOT_FOUND = "lora_not_found"

# The projections Shoal can put LoRA on (PEFT's module names).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class LoRALoadError(ValueError):
    """An adapter that cannot be served; ``code`` is one of the constants above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TargetShape:
    """A base-model projection an adapter may target: its input and output widths."""

    in_features: int
    out_features: int


@dataclass
class LoRAWeights:
    """One module's low-rank update: ``y += (x @ a.T) @ b.T * scale``."""

    a: torch.Tensor  # [rank, in] (PEFT's lora_A.weight)
    b: torch.Tensor  # [out, rank] (PEFT's lora_B.weight)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoRAAdapter:
    """A checked adapter in host memory. ``modules`` keys are the base model's module
    paths, e.g. ``model.layers.0.self_attn.q_proj``."""

    name: str
    path: str
    rank: int
    modules: dict[str, LoRAWeights] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.modules.values())


def module_key(tensor_name: str) -> tuple[str, str] | None:
    """PEFT tensor name -> (base module path, "A" or "B"), or None if not a LoRA weight.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    (``model.layers.0.self_attn.q_proj``, "A"); an adapter-name segment
    (``lora_A.default.weight``) is accepted too."""
    match = _KEY.match(tensor_name)
    if match is None:
        return None
    module = match["module"].removeprefix(_PEFT_PREFIX)
    return module, match["which"]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path's suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def check_config(raw: Any, max_rank: int) -> dict[str, Any]:
    """Validate adapter_config.json's content; returns it. Pure."""
    if not isinstance(raw, dict):
        raise LoRALoadError(INVALID, "adapter_config.json is not a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRALoadError(INVALID, f"adapter type {peft_type} is not LoRA")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layouts")):
        if raw.get(flag):
            raise LoRALoadError(INVALID, f"{what} adapters are not supported")
    if raw.get("modules_to_save"):
        raise LoRALoadError(
            INVALID, f"modules_to_save ({raw['modules_to_save']}) is not supported: "
            "only LoRA matrices on the projections can be served"
        )  # fmt: skip
    if raw.get("bias", "none") != "none":
        raise LoRALoadError(INVALID, f"bias={raw['bias']!r} adapters are not supported")
    try:
        rank = int(raw.get("r", 8))
        ranks = [rank, *(int(v) for v in (raw.get("rank_pattern") or {}).values())]
        float(raw.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise LoRALoadError(
            INVALID, "adapter_config.json: r and lora_alpha must be numbers"
        ) from None
    if max(ranks) > max_rank:
        raise LoRALoadError(
            RANK_TOO_LARGE,
            f"adapter rank {max(ranks)} is larger than this worker's --max-lora-rank {max_rank}",
        )
    if min(ranks) < 1:
        raise LoRALoadError(INVALID, f"adapter rank must be at least 1, got {min(ranks)}")
    return raw


def build_adapter(
    name: str,
    path: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    targets: dict[str, TargetShape],
    max_rank: int,
) -> LoRAAdapter:
    """Pair up A/B tensors, check them against the base model's projections, compute each
    module's scale (alpha / r, or alpha / sqrt(r) for rsLoRA). Pure."""
    base_hint = config.get("base_model_name_or_path")
    hint = f" (the adapter was trained on {base_hint!r})" if base_hint else ""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        key = module_key(tensor_name)
        if key is None:
            raise LoRALoadError(
                INVALID, f"unsupported tensor {tensor_name!r} in adapter_model.safetensors"
            )
        module, which = key
        pairs.setdefault(module, {})[which] = tensor
    if not pairs:
        raise LoRALoadError(INVALID, "adapter_model.safetensors holds no LoRA weights")
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoRAWeights] = {}
    for module, ab in sorted(pairs.items()):
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in SUPPORTED_MODULES:
            raise LoRALoadError(
                INVALID,
                f"the adapter targets {module!r}; Shoal serves LoRA on "
                f"{', '.join(SUPPORTED_MODULES)} only",
            )
        if set(ab) != {"A", "B"}:
            raise LoRALoadError(INVALID, f"{module}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRALoadError(
                INVALID,
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair up",
            )
        target = targets.get(module)
        if target is None:
            raise LoRALoadError(BASE_MISMATCH, f"the base model has no module {module!r}{hint}")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise LoRALoadError(
                BASE_MISMATCH,
                f"{module}: the adapter maps {a.shape[1]} -> {b.shape[0]} features, the base "
                f"model's projection {target.in_features} -> {target.out_features}{hint}",
            )
        r = int(a.shape[0])
        if r > max_rank:
            raise LoRALoadError(
                RANK_TOO_LARGE,
                f"{module}: rank {r} is larger than this worker's --max-lora-rank {max_rank}",
            )
        module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        scale = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        modules[module] = LoRAWeights(a=a.contiguous(), b=b.contiguous(), scale=scale)
    rank = max(w.rank for w in modules.values())
    return LoRAAdapter(name=name, path=path, rank=rank, modules=modules)


def read_adapter(
    name: str, path: str, targets: dict[str, TargetShape], max_rank: int
) -> LoRAAdapter:
    """Read and check the adapter at ``path`` (tensors stay on the host, as stored)."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise LoRALoadError(NOT_FOUND, f"adapter directory {path!r} does not exist")
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise LoRALoadError(INVALID, f"{path} has no adapter_config.json")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoRALoadError(INVALID, f"adapter_config.json is not valid JSON: {exc}") from None
    config = check_config(raw, max_rank)
    weights_path = root / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise LoRALoadError(
            INVALID, f"{path} has no adapter_model.safetensors (.bin adapters are not supported)"
        )
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for tensor_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[tensor_name] = f.get_tensor(tensor_name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoRALoadError(INVALID, f"adapter_model.safetensors cannot be read: {first}") from None
    return build_adapter(name, str(path), config, tensors, targets, max_rank)
