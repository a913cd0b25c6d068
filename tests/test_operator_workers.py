"""Worker pod and Service manifests built from a spec."""

from shoal.operator.spec import parse_spec
from shoal.operator.workers import (
    label_value,
    selector_string,
    spec_hash,
    worker_pod,
    worker_service,
)

BASE = {"model": {"name": "org/tiny", "source": "file:///m/tiny"}, "replicas": 2}


def pod(raw=BASE):
    return worker_pod("tiny", "ns1", "uid-1", parse_spec(raw))


def test_pod_follows_the_shared_conventions():
    p = pod()
    meta = p["metadata"]
    assert meta["generateName"] == "tiny-"
    assert meta["namespace"] == "ns1"
    labels = meta["labels"]
    assert labels["app.kubernetes.io/name"] == "shoal-worker"
    assert labels["app.kubernetes.io/managed-by"] == "shoal-operator"
    assert labels["shoal.dev/deployment"] == "tiny"
    assert labels["shoal.dev/model"] == "org-tiny"  # '/' is not allowed in label values
    assert labels["shoal.dev/spec-hash"] == spec_hash(parse_spec(BASE))
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["prometheus.io/port"] == "8000"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    assert meta["annotations"]["shoal.dev/served-model-name"] == "org/tiny"
    (owner,) = meta["ownerReferences"]
    assert owner["kind"] == "ModelDeployment" and owner["uid"] == "uid-1" and owner["controller"]

    (c,) = p["spec"]["containers"]
    assert c["name"] == "worker"
    assert c["command"] == ["shoal", "serve"]
    assert c["args"] == [
        "--model", "/m/tiny", "--served-model-name", "org/tiny",
        "--host", "$(POD_IP)", "--port", "8000", "--grpc-port", "50051", "--pool", "tiny",
    ]  # fmt: skip
    assert c["env"][0] == {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},  # migration and control
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["initialDelaySeconds"] >= 60
    assert "resources" not in c


def test_engine_settings_become_flags_and_extras_follow():
    raw = {
        "model": {"name": "m", "source": "/m", "dtype": "bfloat16", "maxModelLen": 512},
        "runtime": {
            "command": ["python", "-m", "shoal.runtime.cli"],
            "args": ["--extra"],
            "engine": {"maxNumSeqs": 4, "numKvBlocks": 64, "enablePrefixCaching": False},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "env": [{"name": "A", "value": "1"}],
        },
    }
    c = pod(raw)["spec"]["containers"][0]
    args = c["args"]
    assert c["command"] == ["python", "-m", "shoal.runtime.cli"]
    for flag, value in [("--dtype", "bfloat16"), ("--max-model-len", "512"),
                        ("--max-num-seqs", "4"), ("--num-kv-blocks", "64")]:  # fmt: skip
        assert args[args.index(flag) + 1] == value
    assert "--no-prefix-caching" in args
    assert args[-1] == "--extra"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "A", "value": "1"} in c["env"]


def test_spec_hash_ignores_replicas_but_not_the_model():
    h = spec_hash(parse_spec(BASE))
    assert spec_hash(parse_spec({**BASE, "replicas": 5})) == h
    other = {**BASE, "model": {**BASE["model"], "dtype": "float32"}}
    assert spec_hash(parse_spec(other)) != h
    assert spec_hash(parse_spec({**BASE, "runtime": {"args": ["--x"]}})) != h


def test_headless_service_selects_the_pool():
    s = worker_service("tiny", "ns1", "uid-1")
    assert s["metadata"]["name"] == "tiny-workers"
    assert s["spec"]["clusterIP"] == "None"
    assert s["spec"]["selector"] == {
        "app.kubernetes.io/name": "shoal-worker",
        "shoal.dev/deployment": "tiny",
    }
    assert (
        selector_string("tiny") == "app.kubernetes.io/name=shoal-worker,shoal.dev/deployment=tiny"
    )


def test_label_value_is_always_valid():
    assert label_value("a/b c") == "a-b-c"
    assert len(label_value("x" * 100)) == 63
    assert label_value("///") == "unnamed"


def test_worker_args_parse_with_the_real_shoal_serve_cli():
    """The contract with the runtime: every flag the operator emits is one `shoal serve` has."""
    import argparse

    from shoal.runtime import cli as serve_cli

    raw = {
        "model": {"name": "m", "source": "/m", "dtype": "float32", "maxModelLen": 256},
        "runtime": {
            "engine": {
                "maxNumSeqs": 4,
                "maxNumBatchedTokens": 128,
                "blockSize": 16,
                "numKvBlocks": 64,
                "enablePrefixCaching": False,
            }
        },
    }
    args = pod(raw)["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    ns = parser.parse_args([a.replace("$(POD_IP)", "127.0.0.5") for a in args])
    assert (ns.model, ns.served_model_name, ns.host, ns.port) == ("/m", "m", "127.0.0.5", 8000)
    assert (ns.max_num_seqs, ns.num_kv_blocks, ns.no_prefix_caching) == (4, 64, True)
    assert ns.pool == "tiny"
