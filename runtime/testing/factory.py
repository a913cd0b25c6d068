"""Deterministic random-weight checkpoints for every supported architecture.

``make_tiny_model("llama", dir)`` writes what a hub model directory holds: config.json,
generation_config.json, model.safetensors (via transformers' ``save_pretrained``) and a
tokenizer with a chat template. Same arguments, same bytes of weights: the seed fixes
the initialisation. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.runtime.testing import tokenizer as tok

log = logging.getLogger(__name__)

# Short name -> (transformers model_type, config settings that characterise it).
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),  # Llama 2 style: plain rope
    "llama3": (  # Llama 3.x style: llama3 rope scaling, large theta, tied embeddings
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # small, so the scaling changes frequencies a tiny head_dim actually has
                "original_max_position_embeddings": 256,
            },
            "tie_word_embeddings": True,
        },
    ),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],  # one dense layer, as real configs may have
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
    ),
}
# HF architecture names are accepted too.
ARCH_ALIASES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "max_position_embeddings": 2048,
        # Large enough that attention and MLP outputs matter next to the embedding, so
        # greedy decoding depends on context instead of cycling through a few tokens.
        "initializer_range": 0.2,
    },
    # The benchmark model of issue 2 (head_dim >= 32: vLLM's CPU attention rejects 16).
    "bench-llama": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 32000,  # the tokenizer is trained to 32000 tokens too
        "max_position_embeddings": 4096,
        "initializer_range": 0.05,
    },
}


def resolve_arch(arch: str) -> str:
    name = ARCH_ALIASES.get(arch, arch)
    if name not in ARCHS:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)} "
            f"(or {', '.join(ARCH_ALIASES)})"
        )
    return name


def tiny_config(arch: str, *, preset: str = "tiny", vocab_size: int, **overrides: Any):
    """The transformers config for ``arch`` at ``preset`` size (pure: no files)."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    model_type, arch_settings = ARCHS[resolve_arch(arch)]
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": tok.SPECIAL_TOKENS.index(tok.BOS),
        "eos_token_id": tok.SPECIAL_TOKENS.index(tok.EOS),
        "pad_token_id": tok.SPECIAL_TOKENS.index(tok.PAD),
        **PRESETS[preset],
        **arch_settings,
        **overrides,
    }
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # Experts narrower than the dense MLP (used by mlp_only_layers), at any preset size.
        settings.setdefault("moe_intermediate_size", settings["intermediate_size"] // 2)
    if model_type == "qwen2_moe":
        settings.setdefault("shared_expert_intermediate_size", settings["intermediate_size"])
    return AutoConfig.for_model(model_type, **settings)


def make_tiny_model(
    arch: str,
    path: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    preset: str = "tiny",
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint and tokenizer for ``arch`` into ``path``.

    ``overrides`` are transformers config keys (e.g. ``num_hidden_layers=3``,
    ``tie_word_embeddings=True``). ``max_shard_size`` (e.g. "200KB") writes a sharded
    checkpoint with an index, like large hub models.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; choose float32, bfloat16 or float16")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer is trained to the model's vocabulary size where the corpus allows, so
    # every id the model can sample decodes to text.
    vocab = int(overrides.pop("vocab_size", PRESETS.get(preset, {}).get("vocab_size", 512)))
    tokenizer_vocab = tok.save_tokenizer(out, vocab_size=vocab)
    config = tiny_config(arch, preset=preset, vocab_size=max(vocab, tokenizer_vocab), **overrides)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tok.SPECIAL_TOKENS.index(tok.EOS), tok.SPECIAL_TOKENS.index(tok.IM_END)],
        pad_token_id=config.pad_token_id,
    )
    save_kwargs: dict[str, Any] = {}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    with _quiet_progress_bars():
        model.save_pretrained(str(out), **save_kwargs)
    (out / "shoal-tiny.json").write_text(
        json.dumps({"arch": resolve_arch(arch), "preset": preset, "dtype": dtype, "seed": seed})
        + "\n"
    )
    log.info("wrote tiny %s (%s, %s, seed %d) to %s", arch, preset, dtype, seed, out)
    return out


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bars are noise in test and demo output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
