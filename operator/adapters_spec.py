"""`spec.adapters[]`: the LoRA adapters a pool serves over its base model, parsed and checked.

Each adapter becomes a model name in the OpenAI API and a label value on metrics, so its name
is held to what both accept. The schema (crds/) rejects wrong types at the API server; this
is the second line, with messages that name the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.operator.spec import SpecError

# A label value (63 chars) that is also a plain model name: no '/', no spaces, no upper case
# (names that differ only in case would be two models to the API and one to people).
MAX_ADAPTER_NAME_LEN = 63
_ADAPTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
ALL = "all"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    source: str
    # How many workers keep it loaded; None means every worker of the pool ("all").
    replicas: int | None = 1

    @property
    def path(self) -> str:
        """The adapter directory on the node (a `file://` URI is unwrapped)."""
        return adapter_path(self.source, self.name)

    def wanted(self, n_workers: int) -> int:
        """Workers that should hold it, clamped to the workers there are."""
        if self.replicas is None:
            return n_workers
        return min(self.replicas, n_workers)


def adapter_path(source: str, where: str = "") -> str:
    field = f"spec.adapters[{where}].source" if where else "spec.adapters[].source"
    if source.startswith("file://"):
        path = source[len("file://") :]
    elif "://" in source:
        scheme = source.split("://", 1)[0]
        raise SpecError(
            f"{field}: scheme {scheme!r} is not supported; give a path on the node or a file:// URI"
        )
    else:
        path = source
    if not path.startswith("/"):
        raise SpecError(f"{field}: {source!r} must be an absolute path on the node")
    return path


def parse_adapters(raw: Any, base_model: str) -> tuple[AdapterSpec, ...]:
    """Parse `spec.adapters`; `base_model` is the served base name (an adapter may not take it)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("spec.adapters: must be a list of {name, source, replicas} objects")
    out: list[AdapterSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"spec.adapters[{i}]"
        if not isinstance(item, Mapping):
            raise SpecError(f"{where}: must be an object with name and source")
        unknown = sorted(set(item) - {"name", "source", "replicas"})
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where}.name: is required and must be a string")
        if len(name) > MAX_ADAPTER_NAME_LEN or not _ADAPTER_NAME.match(name):
            raise SpecError(
                f"{where}.name: {name!r} must be at most {MAX_ADAPTER_NAME_LEN} characters of "
                "lowercase letters, digits, '-', '.', '_', starting and ending with a letter "
                "or digit (it is a model name and a metrics label value)"
            )
        if name == base_model:
            raise SpecError(
                f"{where}.name: {name!r} is the base model's served name; an adapter needs its own"
            )
        if name in seen:
            raise SpecError(f"{where}.name: {name!r} is declared twice")
        seen.add(name)
        source = item.get("source")
        if not isinstance(source, str) or not source:
            raise SpecError(f"{where}.source: is required and must be a string")
        adapter_path(source, str(i))  # validates
        out.append(AdapterSpec(name=name, source=source, replicas=_replicas(item, where)))
    return tuple(out)


def _replicas(item: Mapping[str, Any], where: str) -> int | None:
    value = item.get("replicas", 1)
    if value == ALL:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f'{where}.replicas: {value!r} must be a number of workers (>= 0) or "all"')
    return value
