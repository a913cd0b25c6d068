"""What `status.adapters` and the `AdaptersReady` condition say after a placement pass. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.operator.adapters_placement import WorkerAdapters, holders
from shoal.operator.adapters_spec import AdapterSpec
from shoal.operator.conditions import Condition

CONDITION = "AdaptersReady"


@dataclass(frozen=True)
class LoadFailure:
    """A load the worker refused: its error code and message (the worker's own words)."""

    worker: str
    code: str
    message: str

    @property
    def reason(self) -> str:
        """The worker's code as a condition reason (lora_rank_too_large -> LoraRankTooLarge)."""
        words = [w for w in self.code.replace("-", "_").split("_") if w]
        return "".join(w[:1].upper() + w[1:] for w in words) or "LoadFailed"


def adapters_status(
    adapters: Sequence[AdapterSpec],
    workers: Sequence[WorkerAdapters],
    failures: Mapping[str, LoadFailure],
) -> tuple[list[dict[str, Any]], Condition]:
    """One status entry per declared adapter, and the pool's AdaptersReady condition.

    `workers` is what the workers hold after this pass's loads and unloads; `failures` holds
    this pass's refused loads by adapter name.
    """
    n = len(workers)
    entries: list[dict[str, Any]] = []
    for a in adapters:
        want = a.wanted(n)
        on = holders(workers, a.name)
        entry: dict[str, Any] = {
            "name": a.name,
            "source": a.source,
            "desiredReplicas": want,
            "workers": on,
        }
        failure = failures.get(a.name)
        if len(on) >= want and (n or a.replicas == 0):
            entry["state"] = "Ready"
        elif failure is not None:
            entry.update(
                state="Failed",
                reason=failure.reason,
                message=f"worker {failure.worker}: {failure.message}",
            )
        elif n == 0:
            entry.update(state="Pending", reason="NoReadyWorkers", message="no worker is ready")
        else:
            entry.update(
                state="Loading",
                reason="Loading",
                message=f"on {len(on)} of {want} worker(s)",
            )
        entries.append(entry)
    return entries, _condition(entries)


def _condition(entries: Sequence[Mapping[str, Any]]) -> Condition:
    if not entries:
        return Condition(CONDITION, True, "NoAdapters", "no adapters declared")
    failed = [e for e in entries if e["state"] == "Failed"]
    ready = sum(e["state"] == "Ready" for e in entries)
    if failed:
        detail = "; ".join(f"{e['name']}: {e['message']}" for e in failed)
        return Condition(
            CONDITION,
            False,
            "AdapterLoadFailed",
            f"{len(failed)} of {len(entries)} adapter(s) failed to load ({detail})",
        )
    if ready == len(entries):
        return Condition(CONDITION, True, "AllAdaptersPlaced", f"{ready}/{len(entries)} ready")
    if all(e["state"] == "Pending" for e in entries):
        return Condition(CONDITION, False, "NoReadyWorkers", "no worker is ready to load adapters")
    return Condition(CONDITION, False, "AdaptersLoading", f"{ready}/{len(entries)} ready")
