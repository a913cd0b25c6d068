"""Drain: move every request off this worker, round after round, until none is left or
the time is up. Requests that finish on their own meanwhile simply leave; a request
whose migration aborts stays here and is tried again (on the next target) next round.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shoal.runtime.migration.source import Outcome

RETRY_PAUSE_S = 0.2
# Reasons that mean the request no longer needs moving (not a failure).
GONE = frozenset({"finished", "not_found", "aborted"})


@dataclass
class DrainResult:
    migrated: int = 0
    failed: int = 0
    remaining: int = 0
    errors: list[str] = field(default_factory=list)


def drain(
    list_requests: Callable[[], list[str]],
    migrate: Callable[[str, str], Outcome],
    targets: list[str],
    *,
    timeout_s: float,
    max_concurrent: int,
) -> DrainResult:
    """`list_requests()` names the requests still here; `migrate(request_id, target)`
    moves one. Targets are taken in turn, so a round spreads requests over them."""
    result = DrainResult()
    deadline = time.monotonic() + timeout_s
    if not targets:
        result.remaining = len(list_requests())
        if result.remaining:
            result.errors.append("no targets to drain to")
        return result
    turn = itertools.cycle(targets)
    with ThreadPoolExecutor(max(1, max_concurrent), thread_name_prefix="shoal-drain") as pool:
        while True:
            ids = list_requests()
            if not ids or time.monotonic() > deadline:
                break
            jobs = [(rid, next(turn)) for rid in ids]
            outcomes = list(pool.map(lambda job: migrate(*job), jobs))
            retry = False
            for (_rid, target), outcome in zip(jobs, outcomes, strict=True):
                if outcome.ok:
                    result.migrated += 1
                elif outcome.reason not in GONE:
                    result.failed += 1
                    retry = True
                    message = f"{target}: {outcome.reason}"
                    if message not in result.errors and len(result.errors) < 20:
                        result.errors.append(message)
            if retry:
                time.sleep(RETRY_PAUSE_S)
    result.remaining = len(list_requests())
    return result
