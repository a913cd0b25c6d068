"""Tiny random PEFT LoRA adapters over a tiny model, for tests, the demo and the bench.

PEFT's default initialisation makes B zero, so a fresh adapter changes nothing; these
are made with ``init_lora_weights=False`` (A and B both random), so every adapter really
moves the output and a wrong slot or a lost module shows up as different tokens.
Same arguments, same bytes: ``seed`` fixes the weights. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES


def make_tiny_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    layers: Sequence[int] | None = None,
    weight_scale: float = 1.0,
) -> Path:
    """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) for the
    model at ``base_dir`` into ``out_dir``; returns ``out_dir``.

    ``target_modules`` are PEFT's names among q/k/v/o/gate/up/down_proj. ``layers``
    restricts the adapter to those decoder layers (PEFT's ``layers_to_transform``), e.g.
    the dense MLP layers of a MoE model. ``weight_scale`` multiplies the random A and B
    (1.0: nn.Linear's default initialisation, which changes greedy tokens visibly).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bad = [m for m in target_modules if m not in ALL_MODULES]
    if bad:
        raise ValueError(f"unknown target modules {bad}; choose among {', '.join(ALL_MODULES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(weight_scale)
    model.save_pretrained(str(out))
    log.info(
        "wrote tiny adapter (rank %d, alpha %s, %s, seed %d) to %s",
        rank,
        alpha,
        ",".join(target_modules),
        seed,
        out,
    )
    return out
