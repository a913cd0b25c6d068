"""Run an ASGI app with real uvicorn on a free loopback port, in a background thread.

For tests and demos that need a real HTTP server in-process (so they can also reach the
app's engine): `with serve_in_thread(app) as base_url: ...`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


@contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", startup_timeout: float = 60.0
) -> Iterator[str]:
    """Yield the server's base URL (http://127.0.0.1:PORT) while it runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_healthy(base_url: str, timeout: float = 300.0) -> None:
    """Poll /health until 200; raise with the last answer if it never comes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
            if '"failed"' in last:
                break
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{base_url} never became healthy: {last}")


@contextmanager
def running_worker(config: Any, pool: str = "", **build_kwargs: Any) -> Iterator[tuple[str, Any]]:
    """A ready worker (real engine, real uvicorn) on loopback: yields (base_url, app)."""
    from shoal.runtime.server.api_server import build_app

    app = build_app(config, pool=pool, **build_kwargs)
    with serve_in_thread(app) as base_url:
        wait_healthy(base_url)
        yield base_url, app
