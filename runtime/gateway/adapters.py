"""Adapters in the gateway: which exist, which base pool serves each, where each is loaded,
and which worker an adapter's request goes to. Pure: no I/O here (see adapters_io.py).

An adapter name is a model name of its base model's pool. The gateway learns adapters two
ways: declared in a ModelDeployment's `spec.adapters` (so it knows the base and the path even
before any worker holds it), and from each worker's `GET /v1/lora_adapters` (what is really
loaded, including adapters loaded by hand).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.gateway.pools import Pool, Worker, served_model
from shoal.runtime.gateway.routing import WorkerLoad, load_score, pick_worker

# A holder counts as saturated (so the gateway loads the adapter on another worker) when the
# worker queues requests (its batch is full) or its KV cache is this full.
SATURATED_KV_USAGE = 0.9


@dataclass(frozen=True)
class DeclaredAdapter:
    name: str
    base: str  # the served name of the base model
    path: str  # the adapter directory on the node


@dataclass(frozen=True)
class HeldAdapter:
    name: str
    path: str = ""
    running: int = 0


def declared_adapters(mdeps: Iterable[Mapping[str, Any]]) -> dict[str, DeclaredAdapter]:
    """Adapters declared by ModelDeployments, by name (malformed entries are skipped: the
    operator reports them; the gateway just does not route to them)."""
    out: dict[str, DeclaredAdapter] = {}
    for mdep in mdeps:
        base = served_model(mdep)
        items = (mdep.get("spec") or {}).get("adapters")
        if not base or not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, Mapping):
                continue
            name, source = item.get("name"), item.get("source")
            if not isinstance(name, str) or not isinstance(source, str) or not name:
                continue
            path = source[len("file://") :] if source.startswith("file://") else source
            out.setdefault(name, DeclaredAdapter(name, base, path))
    return out


def parse_held(body: Any) -> list[HeldAdapter]:
    """A worker's `GET /v1/lora_adapters` answer; raises ValueError when it is not one."""
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise ValueError("not a /v1/lora_adapters answer (no 'data' list)")
    return [
        HeldAdapter(str(d["name"]), str(d.get("path") or ""), int(d.get("running") or 0))
        for d in data
        if isinstance(d, Mapping) and d.get("name")
    ]


@dataclass
class AdapterRegistry:
    """The gateway's adapter view. Discovery (a thread) swaps `declared` wholesale; the
    rest is touched only from the event loop."""

    declared: dict[str, DeclaredAdapter] = field(default_factory=dict)
    held: dict[str, dict[str, HeldAdapter]] = field(default_factory=dict)  # by endpoint

    def set_declared(self, declared: dict[str, DeclaredAdapter]) -> None:
        self.declared = dict(declared)

    def record_held(self, endpoint: str, adapters: Iterable[HeldAdapter]) -> None:
        self.held[endpoint] = {a.name: a for a in adapters}

    def add_held(self, endpoint: str, name: str, path: str) -> None:
        """A load the gateway itself made: route there before the next scrape says so."""
        self.held.setdefault(endpoint, {})[name] = HeldAdapter(name, path)

    def drop_holder(self, endpoint: str, name: str) -> None:
        """`endpoint` answered that it does not hold `name` (our view was stale)."""
        self.held.get(endpoint, {}).pop(name, None)

    def retain(self, endpoints: Collection[str]) -> None:
        for gone in set(self.held) - set(endpoints):
            del self.held[gone]

    def holders(self, name: str) -> set[str]:
        return {ep for ep, held in self.held.items() if name in held}

    def base_of(self, name: str, pools: Mapping[str, Pool]) -> str | None:
        """The base model whose pool serves adapter `name`, or None (not an adapter here)."""
        declared = self.declared.get(name)
        if declared is not None and declared.base in pools:
            return declared.base
        where = self.holders(name)
        for model, pool in sorted(pools.items()):
            if any(w.endpoint in where for w in pool.workers):
                return model
        return None

    def path_of(self, name: str) -> str | None:
        declared = self.declared.get(name)
        if declared is not None:
            return declared.path
        return next((h[name].path for h in self.held.values() if name in h), None)

    def listed(self, pools: Mapping[str, Pool]) -> list[tuple[str, str, str]]:
        """(adapter, base, path) for every adapter the gateway can route, by name."""
        names = set(self.declared) | {n for held in self.held.values() for n in held}
        out = []
        for name in sorted(names - set(pools)):
            base = self.base_of(name, pools)
            if base is not None:
                out.append((name, base, self.path_of(name) or ""))
        return out


def saturated(load: WorkerLoad | None) -> bool:
    if load is None:
        return False  # no figure: trust the holder rather than load the adapter elsewhere
    return load.waiting > 0 or load.kv_cache_usage >= SATURATED_KV_USAGE


@dataclass(frozen=True)
class AdapterRoute:
    worker: Worker
    needs_load: bool  # the worker does not hold the adapter yet: load it first


def route_adapter(
    workers: Sequence[Worker],
    holders: Collection[str],
    inflight: Mapping[str, int],
    loads: Mapping[str, WorkerLoad],
    *,
    exclude: Collection[str] = (),
    penalized: Collection[str] = (),
    rotation: int = 0,
) -> AdapterRoute | None:
    """The least-loaded holder; when none holds it, or every holder is saturated, the
    least-loaded other worker of the pool (to load it on demand) if it is less loaded than
    the best holder. None when no worker is left to try."""
    holding = [w for w in workers if w.endpoint in holders]
    others = [w for w in workers if w.endpoint not in holders]
    kwargs = dict(exclude=exclude, penalized=penalized, rotation=rotation)
    best = pick_worker(holding, inflight, loads, **kwargs)
    if best is not None and not saturated(loads.get(best.endpoint)):
        return AdapterRoute(best, needs_load=False)
    alt = pick_worker(others, inflight, loads, **kwargs)
    if alt is None:
        return AdapterRoute(best, needs_load=False) if best is not None else None
    if best is None:
        return AdapterRoute(alt, needs_load=True)

    def score(w: Worker) -> float:
        return load_score(inflight.get(w.endpoint, 0), loads.get(w.endpoint))

    if score(alt) < score(best):
        return AdapterRoute(alt, needs_load=True)
    return AdapterRoute(best, needs_load=False)


def adapter_card(name: str, base: str, path: str) -> dict[str, object]:
    """An adapter in `/v1/models`, shaped like vLLM's: its base model is the parent."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "shoal",
        "root": path,
        "parent": base,
    }
