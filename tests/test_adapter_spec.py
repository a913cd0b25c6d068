"""spec.adapters: parsed into AdapterSpec, bad input named by field, never rolls workers."""

from __future__ import annotations

import pytest

from shoal.operator.adapters_spec import AdapterSpec, parse_adapters
from shoal.operator.reconcile import reconcile
from shoal.operator.spec import SpecError, parse_spec
from shoal.operator.workers import spec_hash


def spec(**extra):
    return {"model": {"name": "base", "source": "/models/base"}, **extra}


def test_adapters_parse_with_replicas_number_all_and_default():
    got = parse_adapters(
        [
            {"name": "sql", "source": "/a/sql", "replicas": 2},
            {"name": "chat.v2", "source": "file:///a/chat", "replicas": "all"},
            {"name": "x_1", "source": "/a/x"},
        ],
        "base",
    )
    assert got == (
        AdapterSpec("sql", "/a/sql", 2),
        AdapterSpec("chat.v2", "file:///a/chat", None),
        AdapterSpec("x_1", "/a/x", 1),
    )
    assert got[1].path == "/a/chat"
    assert [a.wanted(3) for a in got] == [2, 3, 1]
    assert got[0].wanted(1) == 1  # clamped to the workers there are


@pytest.mark.parametrize(
    "adapters, match",
    [
        ({"name": "a"}, r"spec.adapters: must be a list"),
        ([{"source": "/a"}], r"spec.adapters\[0\].name: is required"),
        ([{"name": "Big", "source": "/a"}], r"spec.adapters\[0\].name: 'Big'"),
        ([{"name": "a/b", "source": "/a"}], r"spec.adapters\[0\].name"),
        ([{"name": "a" * 64, "source": "/a"}], r"at most 63"),
        ([{"name": "base", "source": "/a"}], r"base model's served name"),
        (
            [{"name": "a", "source": "/a"}, {"name": "a", "source": "/b"}],
            r"spec.adapters\[1\].name: 'a' is declared twice",
        ),
        ([{"name": "a"}], r"spec.adapters\[0\].source: is required"),
        ([{"name": "a", "source": "rel/dir"}], r"absolute path"),
        ([{"name": "a", "source": "s3://b/a"}], r"scheme 's3'"),
        ([{"name": "a", "source": "/a", "replicas": -1}], r"replicas: -1"),
        ([{"name": "a", "source": "/a", "replicas": "most"}], r'or "all"'),
        ([{"name": "a", "source": "/a", "replicas": True}], r"replicas"),
        ([{"name": "a", "source": "/a", "rank": 8}], r"unknown field\(s\) rank"),
    ],
)
def test_bad_adapters_are_rejected_with_the_field_named(adapters, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(spec(adapters=adapters))


def test_adapters_do_not_change_the_spec_hash():
    plain = parse_spec(spec())
    with_adapters = parse_spec(spec(adapters=[{"name": "a", "source": "/a", "replicas": 2}]))
    assert with_adapters.adapters and spec_hash(plain) == spec_hash(with_adapters)


def test_reconcile_serves_a_pool_with_adapters_and_rejects_a_bad_list():
    mdep = {
        "metadata": {"name": "pool", "namespace": "ns", "uid": "u"},
        "spec": spec(replicas=1, adapters=[{"name": "a", "source": "/a"}]),
    }
    plan = reconcile(mdep, [], "2026-01-01T00:00:00Z")
    assert len(plan.create) == 1  # adapters are no longer "not implemented"
    mdep["spec"]["adapters"].append({"name": "a", "source": "/b"})
    plan = reconcile(mdep, [], "2026-01-01T00:00:00Z")
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], plan.create) == ("InvalidSpec", ())
    assert "declared twice" in ready["message"]


def test_the_lora_example_manifest_parses():
    import yaml

    from tests.e2e.helpers import REPO

    manifest = yaml.safe_load((REPO / "examples" / "lora-modeldeployment.yaml").read_text())
    adapters = parse_spec(manifest["spec"]).adapters
    assert [(a.name, a.replicas) for a in adapters] == [
        ("sql", 1),
        ("chat", 2),
        ("summarize", None),
    ]
