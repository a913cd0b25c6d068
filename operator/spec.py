"""The ModelDeployment spec: parsed into plain frozen objects, validated with clear messages.

The CRD's OpenAPI schema already rejects most bad input at the API server; this module is the
second line: it catches what a v1 schema on Kubernetes 1.20 cannot say (no CEL), and it lets
the operator turn a bad spec into a condition instead of a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.operator.adapters_spec import AdapterSpec
    from shoal.operator.autoscaling_spec import AutoscalingSpec
    from shoal.operator.migration_spec import MigrationSpec

GROUP = "shoal.dev"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Reserved for later issues; present and non-empty means "not implemented yet".
RESERVED_FIELDS = ("moe",)
# Worker pods are `<name>-xxxxx` and the Service is `<name>-workers`; both must stay valid
# DNS-1035 labels (63 chars), and the name is also a label value (63 chars).
MAX_NAME_LEN = 55
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# Kubernetes resource quantities ("2", "500m", "16Gi", "1e3"); the API server would reject
# others only when the pod is created, so catch them here with the field named.
_QUANTITY = re.compile(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]i?)?$")


class SpecError(ValueError):
    """A spec the operator cannot serve; the message names the field and says what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    dtype: str = "auto"
    max_model_len: int | None = None

    @property
    def path(self) -> str:
        """The checkpoint directory on the node (a `file://` URI is unwrapped)."""
        return source_path(self.source)


@dataclass(frozen=True)
class EngineSpec:
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool | None = None


@dataclass(frozen=True)
class RuntimeSpec:
    image: str | None = None
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    engine: EngineSpec = field(default_factory=EngineSpec)
    # Kept as the API's own shapes (camelCase dicts): they go into the pod verbatim.
    resources: Mapping[str, Any] = field(default_factory=dict)
    env: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class DeploymentSpec:
    model: ModelSpec
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    replicas: int = 1
    # Served over the base weights; never part of spec_hash (adapters load at run time).
    adapters: tuple[AdapterSpec, ...] = ()
    # Drain and rebalance settings; never part of spec_hash (they do not shape a pod).
    migration: MigrationSpec | None = None
    # None: no autoscaling (spec.replicas is the user's). Never part of spec_hash.
    autoscaling: AutoscalingSpec | None = None


def source_path(source: str) -> str:
    """A model source as a local path: plain absolute paths and `file://` URIs only."""
    if source.startswith("file://"):
        path = source[len("file://") :]
    elif "://" in source:
        scheme = source.split("://", 1)[0]
        raise SpecError(
            f"spec.model.source: scheme {scheme!r} is not supported; "
            "give a path on the node or a file:// URI"
        )
    else:
        path = source
    if not path.startswith("/"):
        raise SpecError(f"spec.model.source: {source!r} must be an absolute path on the node")
    return path


def validate_name(name: str) -> None:
    if len(name) > MAX_NAME_LEN or not _DNS1035.match(name):
        raise SpecError(
            f"metadata.name: {name!r} must be a DNS-1035 label of at most {MAX_NAME_LEN} "
            "characters (lowercase letters, digits, '-', starting with a letter), because "
            "worker pods and the Service are named after it"
        )


def unimplemented_features(spec: Mapping[str, Any]) -> list[str]:
    """Reserved fields that are set to something: later issues implement them."""
    return [f for f in RESERVED_FIELDS if spec.get(f) not in (None, [], {}, "")]


def parse_spec(spec: Mapping[str, Any]) -> DeploymentSpec:
    """Parse and validate a ModelDeployment's `.spec`; raise SpecError with a clear message."""
    if not isinstance(spec, Mapping):
        raise SpecError("spec: must be an object")
    model = _parse_model(_obj(spec, "model", required=True))
    runtime = _parse_runtime(_obj(spec, "runtime"))
    replicas = _int(spec, "replicas", "spec", minimum=0, default=1)
    # Imported here: adapters_spec raises this module's SpecError (a cycle at import time).
    from shoal.operator.adapters_spec import parse_adapters

    adapters = parse_adapters(spec.get("adapters"), model.name)
    from shoal.operator.migration_spec import parse_migration

    migration = parse_migration(spec)
    autoscaling = _parse_autoscaling(spec.get("autoscaling"))
    return DeploymentSpec(
        model=model,
        runtime=runtime,
        replicas=replicas,
        adapters=adapters,
        migration=migration,
        autoscaling=autoscaling,
    )


def _parse_autoscaling(raw: Any) -> AutoscalingSpec | None:
    # Imported here: autoscaling_spec must not import this module back at import time.
    from shoal.operator.autoscaling_spec import AutoscalingError, parse_autoscaling

    try:
        return parse_autoscaling(raw)
    except AutoscalingError as e:
        raise SpecError(str(e)) from e


def _parse_model(m: Mapping[str, Any]) -> ModelSpec:
    name = _str(m, "name", "spec.model", required=True)
    source = _str(m, "source", "spec.model", required=True)
    source_path(source)  # validates
    dtype = _str(m, "dtype", "spec.model") or "auto"
    if dtype not in DTYPES:
        raise SpecError(f"spec.model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    max_len = _int(m, "maxModelLen", "spec.model", minimum=1)
    return ModelSpec(name=name, source=source, dtype=dtype, max_model_len=max_len)


def _parse_runtime(r: Mapping[str, Any]) -> RuntimeSpec:
    where = "spec.runtime"
    command = r.get("command")
    if command is not None:
        command = tuple(_str_list(command, f"{where}.command"))
        if not command:
            raise SpecError(f"{where}.command: must not be empty when given")
    args = tuple(_str_list(r.get("args") or [], f"{where}.args"))
    e = _obj(r, "engine", where=where)
    ew = f"{where}.engine"
    engine = EngineSpec(
        max_num_seqs=_int(e, "maxNumSeqs", ew, minimum=1),
        max_num_batched_tokens=_int(e, "maxNumBatchedTokens", ew, minimum=1),
        block_size=_int(e, "blockSize", ew, minimum=1),
        num_kv_blocks=_int(e, "numKvBlocks", ew, minimum=1),
        enable_prefix_caching=_bool(e, "enablePrefixCaching", ew),
    )
    resources = _obj(r, "resources", where=where)
    for key, amounts in resources.items():
        if key not in ("limits", "requests"):
            raise SpecError(f"{where}.resources: unknown key {key!r} (use limits, requests)")
        if not isinstance(amounts, Mapping):
            raise SpecError(f"{where}.resources.{key}: must map resource names to quantities")
        for res, qty in amounts.items():
            if isinstance(qty, bool) or not _QUANTITY.match(str(qty)):
                raise SpecError(
                    f"{where}.resources.{key}[{res!r}]: {qty!r} is not a quantity "
                    "(e.g. 2, 500m, 16Gi)"
                )
    env = r.get("env") or []
    if not isinstance(env, list):
        raise SpecError(f"{where}.env: must be a list of {{name, value}} objects")
    for i, item in enumerate(env):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise SpecError(f"{where}.env[{i}]: must be an object with a string 'name'")
        if not _ENV_NAME.match(item["name"]):
            raise SpecError(f"{where}.env[{i}].name: {item['name']!r} is not a valid name")
        if item["name"] == "POD_IP":
            raise SpecError(f"{where}.env[{i}]: POD_IP is set by the operator")
    image = _str(r, "image", where)
    return RuntimeSpec(
        image=image or None,
        command=command,
        args=args,
        engine=engine,
        resources=dict(resources),
        env=tuple(dict(x) for x in env),
    )


# -- small typed getters: each error names the full field path ---------------------------


def _obj(d: Mapping[str, Any], key: str, where: str = "spec", required: bool = False) -> Mapping:
    value = d.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}.{key}: is required")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}.{key}: must be an object")
    return value


def _str(d: Mapping[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = d.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"{where}.{key}: is required")
        return None
    if not isinstance(value, str):
        raise SpecError(f"{where}.{key}: must be a string")
    return value


def _int(
    d: Mapping[str, Any], key: str, where: str, minimum: int, default: int | None = None
) -> int | None:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}.{key}: must be an integer")
    if value < minimum:
        raise SpecError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def _bool(d: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise SpecError(f"{where}.{key}: must be true or false")
    return value


def _str_list(value: Any, where: str) -> Sequence[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise SpecError(f"{where}: must be a list of strings")
    return value
