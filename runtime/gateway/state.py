"""The gateway's live view: pools, in-flight counts, scraped load, recent failures.

Discovery (a thread) replaces the pools wholesale; everything else is touched only from
the event loop, so a single reference swap is the only cross-thread hand-off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.runtime.gateway.adapters import AdapterRegistry, AdapterRoute, route_adapter
from shoal.runtime.gateway.pools import Pool, Worker
from shoal.runtime.gateway.routing import WorkerLoad, pick_worker

# A load figure older than this is ignored: better route by in-flight count alone than by
# what a worker was doing long ago.
LOAD_MAX_AGE_S = 5.0
# A worker that refused a connection or answered 5xx is tried last for this long.
FAILURE_PENALTY_S = 5.0


@dataclass
class GatewayState:
    clock: Callable[[], float] = time.monotonic
    _pools: dict[str, Pool] = field(default_factory=dict)
    synced: bool = False  # discovery has listed the world at least once
    inflight: dict[str, int] = field(default_factory=dict)
    _loads: dict[str, tuple[float, WorkerLoad]] = field(default_factory=dict)
    _failed_at: dict[str, float] = field(default_factory=dict)
    _rotation: int = 0
    adapters: AdapterRegistry = field(default_factory=AdapterRegistry)

    # -- written by discovery (any thread) --
    def set_pools(self, pools: dict[str, Pool]) -> None:
        self._pools = dict(pools)  # one reference swap; readers see old or new, never half
        self.synced = True

    # -- read by the app --
    @property
    def pools(self) -> dict[str, Pool]:
        return self._pools

    def pool_for(self, model: str) -> Pool | None:
        """The pool serving `model`: its own, or its base model's when it is an adapter."""
        pool = self._pools.get(model)
        if pool is not None:
            return pool
        base = self.adapters.base_of(model, self._pools)
        return self._pools.get(base) if base is not None else None

    def endpoints(self) -> set[str]:
        return {w.endpoint for pool in self._pools.values() for w in pool.workers}

    def record_load(self, endpoint: str, load: WorkerLoad) -> None:
        self._loads[endpoint] = (self.clock(), load)

    def forget_load(self, endpoint: str) -> None:
        self._loads.pop(endpoint, None)

    def loaded_endpoints(self) -> set[str]:
        return set(self._loads)

    def fresh_loads(self) -> dict[str, WorkerLoad]:
        now = self.clock()
        return {ep: load for ep, (t, load) in self._loads.items() if now - t <= LOAD_MAX_AGE_S}

    def record_failure(self, endpoint: str) -> None:
        self._failed_at[endpoint] = self.clock()

    def penalized(self) -> set[str]:
        now = self.clock()
        return {ep for ep, t in self._failed_at.items() if now - t <= FAILURE_PENALTY_S}

    def choose(self, pool: Pool, exclude: set[str]) -> Worker | None:
        worker = pick_worker(
            pool.workers,
            self.inflight,
            self.fresh_loads(),
            exclude=exclude,
            penalized=self.penalized(),
            rotation=self._rotation,
        )
        self._rotation += 1
        return worker

    def choose_for_adapter(
        self, pool: Pool, adapter: str, exclude: set[str]
    ) -> AdapterRoute | None:
        route = route_adapter(
            pool.workers,
            self.adapters.holders(adapter),
            self.inflight,
            self.fresh_loads(),
            exclude=exclude,
            penalized=self.penalized(),
            rotation=self._rotation,
        )
        self._rotation += 1
        return route

    def acquire(self, endpoint: str) -> None:
        self.inflight[endpoint] = self.inflight.get(endpoint, 0) + 1

    def release(self, endpoint: str) -> None:
        left = self.inflight.get(endpoint, 0) - 1
        if left > 0:
            self.inflight[endpoint] = left
        else:
            self.inflight.pop(endpoint, None)
