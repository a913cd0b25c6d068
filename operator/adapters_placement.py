"""Which worker holds which adapter: pure, from what the workers report and what is declared.

Level-triggered like the rest of the operator: each pass starts from what every worker really
holds (its `GET /v1/lora_adapters`), keeps what may stay, and plans one set of loads and
unloads toward the declared replication. Rules, in order:

- stable: an adapter a worker already holds stays there while it is still wanted;
- replication: each adapter gets `wanted(n_workers)` holders ("all": every worker); new
  holders are the workers with the fewest adapters, then the least load;
- share: when one worker holds two or more placed adapters than another (a worker just
  joined), idle adapters move to the emptier one until counts are within one;
- make before break: a declared adapter is unloaded from a worker only once enough other
  workers really hold it, and never while it has running requests there;
- anything no longer declared is unloaded once idle; a declared adapter's unwanted copy
  only after UNLOAD_GRACE_S of being unwanted and idle (`defer_unloads`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from shoal.operator.adapters_spec import AdapterSpec

# Moves per pass when sharing adapters with an emptier worker: enough to even out a scale-out
# in a few passes, few enough that one pass never swaps a whole pool's adapters at once.
MAX_MOVES_PER_PASS = 8
# A declared adapter's copy that is no longer wanted on a worker (a copy the gateway loaded
# on demand for a burst, the old end of a move) is unloaded only after it has been unwanted
# and idle this long: the next burst still finds it loaded, and a brief view never thrashes.
UNLOAD_GRACE_S = 30.0


@dataclass(frozen=True)
class WorkerAdapters:
    """One ready worker as its admin API reports it."""

    name: str
    held: frozenset[str] = frozenset()
    running: Mapping[str, int] = field(default_factory=dict)  # running requests per adapter
    load: float = 0.0  # requests running and waiting on the worker (any model)

    def busy(self, adapter: str) -> bool:
        return self.running.get(adapter, 0) > 0


@dataclass(frozen=True)
class Action:
    worker: str
    adapter: str


@dataclass(frozen=True)
class Placement:
    desired: dict[str, frozenset[str]]  # worker -> declared adapters it should hold
    loads: tuple[Action, ...] = ()
    unloads: tuple[Action, ...] = ()


def place(workers: Sequence[WorkerAdapters], adapters: Sequence[AdapterSpec]) -> Placement:
    """Desired placement and the loads and unloads that move toward it."""
    declared = {a.name: a for a in adapters}
    n = len(workers)
    by_name = {w.name: w for w in workers}
    have: dict[str, set[str]] = {w.name: set(w.held) & set(declared) for w in workers}

    def rank(w: WorkerAdapters) -> tuple[int, float, str]:
        return (len(have[w.name]), w.load, w.name)

    # "all" first: they fix every worker's count, the rest then spread around them.
    for a in sorted(adapters, key=lambda a: (a.replicas is not None, a.name)):
        want = a.wanted(n)
        holders = [w for w in workers if a.name in have[w.name]]
        if len(holders) > want:
            # Surplus (replicas lowered, or loaded on demand by the gateway): drop idle
            # copies from the fullest, busiest workers first; busy ones wait for a later pass.
            surplus = sorted(
                (w for w in holders if not w.busy(a.name)),
                key=lambda w: (len(have[w.name]), w.load, w.name),
                reverse=True,
            )
            for w in surplus[: len(holders) - want]:
                have[w.name].discard(a.name)
        elif len(holders) < want:
            others = sorted((w for w in workers if a.name not in have[w.name]), key=rank)
            for w in others[: want - len(holders)]:
                have[w.name].add(a.name)

    _share(workers, declared, have)
    desired = {name: frozenset(s) for name, s in have.items()}
    return Placement(desired, *_diff(by_name, declared, desired))


def _share(
    workers: Sequence[WorkerAdapters],
    declared: Mapping[str, AdapterSpec],
    have: dict[str, set[str]],
) -> None:
    """Move idle counted adapters from the fullest worker to the emptiest (in place)."""
    movable = {name for name, a in declared.items() if a.replicas is not None}
    if len(workers) < 2:
        return
    for _ in range(MAX_MOVES_PER_PASS):

        def count(w: WorkerAdapters) -> int:
            return len(have[w.name] & movable)

        order = sorted(workers, key=lambda w: (count(w), w.load, w.name))
        low, high = order[0], order[-1]
        if count(high) - count(low) < 2:
            return
        candidates = sorted(
            a for a in have[high.name] & movable if a not in have[low.name] and not high.busy(a)
        )
        if not candidates:
            return
        have[high.name].discard(candidates[0])
        have[low.name].add(candidates[0])


def _diff(
    workers: Mapping[str, WorkerAdapters],
    declared: Mapping[str, AdapterSpec],
    desired: Mapping[str, frozenset[str]],
) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    loads = [
        Action(name, a)
        for name, w in sorted(workers.items())
        for a in sorted(desired[name] - w.held)
    ]
    n = len(workers)
    unloads = []
    for name, w in sorted(workers.items()):
        for a in sorted(w.held - desired[name]):
            if w.busy(a):
                continue  # its requests finish first
            spec = declared.get(a)
            if spec is not None:
                # Make before break: enough desired holders must already hold it.
                ready = sum(
                    1 for other, ow in workers.items() if a in ow.held and a in desired[other]
                )
                if ready < spec.wanted(n):
                    continue
            unloads.append(Action(name, a))
    return tuple(loads), tuple(unloads)


def holders(workers: Iterable[WorkerAdapters], adapter: str) -> list[str]:
    """Workers that really hold `adapter`, by name."""
    return sorted(w.name for w in workers if adapter in w.held)


def defer_unloads(
    unloads: Sequence[Action],
    declared: Collection[str],
    unwanted_since: Mapping[Action, float],
    now: float,
    grace: float = UNLOAD_GRACE_S,
) -> tuple[tuple[Action, ...], dict[Action, float]]:
    """(unloads to do now, the unwanted-since times to remember for the next pass).

    Undeclared adapters go at once (someone removed them); a declared adapter's copy goes
    once it has been an unload candidate for `grace` seconds in a row.
    """
    now_do: list[Action] = []
    keep: dict[Action, float] = {}
    for action in unloads:
        since = unwanted_since.get(action, now)
        if action.adapter not in declared or now - since >= grace:
            now_do.append(action)
        else:
            keep[action] = since
    return tuple(now_do), keep
