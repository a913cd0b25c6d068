"""Local processes of the cluster: start detached, find again by pid, stop by process group.

Every component runs in its own session (process group), so stopping one ends all it
started. A pid is trusted only while /proc/<pid>/cmdline still names what we started
(pids are recycled), and a zombie counts as dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc  # so we can reap it if we are still its parent
    return proc.pid


_CHILDREN: dict[int, subprocess.Popen] = {}


def alive(pid: int, marker: str) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:  # our own child: no pid reuse possible until we reap it
        # (and /proc/PID/cmdline reads empty for a moment right after exec)
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X") and marker in cmdline


def stop(pid: int, marker: str, grace: float = 10.0) -> bool:
    """SIGTERM the process group, SIGKILL after `grace`; True if it was running."""
    if not alive(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid, marker):
        time.sleep(0.1)
    if alive(pid, marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        while alive(pid, marker):
            time.sleep(0.05)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


def kill_group_if_exists(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bytes | None:
    """GET a loopback URL (never through a proxy from the environment); None on failure."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as resp:
            return resp.read() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    return http_get(url, context, timeout) is not None


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    still_alive: Callable[[], bool] = lambda: True,
    log_hint: str = "",
    interval: float = 0.2,
) -> None:
    """Poll `check` until true; fail early (with the log's path) if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not still_alive():
            raise RuntimeError(f"{what} exited while starting{log_hint}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s{log_hint}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
