"""ModelDeployment spec parsing: what is accepted, and what each rejection says."""

import pytest

from shoal.operator.spec import (
    SpecError,
    parse_spec,
    source_path,
    unimplemented_features,
    validate_name,
)


def minimal(**extra):
    return {"model": {"name": "tiny", "source": "/models/tiny"}, **extra}


def test_minimal_spec_gets_defaults():
    spec = parse_spec(minimal())
    assert spec.replicas == 1
    assert spec.model.dtype == "auto"
    assert spec.model.path == "/models/tiny"
    assert spec.runtime.command is None
    assert spec.runtime.engine.max_num_seqs is None


def test_full_spec_is_parsed():
    spec = parse_spec(
        {
            "model": {
                "name": "org/llama",
                "source": "file:///m/llama",
                "dtype": "bfloat16",
                "maxModelLen": 2048,
            },
            "replicas": 3,
            "runtime": {
                "image": "shoal:1",
                "command": ["python", "-m", "shoal.runtime.cli"],
                "args": ["--foo"],
                "engine": {"maxNumSeqs": 8, "blockSize": 16, "enablePrefixCaching": False},
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi", "cpu": "500m"}},
                "env": [{"name": "A", "value": "1"}],
            },
        }
    )
    assert spec.model.path == "/m/llama"
    assert spec.replicas == 3
    assert spec.runtime.command == ("python", "-m", "shoal.runtime.cli")
    assert spec.runtime.engine.block_size == 16
    assert spec.runtime.engine.enable_prefix_caching is False
    assert spec.runtime.resources["limits"]["memory"] == "16Gi"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({}, "spec.model: is required"),
        ({"model": {"source": "/m"}}, "spec.model.name: is required"),
        ({"model": {"name": "x"}}, "spec.model.source: is required"),
        (minimal(replicas=-1), "spec.replicas: must be >= 0"),
        (minimal(replicas="2"), "spec.replicas: must be an integer"),
        (minimal(replicas=True), "spec.replicas: must be an integer"),
        ({"model": {"name": "x", "source": "/m", "dtype": "int4"}}, "spec.model.dtype"),
        ({"model": {"name": "x", "source": "relative/dir"}}, "absolute path"),
        ({"model": {"name": "x", "source": "s3://bucket/m"}}, "scheme 's3' is not supported"),
        (minimal(runtime={"engine": {"maxNumSeqs": 0}}), "spec.runtime.engine.maxNumSeqs"),
        (minimal(runtime={"command": []}), "spec.runtime.command: must not be empty"),
        (minimal(runtime={"args": "--x"}), "spec.runtime.args: must be a list of strings"),
        (minimal(runtime={"resources": {"gpus": 1}}), "unknown key 'gpus'"),
        (minimal(runtime={"resources": {"limits": {"cpu": "lots"}}}), "'lots' is not a quantity"),
        (minimal(runtime={"resources": {"limits": {"cpu": -1}}}), "-1 is not a quantity"),
        (minimal(runtime={"env": [{"value": "1"}]}), "spec.runtime.env[0]"),
        (minimal(runtime={"env": [{"name": "POD_IP", "value": "x"}]}), "POD_IP is set"),
        (minimal(runtime="big"), "spec.runtime: must be an object"),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(spec, words):
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert words in str(err.value)


def test_file_uri_and_plain_paths():
    assert source_path("file:///a/b") == "/a/b"
    assert source_path("/a/b") == "/a/b"


@pytest.mark.parametrize("name", ["Tiny", "1tiny", "tiny_model", "a" * 56, "tiny-"])
def test_names_that_cannot_name_pods_and_services_are_rejected(name):
    with pytest.raises(SpecError, match="metadata.name"):
        validate_name(name)


def test_good_name_passes():
    validate_name("tiny-llama-2")


def test_reserved_fields_count_only_when_non_empty():
    assert unimplemented_features(minimal(adapters=[], autoscaling={}, moe=None)) == []
    spec = minimal(moe={"experts": 2}, migration={"drainOnScaleIn": True})
    assert unimplemented_features(spec) == ["moe"]
