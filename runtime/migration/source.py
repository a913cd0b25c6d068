"""The staged migration protocol, source side (Llumnix, OSDI '24):

1. the target reserves blocks for the request;
2. stage after stage, the blocks filled since the last stage are copied while the
   request keeps decoding here (full blocks never change again);
3. once a stage copied at most `STOP_AT_BLOCKS` blocks (or after `max_stages`), the
   request is paused, its last blocks and state are sent with Commit, and the target
   installs it; only this stop-and-copy is downtime;
4. on success the blocks here are freed and the request's stream ends with a pointer to
   the target; on any failure the request is resumed here and nothing is lost.

Runs in a plain thread (a gRPC handler or a drain worker); the engine is reached only
through `call_in_step`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from shoal.runtime.engine.outputs import RequestMigrated
from shoal.runtime.migration import kv
from shoal.runtime.migration import migration_pb2 as pb
from shoal.runtime.migration.kv import MigrationAbort

log = logging.getLogger("shoal.migration")

STOP_AT_BLOCKS = 1  # a stage this small means the next copy is short: stop and copy
RPC_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 60.0
# Headroom reserved beyond the current context, so a few stages need no regrowth.
HEADROOM_BLOCKS = 2


@dataclass
class Outcome:
    ok: bool
    reason: str = ""
    downtime_s: float = 0.0
    duration_s: float = 0.0
    bytes: int = 0
    stages: int = 0
    target_url: str = ""


# A hook called with each stage's name ("reserved", "copied", "paused"): the seam
# tests use to inject faults at a given stage.
StageHook = Callable[[str], None]


def _raise_for(reply: Any) -> None:
    if not reply.ok:
        reason, _, detail = reply.reason.partition(": ")
        raise MigrationAbort(reason or "target_error", detail)


def http_url(grpc_target: str, http_port: int) -> str:
    host = grpc_target.rsplit(":", 1)[0]
    return f"http://{host}:{http_port}"


def migrate(
    engine: Any,
    stub: Any,
    target: str,
    request_id: str,
    *,
    max_stages: int = 4,
    recompute: bool = False,
    on_stage: StageHook | None = None,
) -> Outcome:
    """Move one request to the worker at gRPC address `target` (see the module doc)."""
    started = time.monotonic()
    out = Outcome(ok=False)
    hook = on_stage or (lambda stage: None)

    def step(fn):
        return engine.call_in_step(fn).result(STEP_TIMEOUT_S)

    reserved = paused = False
    try:
        snap = step(lambda e: kv.describe(e, request_id))
        if snap is None:
            raise MigrationAbort("not_found", f"no running request {request_id}")
        lay = step(kv.layout)
        bs = lay.block_size
        with_kv = snap.running and not recompute
        need = -(-snap.num_tokens // bs) + HEADROOM_BLOCKS if with_kv else 0
        reply = stub.Reserve(
            pb.ReserveRequest(
                request_id=request_id, num_blocks=need, layout=lay, adapter=snap.adapter
            ),
            timeout=RPC_TIMEOUT_S,
        )
        _raise_for(reply)
        reserved = True
        out.target_url = http_url(target, reply.http_port)
        hook("reserved")

        sent: list[int] = []
        if with_kv:
            for _ in range(max(0, max_stages)):
                new, blocks = step(lambda e: kv.read_full_blocks(e, request_id, sent))
                if new:
                    data = kv.blocks_to_bytes(blocks)
                    reply = stub.WriteBlocks(
                        pb.WriteBlocksRequest(
                            request_id=request_id, start=len(sent), num_blocks=len(new), data=data
                        ),
                        timeout=RPC_TIMEOUT_S,
                    )
                    _raise_for(reply)
                    out.bytes += len(data)
                    sent.extend(new)
                out.stages += 1
                hook("copied")
                if len(new) <= STOP_AT_BLOCKS:
                    break

        last = step(lambda e: kv.pause(e, request_id, sent, with_kv))
        paused = True
        paused_at = time.monotonic()
        hook("paused")
        tail_ids = last.block_ids[len(sent) :]
        data = kv.blocks_to_bytes(last.tail)
        reply = stub.Commit(
            pb.CommitRequest(
                request_id=request_id,
                start=len(sent),
                num_blocks=len(tail_ids),
                data=data,
                state=last.state,
                generator_state=last.generator,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        _raise_for(reply)
        out.bytes += len(data) + len(last.state) + len(last.generator)
        url = out.target_url

        def finish(e) -> bool:
            if not kv.hand_off(e, request_id):
                return False
            # Queued after every output of the steps before: the stream ends in order.
            engine.push(request_id, RequestMigrated(request_id, url))
            return True

        if not step(finish):
            # aborted here (the client left) while the target was installing it
            stub.Release(pb.ReleaseRequest(request_id=request_id), timeout=RPC_TIMEOUT_S)
            raise MigrationAbort("aborted", "the client went away during the migration")
        paused = False
        out.ok = True
        out.downtime_s = time.monotonic() - paused_at
    except MigrationAbort as exc:
        out.reason = exc.reason
        log.info("migration of %s to %s aborted: %s", request_id, target, exc)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        out.reason = (
            "connection_lost"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else "target_error"
        )
        log.warning("migration of %s to %s aborted: %s (%s)", request_id, target, out.reason, code)
    except Exception as exc:  # anything else: the request must still go on here
        out.reason = "source_error"
        log.exception("migration of %s to %s failed: %s", request_id, target, exc)
    finally:
        out.duration_s = time.monotonic() - started
        if not out.ok:
            if paused:
                step(lambda e: kv.resume(e, request_id))
            if reserved and out.reason != "aborted":
                # best effort: an unreachable target frees it when it expires
                with contextlib.suppress(grpc.RpcError):
                    stub.Release(pb.ReleaseRequest(request_id=request_id), timeout=2)
    return out
