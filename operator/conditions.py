"""Status conditions: Kubernetes' shape, with lastTransitionTime kept while status holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The types reconcile owns. Other parts of the operator (adapter placement, autoscaler,
# drain) add their own types with `set_condition`; merging keeps those untouched.
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None, new: Sequence[Condition], now: str
) -> list[dict[str, Any]]:
    """API-shaped conditions; a condition whose status did not flip keeps its transition time.

    Conditions of types not in `new` are kept as they were: another component owns them.
    """
    before = {c.get("type"): c for c in previous or []}
    given = {c.type for c in new}
    out = []
    for c in new:
        status = "True" if c.status else "False"
        old = before.get(c.type) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        out.append(
            {
                "type": c.type,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since or now,
            }
        )
    out += [dict(c) for c in previous or [] if c.get("type") not in given]
    return out


def set_condition(
    previous: Sequence[Mapping[str, Any]] | None, condition: Condition, now: str
) -> list[dict[str, Any]]:
    """The conditions with one type set (for a component that owns just that type)."""
    return merge_conditions(previous, [condition], now)


def find(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    return next((c for c in conditions or [] if c.get("type") == type_), {})
