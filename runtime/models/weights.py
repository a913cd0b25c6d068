"""Checkpoint tensor names -> Shoal parameters.

``map_name`` is pure: it says which parameter a checkpoint tensor fills and which part
of it (a shard of a fused projection, an expert of a stacked expert tensor). It accepts
the classic hub layouts (``experts.{i}.w1/w2/w3``, ``experts.{i}.gate_proj/...``, Mixtral's
``block_sparse_moe``) and transformers 5's fused expert tensors (``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I]).

``WeightFiller`` copies tensors into a model's parameters and remembers which parts were
filled, so that a missing or unexpected tensor is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from shoal.runtime.models.config import Family, ModelConfig, ModelLoadError


@dataclass(frozen=True)
class Target:
    param: str  # name in the Shoal model's named_parameters()
    shard: str | None = None  # rows of a fused parameter ("q", "k", "v", "gate", "up")
    expert: int | None = None  # index along a stacked expert parameter's first dim


IGNORED = Target("")  # tensors some checkpoints carry that Shoal derives itself

_L = r"^model\.layers\.(\d+)\."
_MOE = r"(?:mlp|block_sparse_moe)"
_RULES: list[tuple[re.Pattern[str], object]] = [
    (re.compile(_L + r"self_attn\.rotary_emb\.inv_freq$"), None),
    (
        re.compile(_L + r"self_attn\.([qkv])_proj\.(weight|bias)$"),
        lambda m: Target(f"model.layers.{m[1]}.self_attn.qkv_proj.{m[3]}", m[2]),
    ),
    (
        re.compile(_L + r"(mlp|mlp\.shared_expert)\.(gate|up)_proj\.(weight|bias)$"),
        lambda m: Target(f"model.layers.{m[1]}.{m[2]}.gate_up_proj.{m[4]}", m[3]),
    ),
    (
        re.compile(_L + _MOE + r"\.experts\.(\d+)\.(w1|w3|gate_proj|up_proj)\.weight$"),
        lambda m: Target(
            f"model.layers.{m[1]}.mlp.experts.w13",
            "gate" if m[3] in ("w1", "gate_proj") else "up",
            int(m[2]),
        ),
    ),
    (
        re.compile(_L + _MOE + r"\.experts\.(\d+)\.(?:w2|down_proj)\.weight$"),
        lambda m: Target(f"model.layers.{m[1]}.mlp.experts.w2", None, int(m[2])),
    ),
    (
        re.compile(_L + _MOE + r"\.experts\.gate_up_proj$"),
        lambda m: Target(f"model.layers.{m[1]}.mlp.experts.w13"),
    ),
    (
        re.compile(_L + _MOE + r"\.experts\.down_proj$"),
        lambda m: Target(f"model.layers.{m[1]}.mlp.experts.w2"),
    ),
    (
        re.compile(_L + _MOE + r"\.gate\.weight$"),
        lambda m: Target(f"model.layers.{m[1]}.mlp.gate.weight"),
    ),
]


def map_name(name: str) -> Target:
    """Where checkpoint tensor ``name`` goes. Names not fused or renamed map to themselves
    (the filler rejects those the model has no parameter for)."""
    for pattern, make in _RULES:
        m = pattern.match(name)
        if m:
            return IGNORED if make is None else make(m)  # type: ignore[operator]
    return Target(name)


def checkpoint_name(target: Target, family: Family) -> str:
    """The hub name of the tensor that fills ``target`` (for 'missing tensor' errors)."""
    prefix, _, leaf = target.param.rpartition(".")
    if leaf in ("w13", "w2") and target.expert is not None:
        module, gate, up, down = family.expert_names
        layer_prefix = prefix.removesuffix(".mlp.experts")
        proj = {"gate": gate, "up": up, None: down}[target.shard]
        return f"{layer_prefix}.{module}.experts.{target.expert}.{proj}.weight"
    if leaf in ("w13", "w2"):
        return f"{prefix}.{'gate_up_proj' if leaf == 'w13' else 'down_proj'}"
    if target.shard is not None:
        module = prefix.rpartition(".")[0]
        return f"{module}.{target.shard}_proj.{leaf}"
    return target.param


def required_parts(param: nn.Parameter) -> set[tuple[str | None, int | None]]:
    """Every (shard, expert) part that must be filled for ``param`` to be complete."""
    shards = list(getattr(param, "shards", None) or [None])
    experts = list(range(param.shape[0])) if _is_stacked(param) else [None]
    return {(s, e) for s in shards for e in experts}


def _is_stacked(param: nn.Parameter) -> bool:
    return param.dim() == 3  # only stacked expert weights are 3-D here


class WeightFiller:
    """Fills a model's parameters from (name, tensor) pairs; ``finish`` checks completeness."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        self.params = dict(model.named_parameters())
        self.architecture = cfg.architecture
        self.family = cfg.family
        self.tied = cfg.tie_word_embeddings
        self.filled: dict[str, set[tuple[str | None, int | None]]] = {}
        self.unexpected: list[str] = []

    def fill(self, name: str, tensor: torch.Tensor) -> None:
        target = map_name(name)
        if target is IGNORED or (self.tied and target.param == "lm_head.weight"):
            return  # tied: the output projection is the embedding itself
        param = self.params.get(target.param)
        shards = getattr(param, "shards", None) or {}
        if (
            param is None
            or (target.shard is not None and target.shard not in shards)
            or (
                target.expert is not None
                and not (_is_stacked(param) and target.expert < len(param))
            )
        ):
            self.unexpected.append(name)
            return
        dest = param.data
        if target.expert is not None:
            dest = dest[target.expert]
        if target.shard is not None:
            dest = dest[shards[target.shard]]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"tensor {name} has shape {list(tensor.shape)}, expected {list(dest.shape)} "
                f"(for {target.param})"
            )
        dest.copy_(tensor)
        # A tensor without a shard (expert) fills every shard (expert) of its parameter.
        filled_shards = [target.shard] if target.shard is not None else list(shards) or [None]
        if target.expert is not None:
            filled_experts: list[int | None] = [target.expert]
        else:
            filled_experts = list(range(len(param))) if _is_stacked(param) else [None]
        self.filled.setdefault(target.param, set()).update(
            (s, e) for s in filled_shards for e in filled_experts
        )

    def fill_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self.fill(name, tensor)

    def finish(self) -> None:
        """Raise ModelLoadError naming unexpected and missing tensors, if any."""
        missing = []
        for pname, param in self.params.items():
            for shard, expert in sorted(
                required_parts(param) - self.filled.get(pname, set()),
                key=lambda p: (str(p[0]), -1 if p[1] is None else p[1]),
            ):
                missing.append(checkpoint_name(Target(pname, shard, expert), self.family))
        problems = []
        if missing:
            problems.append(f"missing tensor(s): {_short_list(missing)}")
        if self.unexpected:
            problems.append(f"unexpected tensor(s): {_short_list(self.unexpected)}")
        if problems:
            raise ModelLoadError(
                f"checkpoint does not match {self.architecture}: " + "; ".join(problems)
            )


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
