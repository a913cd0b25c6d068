"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3, and their MoE versions.

These architectures differ only in switches read from the config (qkv bias, per-head
q/k RMSNorm, tied embeddings, rope scaling) and in the feed-forward block, which is the
dense gated MLP or the sparse MoE block of ``moe.py``. One class covers all of them.

The engine's calling convention: a step's T tokens are flattened across sequences, and
each layer reads/writes its paged KV cache through ``paged_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.runtime.layers.attention import AttentionMetadata, paged_attention
from shoal.runtime.layers.linear import Linear, empty_param
from shoal.runtime.layers.mlp import GatedMLP
from shoal.runtime.layers.norm import RMSNorm
from shoal.runtime.layers.rotary import RotaryEmbedding, apply_rotary
from shoal.runtime.models.config import ModelConfig
from shoal.runtime.models.moe import SparseMoeBlock

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        self.qkv_proj = Linear(cfg.hidden_size, sizes, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k sit side by side in qkv: rotate all their heads in one go.
            qk = qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim)
            q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        else:  # Qwen3: RMSNorm per head, before rope
            q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, -1, self.head_dim)
            q = apply_rotary(self.q_norm(q), *rope)
            k = apply_rotary(self.k_norm(k), *rope)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp: nn.Module
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, rope, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        # Same additions in the same order as transformers (no fused add+norm), so float32
        # results agree to the last bits.
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm: ``model.*`` in checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty_param(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """``model(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, hidden_size]``;
    ``compute_logits(hidden [N, hidden_size]) -> float32 logits [N, vocab_size]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope)
        if cfg.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens  # same Parameter: one tensor in memory
        else:
            self.lm_head = nn.Module()
            self.lm_head.weight = empty_param(cfg.vocab_size, cfg.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = F.embedding(input_ids, self.model.embed_tokens.weight)
        rope = self.rotary(positions, h.dtype)  # looked up once, shared by every layer
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(h, rope, kv_cache, meta)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight).float()
