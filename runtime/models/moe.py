"""The sparse Mixture-of-Experts block (Mixtral, Qwen2-MoE, Qwen3-MoE).

Three parts with one job each, so expert placement can later change which experts a
rank holds without touching routing:

- ``TopKRouter``: hidden states -> each token's top-k expert ids and weights.
- ``Experts``: the routed experts' weights, stacked ([E, 2I, H] gate/up, [E, H, I] down),
  and the grouped computation: tokens are sorted by expert and each expert runs one
  matmul over all of its tokens (a loop over experts, never over tokens).
- ``SparseMoeBlock``: router + experts (+ Qwen2-MoE's sigmoid-gated shared expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.runtime.layers.activation import silu_and_mul
from shoal.runtime.layers.linear import Linear, empty_param, set_shards
from shoal.runtime.layers.mlp import GatedMLP
from shoal.runtime.models.config import MoeConfig


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.weight = empty_param(num_experts, hidden_size)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k] int64)."""
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


class Experts(nn.Module):
    """All routed experts of one layer. Expert e is ``w13[e]`` (gate rows then up rows)
    and ``w2[e]``, in the same layout transformers 5 keeps them fused."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = empty_param(num_experts, 2 * intermediate_size, hidden_size)
        self.w2 = empty_param(num_experts, hidden_size, intermediate_size)
        set_shards(self.w13, {"gate": intermediate_size, "up": intermediate_size})

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; topk_ids/topk_weights [T, k] -> sum_k weight * expert(x), [T, H]."""
        top_k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)  # (token, k) pairs grouped by expert
        token_of = order // top_k
        # One host sync per layer to learn the group sizes; the loop below is over experts.
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        grouped = x.index_select(0, token_of)
        out = torch.empty_like(grouped)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            h = silu_and_mul(F.linear(grouped[start:end], self.w13[expert]))
            out[start:end] = F.linear(h, self.w2[expert])
            start = end
        out.mul_(topk_weights.flatten().index_select(0, order).unsqueeze(1))
        return torch.zeros_like(x).index_add_(0, token_of, out)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, moe: MoeConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, moe.num_experts, moe.top_k, moe.norm_topk_prob)
        self.experts = Experts(moe.num_experts, hidden_size, moe.intermediate_size)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
