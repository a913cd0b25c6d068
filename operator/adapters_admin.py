"""The worker's adapter admin API, as the operator calls it (the I/O edge; nothing decides).

vLLM-compatible endpoints on the worker's HTTP port: `GET /v1/lora_adapters`,
`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

LIST_TIMEOUT_S = 3.0
RUNNING, WAITING = "shoal_num_requests_running", "shoal_num_requests_waiting"
# Reading an adapter's safetensors from disk: small, but the worker's event loop is busy
# serving, so leave it room.
LOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HeldAdapter:
    name: str
    path: str
    running: int = 0


@dataclass(frozen=True)
class AdminError:
    """A refusal with the worker's own code and message; `permanent` for a 4xx answer."""

    code: str
    message: str
    permanent: bool


class WorkerAdmin:
    def __init__(self, client: httpx.Client | None = None) -> None:
        # trust_env=False: workers are reached at their pod IPs, never through a proxy.
        self._client = client or httpx.Client(trust_env=False)

    def close(self) -> None:
        self._client.close()

    def list(self, endpoint: str) -> list[HeldAdapter]:
        """What the worker holds; raises httpx.HTTPError or ValueError when it cannot say."""
        r = self._client.get(f"{endpoint}/v1/lora_adapters", timeout=LIST_TIMEOUT_S)
        r.raise_for_status()
        data = r.json().get("data")
        if not isinstance(data, list):
            raise ValueError(f"{endpoint}/v1/lora_adapters: no 'data' list in the answer")
        return [
            HeldAdapter(str(d["name"]), str(d.get("path") or ""), int(d.get("running") or 0))
            for d in data
            if isinstance(d, dict) and d.get("name")
        ]

    def busy(self, endpoint: str) -> float | None:
        """Requests running and waiting on the worker (its /metrics), or None if unknown."""
        try:
            r = self._client.get(f"{endpoint}/metrics", timeout=LIST_TIMEOUT_S)
            r.raise_for_status()
            total = 0.0
            for family in text_string_to_metric_families(r.text):
                for sample in family.samples:
                    if sample.name in (RUNNING, WAITING):
                        total += sample.value
            return total
        except (httpx.HTTPError, ValueError):
            return None

    def load(self, endpoint: str, name: str, path: str) -> AdminError | None:
        body = {"lora_name": name, "lora_path": path}
        return self._post(f"{endpoint}/v1/load_lora_adapter", body, LOAD_TIMEOUT_S)

    def unload(self, endpoint: str, name: str) -> AdminError | None:
        error = self._post(f"{endpoint}/v1/unload_lora_adapter", {"lora_name": name}, 10.0)
        if error is not None and error.code == "model_not_found":
            return None  # already gone: that is the goal
        return error

    def _post(self, url: str, body: dict[str, Any], timeout: float) -> AdminError | None:
        try:
            r = self._client.post(url, json=body, timeout=timeout)
        except httpx.HTTPError as e:
            return AdminError("worker_unreachable", f"{type(e).__name__}: {e}", permanent=False)
        if r.status_code < 400:
            return None
        code, message = _error_of(r)
        return AdminError(code, message, permanent=400 <= r.status_code < 500)


def _error_of(r: httpx.Response) -> tuple[str, str]:
    """The OpenAI-style error's code and message, or the status line when it has none."""
    try:
        error = r.json().get("error") or {}
    except ValueError:
        error = {}
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(code or f"http_{r.status_code}"), str(message or r.text[:300] or r.reason_phrase)
