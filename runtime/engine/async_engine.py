"""The engine for an asyncio server: the step loop runs in its own thread, so the
event loop never waits on the model; outputs stream back per request.

The HTTP side only enqueues commands (add, abort); the step thread applies them
between steps, so engine state is touched by one thread alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.llm_engine import LLMEngine
from shoal.runtime.engine.outputs import EngineStats, RequestOutput
from shoal.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.model_name = config.model_name
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self._commands: list[tuple] = []
        self._wake = threading.Condition()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="shoal-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def is_running(self) -> bool:
        """True while the step loop thread is alive (for /health)."""
        return self._thread is not None and self._thread.is_alive()

    # ---- requests ------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens are produced; closing the iterator early aborts."""
        self.check_request(prompt_token_ids, params)
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        self.open_stream(request_id)
        self._submit(("add", request_id, list(prompt_token_ids), params, time.monotonic()))
        outputs = self.follow(request_id)
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()  # at once: closing it is what aborts the request

    def open_stream(self, request_id: str) -> None:
        """Register the queue a request's outputs go to, before the request exists in the
        engine (a migration target opens it before the request is installed)."""
        self._streams[request_id] = asyncio.Queue()

    async def follow(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the outputs of a request whose stream is open; closing early aborts.
        Raises RequestMigrated when the request moved to another worker."""
        queue = self._streams[request_id]
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def call_in_step(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the step thread between two steps (the engine's state is
        touched by that thread alone); any thread may wait on the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, future))
        return future

    def drop_stream(self, request_id: str) -> None:
        """Forget a stream opened for a request that nobody will follow."""
        self._streams.pop(request_id, None)

    def push(self, request_id: str, item: object) -> None:
        """Hand an output or an exception to a request's stream (thread-safe)."""
        self._send([(request_id, item)])

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- the step thread ---------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Runs on the event loop: hand each output or error to its stream."""
        for request_id, item in items:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(item)

    def _send(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _apply_commands(self) -> None:
        with self._wake:
            commands, self._commands = self._commands, []
        failed: list[tuple[str, object]] = []
        for cmd in commands:
            if cmd[0] == "add":
                _, request_id, prompt, params, arrival = cmd
                try:
                    self.engine.add_request(request_id, prompt, params, arrival)
                except Exception as exc:  # one bad request must not stop the loop
                    failed.append((request_id, exc))
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "call":
                _, fn, future = cmd
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # handed to the caller, never stops the loop
                    future.set_exception(exc)
        self._send(failed)

    def _run(self) -> None:
        log.info("engine loop started")
        while True:
            with self._wake:
                # has_work, not has_unfinished: a request paused by a migration is
                # unfinished but gives the loop nothing to step.
                while (
                    not self._commands
                    and not self.engine.scheduler.has_work()
                    and not self._stopping
                ):
                    self._wake.wait()
                if self._stopping:
                    break
            self._apply_commands()
            if not self.engine.scheduler.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                # The step's requests are lost; the engine itself lives on.
                log.exception("engine step failed; aborting the requests in that step")
                self._send(self._abort_all(exc))
                continue
            self._send([(out.request_id, out) for out in outputs])
        log.info("engine loop stopped")

    def _abort_all(self, exc: Exception) -> list[tuple[str, object]]:
        error = RuntimeError(f"the engine failed while running this request: {exc}")
        items = []
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            items.append((request_id, error))
        return items
