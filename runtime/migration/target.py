"""The target side of a migration: hold reserved blocks per incoming request, write the
copied blocks into them, and install the request when the source commits.

Reservations expire (a source that died mid-copy must not leak blocks), and an
installed request whose stream nobody resumes within ATTACH_TIMEOUT_S is aborted.
Called from gRPC threads; the engine is reached through call_in_step only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.engine.outputs import TokenLogprob
from shoal.runtime.migration import kv
from shoal.runtime.migration import state as state_codec
from shoal.runtime.migration.kv import MigrationAbort
from shoal.runtime.migration.migration_pb2 import KVLayout

log = logging.getLogger("shoal.migration")

RESERVATION_TTL_S = 120.0
ATTACH_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0


@dataclass
class Reservation:
    block_ids: list[int]
    layout: KVLayout
    expires: float


@dataclass
class Resumable:
    """What the resume endpoint needs beyond the engine's stream."""

    reported_logprobs: list[TokenLogprob] = field(default_factory=list)
    installed_at: float = field(default_factory=time.monotonic)


class TargetSide:
    def __init__(self, engine: Any):
        self.engine = engine  # AsyncLLMEngine
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}
        self.resumable: dict[str, Resumable] = {}

    def _step(self, fn):
        return self.engine.call_in_step(fn).result(STEP_TIMEOUT_S)

    def expire(self) -> None:
        """Free reservations whose source went quiet, abort requests nobody resumed."""
        now = time.monotonic()
        with self._lock:
            stale = [rid for rid, r in self._reservations.items() if r.expires < now]
            dropped = [self._reservations.pop(rid) for rid in stale]
            orphans = [
                rid for rid, r in self.resumable.items() if now - r.installed_at > ATTACH_TIMEOUT_S
            ]
            for rid in orphans:
                del self.resumable[rid]
        for rid, r in zip(stale, dropped, strict=True):
            log.warning("reservation for %s expired: the source never committed", rid)
            self._step(lambda e, ids=r.block_ids: kv.release(e, ids))
        for rid in orphans:
            log.warning("migrated request %s was never resumed: aborting it", rid)
            self.engine.drop_stream(rid)
            self.engine.call_in_step(lambda e, rid=rid: e.abort(rid))

    def reserve(
        self, request_id: str, num_blocks: int, lay: KVLayout, draining: bool, adapter: str = ""
    ) -> None:
        if draining:
            raise MigrationAbort("target_draining", "the target is draining")
        if not self._step(lambda e: kv.has_adapter(e, adapter)):
            raise MigrationAbort("adapter_missing", f"adapter {adapter!r} is not loaded here")
        mine = self._step(kv.layout)
        if mine != lay:
            raise MigrationAbort("incompatible", f"target KV layout {mine} != source {lay}")
        with self._lock:
            arriving = request_id in self._reservations or request_id in self.resumable
        if arriving or self._step(lambda e: request_id in e.requests):
            raise MigrationAbort("duplicate", f"{request_id} is already here")
        ids = self._step(lambda e: kv.reserve(e, num_blocks))
        if ids is None:
            raise MigrationAbort(
                "target_full", f"the target has fewer than {num_blocks} free blocks"
            )
        with self._lock:
            self._reservations[request_id] = Reservation(
                ids, lay, time.monotonic() + RESERVATION_TTL_S
            )

    def _reservation(self, request_id: str) -> Reservation:
        with self._lock:
            r = self._reservations.get(request_id)
        if r is None:
            raise MigrationAbort("no_reservation", f"no blocks are reserved for {request_id}")
        r.expires = time.monotonic() + RESERVATION_TTL_S
        return r

    def _write(self, r: Reservation, start: int, num_blocks: int, data: bytes) -> None:
        if not num_blocks:
            return
        if not self._step(lambda e: kv.grow(e, r.block_ids, start + num_blocks)):
            raise MigrationAbort("target_full", "the target ran out of blocks during the copy")
        blocks = kv.bytes_to_blocks(data, r.layout, num_blocks)
        ids = r.block_ids[start : start + num_blocks]
        self._step(lambda e: kv.write(e, ids, blocks))

    def write(self, request_id: str, start: int, num_blocks: int, data: bytes) -> None:
        self._write(self._reservation(request_id), start, num_blocks, data)

    def commit(
        self, request_id: str, start: int, num_blocks: int, data: bytes, state: bytes, gen: bytes
    ) -> None:
        r = self._reservation(request_id)
        try:
            self._write(r, start, num_blocks, data)
            seq = state_codec.decode(state, gen)
            total = start + num_blocks if seq.num_computed_tokens else 0
            with self._lock:
                self.resumable[request_id] = Resumable(
                    reported_logprobs=seq.logprobs[: seq.num_reported_tokens]
                )
            self.engine.open_stream(request_id)
            self._step(lambda e: kv.install(e, seq, r.block_ids, total))
        except BaseException:
            with self._lock:
                self.resumable.pop(request_id, None)
            self.engine.drop_stream(request_id)
            self.release(request_id)
            raise
        with self._lock:
            self._reservations.pop(request_id, None)

    def release(self, request_id: str) -> bool:
        """The source gave up: free the reservation (and abort the request if it was
        installed already and never resumed)."""
        with self._lock:
            r = self._reservations.pop(request_id, None)
            installed = self.resumable.pop(request_id, None)
        if r is not None:
            self._step(lambda e: kv.release(e, r.block_ids))
        if installed is not None:
            self.engine.drop_stream(request_id)
            self._step(lambda e: e.abort(request_id))
        return r is not None or installed is not None

    def take_resumable(self, request_id: str) -> Resumable | None:
        with self._lock:
            return self.resumable.pop(request_id, None)
