"""What the e2e tests share: local `shoal` processes, free ports, and the CRD/model
fixtures (module scope; re-exported by conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOAL = str(Path(sys.executable).parent / "shoal")
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShoalProcess:
    """A `shoal` command run on the host (as the chart's pods would run it), its output in
    a log file. `env=None` inherits the test's environment."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SHOAL, *argv], stdout=self._log, stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, url: str) -> int:
        """Status of a GET on loopback (never through an env proxy); the process must live."""
        assert self.proc.poll() is None, f"{self.log_path.name} exited:\n{self.log()[-3000:]}"
        with _LOOPBACK.open(url, timeout=2) as r:
            return r.status

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def crds(cluster) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    for crd in ("modeldeployments.shoal.dev", "kopfpeerings.kopf.dev"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from shoal.runtime.testing import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama"))
