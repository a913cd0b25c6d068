"""A model's shape and options, read from a Hugging Face ``config.json`` dict.

``parse_config`` is pure (a dict in, a ``ModelConfig`` out) so every rule here is tested
without files. It accepts both the transformers-5 form (``rope_parameters``) and the older
hub form (``rope_theta`` + ``rope_scaling``), and fills the defaults each transformers
config class would fill when a key is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.layers.rotary import SUPPORTED_ROPE_TYPES, RopeConfig


class ModelLoadError(ValueError):
    """A checkpoint Shoal cannot load; the message says what and why, for people."""


@dataclass(frozen=True)
class Family:
    """What differs between the supported architectures, besides the config's numbers."""

    qkv_bias: str | bool  # True/False, or the config key that decides it
    o_bias: str | bool
    mlp_bias: str | bool
    qk_norm: bool
    moe: str | None  # None (dense), "mixtral" or "qwen"
    rms_norm_eps: float  # default when the config omits it
    # hub checkpoint names for the per-expert weights: (module, gate, up, down)
    expert_names: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")
    shared_expert: bool = False  # a sigmoid-gated dense expert beside the routed ones


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("attention_bias", "attention_bias", "mlp_bias", False, None, 1e-6),
    "MistralForCausalLM": Family(False, False, False, False, None, 1e-6),
    "Qwen2ForCausalLM": Family(True, False, False, False, None, 1e-6),
    "Qwen3ForCausalLM": Family("attention_bias", "attention_bias", False, True, None, 1e-6),
    "MixtralForCausalLM": Family(
        False, False, False, False, "mixtral", 1e-5, ("block_sparse_moe", "w1", "w3", "w2")
    ),
    "Qwen2MoeForCausalLM": Family(
        "qkv_bias", False, False, False, "qwen", 1e-6, shared_expert=True
    ),
    "Qwen3MoeForCausalLM": Family("attention_bias", "attention_bias", False, True, "qwen", 1e-6),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# Defaults of the config classes for keys a hub config may omit.
_DEFAULT_BOOL = {"attention_bias": False, "mlp_bias": False, "qkv_bias": True}


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None = None
    moe: MoeConfig | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype name, for dtype="auto"
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def max_model_len(self) -> int:
        # Sliding-window attention is not implemented; up to the window it is identical
        # to full causal attention, so the context is capped there instead.
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        """Which decoder layers use the sparse MoE block (the rule of transformers' Qwen-MoE)."""
        if self.moe is None:
            return False
        return (
            layer not in self.moe.mlp_only_layers
            and self.moe.num_experts > 0
            and (layer + 1) % self.moe.decoder_sparse_step == 0
        )


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    """Turn a config.json dict into a ModelConfig, or raise ModelLoadError saying why not."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in FAMILIES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} (config.json 'architectures'); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    fam = FAMILIES[arch]

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"unsupported hidden_act {act!r} for {arch}; supported: silu")

    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        intermediate = int(cfg.get("intermediate_size") or 0)
    except KeyError as e:
        raise ModelLoadError(f"config.json for {arch} lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json for {arch} has a malformed size: {e}") from None
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )

    def flag(spec: str | bool) -> bool:
        return spec if isinstance(spec, bool) else bool(cfg.get(spec, _DEFAULT_BOOL[spec]))

    sliding = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        sliding = None

    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or fam.rms_norm_eps),
        rope=parse_rope(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=flag(fam.qkv_bias),
        o_bias=flag(fam.o_bias),
        mlp_bias=flag(fam.mlp_bias),
        qk_norm=fam.qk_norm,
        sliding_window=int(sliding) if sliding else None,
        moe=_parse_moe(cfg, fam, intermediate),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        eos_token_ids=_as_ids(cfg.get("eos_token_id")),
    )


def parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    """Rope settings from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        params = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            params.setdefault("rope_theta", cfg["rope_theta"])
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    try:
        factor = float(params["factor"])
        if rope_type == "linear":
            return RopeConfig(theta=theta, rope_type="linear", factor=factor)
        return RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
            ),
        )
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"rope type {rope_type!r} needs the parameter {e}") from None


def _parse_moe(cfg: dict[str, Any], fam: Family, intermediate: int) -> MoeConfig | None:
    if fam.moe is None:
        return None
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not num_experts or not top_k:
        raise ModelLoadError(
            "MoE config needs num_experts (or num_local_experts) and num_experts_per_tok"
        )
    if fam.moe == "mixtral":
        # Mixtral always renormalises the top-k weights; experts use intermediate_size.
        return MoeConfig(int(num_experts), int(top_k), intermediate, norm_topk_prob=True)
    return MoeConfig(
        num_experts=int(num_experts),
        top_k=int(top_k),
        intermediate_size=int(cfg.get("moe_intermediate_size") or intermediate),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        # transformers' Qwen2-MoE always builds the shared expert (default size 5632).
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 5632))
        if fam.shared_expert
        else 0,
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
