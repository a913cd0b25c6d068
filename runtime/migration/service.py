"""The worker's migration agent: the gRPC server on --grpc-port (control RPCs and the
worker-to-worker data plane), the draining flag, and the metrics.

gRPC runs on its own thread pool (the sync server), not on the HTTP event loop: the
handlers wait on the engine's step thread and on other workers, and two in-process
workers (tests, the bench) each get a server of their own.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from shoal.runtime.engine.sequence import SequenceStatus
from shoal.runtime.migration import drain as drain_mod
from shoal.runtime.migration import migration_pb2 as pb
from shoal.runtime.migration import migration_pb2_grpc as pb_grpc
from shoal.runtime.migration import source
from shoal.runtime.migration.kv import MigrationAbort
from shoal.runtime.migration.metrics import MigrationMetrics
from shoal.runtime.migration.target import TargetSide

log = logging.getLogger("shoal.migration")

MAX_MESSAGE = 1 << 30  # KV blocks of a long context go in one message
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
DEFAULT_DRAIN_TIMEOUT_S = 300.0
DEFAULT_MAX_CONCURRENT = 4
DEFAULT_MAX_STAGES = 4
REAP_INTERVAL_S = 5.0


class MigrationAgent:
    def __init__(self, server_state: Any, *, host: str, grpc_port: int, metrics: MigrationMetrics):
        self.server_state = server_state  # the HTTP server's ServerState (engine once loaded)
        self.host = host
        self.grpc_port = grpc_port  # the bound port once started (0 picks a free one)
        self.http_port = 0  # told to sources, for the gateway's resume; set by the server
        self.metrics = metrics
        self.draining = False
        self._server: grpc.Server | None = None
        self._stubs: dict[str, Any] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()
        self._moving: set[str] = set()  # requests with a migration in flight
        self._target: TargetSide | None = None
        self._stop = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="shoal-grpc"),
            options=CHANNEL_OPTIONS,
        )
        pb_grpc.add_MigrationServicer_to_server(_Servicer(self), server)
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            port = server.add_insecure_port(f"{host}:{self.grpc_port}")
        except RuntimeError:
            port = 0
        if not port:
            # The worker still serves; it just cannot be drained or take migrations.
            log.error(
                "migration DISABLED: cannot listen for gRPC on %s:%d (taken?); pass a free "
                "--grpc-port to this worker",
                self.host,
                self.grpc_port,
            )
            return
        self.grpc_port = port
        server.start()
        self._server = server
        threading.Thread(target=self._reap, name="shoal-migration-reaper", daemon=True).start()
        log.info("migration gRPC service on %s:%d", self.host, port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace=1).wait(5)
        for channel in self._channels:
            channel.close()

    def _reap(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            if self._target is not None:
                try:
                    self._target.expire()
                except Exception:
                    log.exception("expiring migration reservations failed")

    # ---- helpers --------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        engine = self.server_state.engine
        if engine is None:
            raise MigrationAbort("not_ready", "the model is still loading")
        return engine

    @property
    def target(self) -> TargetSide:
        if self._target is None:
            self._target = TargetSide(self.engine)
        return self._target

    def stub(self, target: str) -> Any:
        with self._lock:
            stub = self._stubs.get(target)
            if stub is None:
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
                self._channels.append(channel)
                stub = self._stubs[target] = pb_grpc.MigrationStub(channel)
            return stub

    def set_draining(self, draining: bool) -> None:
        if draining != self.draining:
            log.info("worker %s", "draining: new requests are refused" if draining else "undrained")
        self.draining = draining
        self.metrics.draining.set(1 if draining else 0)

    # ---- control ---------------------------------------------------------------------
    def load(self) -> pb.LoadReply:
        def snapshot(e) -> pb.LoadReply:
            bm = e.block_manager
            # A request paused mid-migration is in neither queue but still here until
            # the target has it: count it as running, or the worker would look empty
            # (and be deleted by a drain) while a request is between the two workers.
            paused = sum(
                s.status is SequenceStatus.PAUSED for seqs in e.requests.values() for s in seqs
            )
            reply = pb.LoadReply(
                num_running=len(e.scheduler.running) + paused,
                num_waiting=len(e.scheduler.waiting),
                kv_usage=bm.usage(),
                free_blocks=bm.num_free_blocks,
                total_blocks=bm.num_blocks,
            )
            for rid, seqs in e.requests.items():
                reply.requests.add(
                    request_id=rid,
                    num_computed_tokens=sum(s.num_computed_tokens for s in seqs),
                    num_output_tokens=sum(len(s.output_token_ids) for s in seqs),
                    max_tokens=seqs[0].params.max_tokens,
                )
            return reply

        reply = self.engine.call_in_step(snapshot).result(30)
        reply.draining = self.draining
        return reply

    def migrate(
        self,
        request_id: str,
        target: str,
        max_stages: int = DEFAULT_MAX_STAGES,
        recompute: bool = False,
        on_stage: source.StageHook | None = None,
    ) -> source.Outcome:
        with self._lock:
            if request_id in self._moving:
                return source.Outcome(ok=False, reason="in_progress")
            self._moving.add(request_id)
        try:
            outcome = source.migrate(
                self.engine,
                self.stub(target),
                target,
                request_id,
                max_stages=max_stages,
                recompute=recompute,
                on_stage=on_stage,
            )
        finally:
            with self._lock:
                self._moving.discard(request_id)
        self.metrics.record(outcome)
        if outcome.ok:
            log.info(
                "migrated %s to %s: %d stage(s), %.1f KiB, downtime %.1f ms, total %.1f ms",
                request_id, target, outcome.stages, outcome.bytes / 1024,
                outcome.downtime_s * 1e3, outcome.duration_s * 1e3,
            )  # fmt: skip
        return outcome

    def drain(
        self, targets: list[str], timeout_s: float = 0, max_concurrent: int = 0, max_stages: int = 0
    ) -> drain_mod.DrainResult:
        import time

        self.set_draining(True)
        started = time.monotonic()
        engine = self.engine

        def list_requests() -> list[str]:
            ids = engine.call_in_step(lambda e: list(e.requests)).result(30)
            with self._lock:
                return [rid for rid in ids if rid not in self._moving]

        result = drain_mod.drain(
            list_requests,
            lambda rid, target: self.migrate(rid, target, max_stages or DEFAULT_MAX_STAGES),
            list(targets),
            timeout_s=timeout_s or DEFAULT_DRAIN_TIMEOUT_S,
            max_concurrent=max_concurrent or DEFAULT_MAX_CONCURRENT,
        )
        self.metrics.drain_duration.observe(time.monotonic() - started)
        log.info(
            "drain to %s: %d migrated, %d failed attempt(s), %d remaining",
            ",".join(targets), result.migrated, result.failed, result.remaining,
        )  # fmt: skip
        return result


def _abort_reply(cls: type, exc: MigrationAbort, **extra: Any) -> Any:
    return cls(ok=False, reason=str(exc), **extra)


class _Servicer(pb_grpc.MigrationServicer):
    def __init__(self, agent: MigrationAgent):
        self.agent = agent

    def _engine_or_abort(self, context: grpc.ServicerContext) -> None:
        if self.agent.server_state.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    # control
    def GetLoad(self, request, context):
        self._engine_or_abort(context)
        return self.agent.load()

    def Drain(self, request, context):
        self._engine_or_abort(context)
        r = self.agent.drain(
            list(request.targets), request.timeout_s, request.max_concurrent, request.max_stages
        )
        return pb.DrainReply(
            migrated=r.migrated, failed=r.failed, remaining=r.remaining, errors=r.errors
        )

    def Undrain(self, request, context):
        self.agent.set_draining(False)
        return pb.UndrainReply(draining=False)

    def Migrate(self, request, context):
        self._engine_or_abort(context)
        o = self.agent.migrate(
            request.request_id,
            request.target,
            request.max_stages or DEFAULT_MAX_STAGES,
            request.recompute,
        )
        return pb.MigrateReply(ok=o.ok, reason=o.reason, downtime_s=o.downtime_s, bytes=o.bytes)

    # data plane
    def Reserve(self, request, context):
        self._engine_or_abort(context)
        try:
            self.agent.target.reserve(
                request.request_id,
                request.num_blocks,
                request.layout,
                self.agent.draining,
                request.adapter,
            )
        except MigrationAbort as exc:
            return _abort_reply(pb.ReserveReply, exc)
        return pb.ReserveReply(ok=True, http_port=self.agent.http_port)

    def WriteBlocks(self, request, context):
        try:
            self.agent.target.write(
                request.request_id, request.start, request.num_blocks, request.data
            )
        except MigrationAbort as exc:
            return _abort_reply(pb.WriteBlocksReply, exc)
        return pb.WriteBlocksReply(ok=True)

    def Commit(self, request, context):
        try:
            self.agent.target.commit(
                request.request_id,
                request.start,
                request.num_blocks,
                request.data,
                request.state,
                request.generator_state,
            )
        except MigrationAbort as exc:
            return _abort_reply(pb.CommitReply, exc)
        return pb.CommitReply(ok=True, http_port=self.agent.http_port)

    def Release(self, request, context):
        return pb.ReleaseReply(released=self.agent.target.release(request.request_id))
