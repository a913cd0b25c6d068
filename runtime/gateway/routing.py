"""Which worker gets a request. Pure: the caller passes in everything it knows."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from shoal.runtime.gateway.pools import Worker


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker's own /metrics said at the last scrape."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1


def load_score(inflight: int, load: WorkerLoad | None) -> float:
    """Lower is better.

    Requests in flight through this gateway count one each; the worker's own queue counts
    one per waiting request (it also holds requests from other gateway replicas). KV cache
    usage in [0, 1] breaks ties between equally busy workers toward the one with more
    room, i.e. less risk of preemption.
    """
    if load is None:
        return float(inflight)
    return inflight + load.waiting + load.kv_cache_usage


def pick_worker(
    workers: Sequence[Worker],
    inflight: Mapping[str, int],
    loads: Mapping[str, WorkerLoad],
    *,
    exclude: Collection[str] = (),
    penalized: Collection[str] = (),
    rotation: int = 0,
) -> Worker | None:
    """The least-loaded worker, or None when none is left to try.

    ``inflight`` and ``loads`` are keyed by endpoint. ``exclude`` holds endpoints already
    tried for this request. ``penalized`` holds endpoints that failed recently: they are
    used only when nothing else is left. Ties go round-robin, starting at ``rotation``,
    so equal workers share the traffic instead of the first one taking it all.
    """
    candidates = [w for w in workers if w.endpoint not in exclude]
    if not candidates:
        return None
    healthy = [w for w in candidates if w.endpoint not in penalized]
    pool = healthy or candidates
    n = len(pool)
    order = {w.endpoint: (i - rotation) % n for i, w in enumerate(pool)}
    return min(
        pool,
        key=lambda w: (
            load_score(inflight.get(w.endpoint, 0), loads.get(w.endpoint)),
            order[w.endpoint],
        ),
    )
