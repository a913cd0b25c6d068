"""A small client of the Prometheus HTTP API: instant queries, nothing else.

The autoscaler needs a handful of instant vectors per evaluation; a dependency-free client
keeps the operator's image small and its failure modes plain: every failure (unreachable,
HTTP error, a query Prometheus rejects, an answer that is not JSON) is one PrometheusError
whose message says which.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

# Prometheus sits inside the cluster: never through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus could not answer a query (the message says why)."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class Prometheus:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> list[Sample]:
        """An instant query; NaN samples (e.g. a quantile of no observation) are dropped."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with _OPENER.open(url, timeout=self.timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # 400: bad query, 422: cannot execute, 503: busy
            raise PrometheusError(f"{e.code} for {promql!r}: {_error_text(e)}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {reason}") from e
        except ValueError as e:
            raise PrometheusError(f"Prometheus at {self.url} answered no JSON: {e}") from e
        return parse_vector(body, promql)

    def scalar(self, promql: str) -> float | None:
        """The one value of a query that aggregates to a single sample; None when empty."""
        samples = self.query(promql)
        return samples[0].value if samples else None


def parse_vector(body: object, promql: str = "") -> list[Sample]:
    """The samples of an API answer (`resultType` vector or scalar)."""
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else body
        raise PrometheusError(f"query {promql!r} failed: {error}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        result = [{"metric": {}, "value": result}]
    elif kind != "vector":
        raise PrometheusError(f"query {promql!r}: expected a vector, got {kind}")
    out = []
    for item in result or []:
        value = float(item["value"][1])
        if not math.isnan(value):
            out.append(Sample(labels=dict(item.get("metric") or {}), value=value))
    return out


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error") or e.reason
    except (ValueError, OSError, AttributeError):
        return str(e.reason)
