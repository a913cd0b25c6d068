"""The operator's calls to a worker's gRPC service (shoal.v1.Migration): the I/O edge of
drains and the rebalancer. Replies come back as the plain objects of drain.py; nothing here
decides.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shoal.operator.drain import Load, RequestLoad
from shoal.runtime.migration import migration_pb2 as pb
from shoal.runtime.migration import migration_pb2_grpc as pb_grpc

log = logging.getLogger("shoal.operator")

# Loopback and pod IPs are reached directly: an HTTP(S)_PROXY in the operator's environment
# must not capture them (grpc honours those variables by default).
_OPTIONS = [("grpc.enable_http_proxy", 0)]
LOAD_TIMEOUT_S = 2.0
# Slack on top of the drain's own timeout: the worker answers when its deadline passes.
DRAIN_SLACK_S = 15.0


@dataclass(frozen=True)
class DrainResult:
    migrated: int = 0
    failed: int = 0
    remaining: int = 0
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class MigrateResult:
    ok: bool
    reason: str = ""
    downtime_s: float = 0.0
    bytes: int = 0


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.MigrationStub]:
    channel = grpc.insecure_channel(target, options=_OPTIONS)
    return channel, pb_grpc.MigrationStub(channel)


def get_load(target: str, timeout_s: float = LOAD_TIMEOUT_S) -> Load | None:
    """The worker's load; None when it cannot be asked (not up yet, gone, no gRPC)."""
    channel, stub = _stub(target)
    try:
        r = stub.GetLoad(pb.LoadRequest(), timeout=timeout_s)
    except grpc.RpcError as e:
        log.debug("GetLoad %s failed: %s", target, e.code())
        return None
    finally:
        channel.close()
    return Load(
        num_running=r.num_running,
        num_waiting=r.num_waiting,
        kv_usage=r.kv_usage,
        free_blocks=r.free_blocks,
        total_blocks=r.total_blocks,
        draining=r.draining,
        requests=tuple(
            RequestLoad(q.request_id, q.num_computed_tokens, q.num_output_tokens, q.max_tokens)
            for q in r.requests
        ),
    )


def drain(
    source: str, targets: Sequence[str], timeout_s: float, max_concurrent: int, max_stages: int
) -> DrainResult:
    """Ask `source` to stop admitting and move every request to `targets`; blocks until the
    worker says it is done or its timeout passes. A failed call raises grpc.RpcError."""
    channel, stub = _stub(source)
    try:
        r = stub.Drain(
            pb.DrainRequest(
                targets=list(targets),
                timeout_s=timeout_s,
                max_concurrent=max_concurrent,
                max_stages=max_stages,
            ),
            timeout=timeout_s + DRAIN_SLACK_S,
        )
    finally:
        channel.close()
    return DrainResult(r.migrated, r.failed, r.remaining, tuple(r.errors))


def undrain(source: str, timeout_s: float = LOAD_TIMEOUT_S) -> bool:
    channel, stub = _stub(source)
    try:
        return stub.Undrain(pb.UndrainRequest(), timeout=timeout_s).draining is False
    finally:
        channel.close()


def migrate(
    source: str, request_id: str, target: str, max_stages: int, timeout_s: float = 60.0
) -> MigrateResult:
    """Move one request from `source` to `target` (the rebalancer's move)."""
    channel, stub = _stub(source)
    try:
        r = stub.Migrate(
            pb.MigrateRequest(request_id=request_id, target=target, max_stages=max_stages),
            timeout=timeout_s,
        )
    except grpc.RpcError as e:
        return MigrateResult(False, f"rpc: {e.code().name}")
    finally:
        channel.close()
    return MigrateResult(r.ok, r.reason, r.downtime_s, r.bytes)
