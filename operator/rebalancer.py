"""The rebalancer's decision, pure: which running requests to move from the most to the least
loaded worker of a pool (Llumnix's load balancing by migration).

Load is Llumnix's "freeness" turned around: the share of a worker's KV cache that its running
requests use plus what its queue will want (each waiting request counted as an average
running one). A pool is imbalanced when the most and least loaded workers differ by more than
`threshold`; once moving, it keeps moving until the gap falls below `threshold - hysteresis`.
After a pass that moved something, nothing moves for `cooldownSeconds` (the loads the workers
report must first show the moves). State lives in `status.migration`, not in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shoal.operator.drain import Load, seconds_between
from shoal.operator.migration_spec import RebalanceSpec


@dataclass(frozen=True)
class Move:
    source: str  # worker (pod) names
    target: str
    request_id: str
    blocks: float  # KV blocks it is expected to take along


@dataclass(frozen=True)
class Decision:
    moves: tuple[Move, ...]
    rebalancing: bool  # the hysteresis state to keep in status.migration
    reason: str  # for logs and tests: why these moves (or none)


def pressure(load: Load) -> float:
    """Share of the KV cache used now or wanted by the queue (0 = idle; above 1 = queueing)."""
    total = max(load.total_blocks, 1)
    used = max(total - load.free_blocks, 0) if load.total_blocks else load.kv_usage * total
    per_request = used / load.num_running if load.num_running else 1.0
    return (used + load.num_waiting * max(per_request, 1.0)) / total


def _request_blocks(load: Load) -> dict[str, float]:
    """Blocks each running request holds, shared out by its computed tokens."""
    used = max(load.total_blocks - load.free_blocks, 0)
    tokens = sum(r.num_computed_tokens for r in load.requests)
    if not tokens:
        return {r.request_id: 0.0 for r in load.requests}
    return {r.request_id: used * r.num_computed_tokens / tokens for r in load.requests}


def decide(
    loads: Mapping[str, Load],
    spec: RebalanceSpec,
    max_moves: int,
    rebalancing: bool,
    last_migration_at: str | None,
    now: str,
) -> Decision:
    """Moves for this pass. `loads`: the workers that may give or take (ready, not draining)."""
    if not spec.enabled:
        return Decision((), False, "disabled")
    usable = {n: ld for n, ld in loads.items() if not ld.draining and ld.total_blocks > 0}
    if len(usable) < 2:
        return Decision((), False, "fewer than two workers to balance")
    if last_migration_at and seconds_between(last_migration_at, now) < spec.cooldown_seconds:
        return Decision((), rebalancing, "cooldown")
    level = {n: pressure(ld) for n, ld in usable.items()}
    source = max(level, key=lambda n: (level[n], n))
    target = min(level, key=lambda n: (level[n], n))
    gap = level[source] - level[target]
    bar = spec.threshold - spec.hysteresis if rebalancing else spec.threshold
    if gap <= bar:
        return Decision((), False, f"balanced (gap {gap:.2f} <= {bar:.2f})")

    src, dst = usable[source], usable[target]
    blocks = _request_blocks(src)
    unfinished = [r for r in src.requests if r.max_tokens - r.num_output_tokens > 1]
    # Cheapest first: a short context moves with the least copying and the least downtime.
    candidates = sorted(unfinished, key=lambda r: (r.num_computed_tokens, r.request_id))
    moves: list[Move] = []
    free = float(dst.free_blocks)
    for r in candidates:
        if len(moves) >= max_moves:
            break
        b = blocks.get(r.request_id, 0.0)
        if b + 1 > free:  # the target must hold it (and one block to grow into)
            continue
        after = (level[source] - b / src.total_blocks) - (level[target] + b / dst.total_blocks)
        if abs(after) >= gap:  # it would overshoot: no better balanced than now
            continue
        moves.append(Move(source, target, r.request_id, b))
        free -= b
        level[source] -= b / src.total_blocks
        level[target] += b / dst.total_blocks
        gap = level[source] - level[target]
        if gap <= spec.threshold - spec.hysteresis:
            break
    if not moves:
        return Decision((), True, f"imbalanced (gap {gap:.2f}) but no request fits the target")
    return Decision(tuple(moves), True, f"moving {len(moves)} from {source} to {target}")
