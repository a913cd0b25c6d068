"""`make demo`: the happy path on the local cluster, step by step, then left running.

1. a fresh local cluster (binaries built or fetched on first use);
2. the CRDs applied; a tiny random-weight Llama written locally (nothing downloaded);
3. the operator and the gateway started as local processes next to the cluster
   (`shoal dev-cluster down` stops them with it);
4. a ModelDeployment with 2 replicas, until both workers are Ready;
5. a streamed chat completion through the gateway with the `openai` client;
6. how to go on by hand.

Run: python -m shoal.e2e.demo [--dir STATE_DIR] [--replicas N]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from shoal.e2e import cluster, procs
from shoal.e2e.binaries import cache_root

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "default"
MDEP = "demo"
MODEL = "tiny-llama"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def kubectl(state: cluster.ClusterState, *args: str, input: str | None = None) -> str:
    cmd = [state.kubectl, f"--kubeconfig={state.kubeconfig}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def wait(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # not there yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def tiny_model() -> Path:
    from shoal.runtime.testing import make_tiny_model

    path = cache_root() / "demo" / "tiny-llama"
    if not (path / "config.json").is_file():
        make_tiny_model("llama", path)
    return path


def ready_replicas(state: cluster.ClusterState) -> int:
    obj = json.loads(kubectl(state, "get", "mdep", MDEP, "-n", NAMESPACE, "-o", "json"))
    return int(obj.get("status", {}).get("readyReplicas") or 0)


def chat(gateway: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello to the shoal."}],
        max_tokens=24,
        stream=True,
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return "".join(pieces)


def run_demo(state_dir: Path, replicas: int) -> int:
    step("starting the local cluster (the first run builds Kubernetes: minutes)")
    state = cluster.up(state_dir)
    print(f"cluster up in {state.started_seconds:.1f} s")

    step("applying the CRDs and writing a tiny random-weight Llama")
    kubectl(state, "apply", "-f", str(REPO / "crds"))
    kubectl(state, "wait", "--for=condition=Established", "crd/modeldeployments.shoal.dev",
            "--timeout=60s")  # fmt: skip
    model = tiny_model()
    print(f"model: {model}")

    step("starting the operator and the gateway as local processes")
    op_port, gw_port = procs.free_port(), procs.free_port()
    shoal = [sys.executable, "-m", "shoal.cli"]
    cluster.start_extra(state, "operator", [
        *shoal, "operator", "--kubeconfig", state.kubeconfig, "--namespace", NAMESPACE,
        "--liveness", f"http://127.0.0.1:{op_port}/healthz",
    ])  # fmt: skip
    gateway = f"http://127.0.0.1:{gw_port}"
    cluster.start_extra(state, "gateway", [
        *shoal, "gateway", "--kubeconfig", state.kubeconfig, "--namespace", NAMESPACE,
        "--host", "127.0.0.1", "--port", str(gw_port),
    ])  # fmt: skip
    wait("the operator's liveness endpoint",
         lambda: procs.http_ok(f"http://127.0.0.1:{op_port}/healthz"), 120)  # fmt: skip
    wait("the gateway's /health", lambda: procs.http_ok(f"{gateway}/health"), 120)
    print(f"operator log: {state.log_path('operator')}\ngateway:      {gateway}")

    step(f"applying ModelDeployment {MDEP} ({replicas} replicas of {MODEL})")
    manifest = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": MDEP, "namespace": NAMESPACE},
        "spec": {
            "model": {"name": MODEL, "source": str(model)},
            "replicas": replicas,
            "runtime": {"engine": {"numKvBlocks": 64, "maxNumSeqs": 8}},
        },
    }
    print(kubectl(state, "apply", "-f", "-", input=json.dumps(manifest)).strip())
    t0 = time.monotonic()
    wait(f"{replicas} ready workers", lambda: ready_replicas(state) >= replicas, 600)
    print(f"{replicas} workers Ready after {time.monotonic() - t0:.0f} s")
    print(kubectl(state, "get", "mdep,pods", "-n", NAMESPACE, "-o", "wide"))

    step("a streamed chat completion through the gateway (openai client; random weights,")
    print("so the words are noise: what matters is that they stream through)")
    wait("the gateway to see the workers", lambda: _gateway_serves(gateway), 120)
    chat(gateway)

    step("the demo is left running; try it by hand")
    print(cluster.usage_text(state))
    print(
        "\n".join(
            [
                "",
                "  kubectl get mdep                                 # Model, Replicas, Ready, Phase",
                f"  kubectl scale mdep {MDEP} --replicas=3",
                "  kubectl get pods -l app.kubernetes.io/name=shoal-worker -o wide",
                f"  curl {gateway}/v1/models",
                f"  curl {gateway}/v1/chat/completions -H 'Content-Type: application/json' \\",
                f'    -d \'{{"model": "{MODEL}", "messages": '
                '[{"role": "user", "content": "hi"}], "max_tokens": 16}\'',
                f"  curl '{state.prometheus_url}/api/v1/query?query=shoal_num_requests_running'",
                f"  logs: {state.state_dir}/logs/ (operator.log, gateway.log) and "
                f"{state.state_dir}/node/pods/",
            ]
        )
    )
    return 0


def _gateway_serves(gateway: str) -> bool:
    body = procs.http_get(f"{gateway}/v1/models")
    return body is not None and MODEL in body.decode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="cluster state dir "
                   "(default: $SHOAL_CACHE/dev-cluster, the same as `shoal dev-cluster`)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    state_dir = (args.dir or cluster.default_state_dir()).resolve()
    try:
        return run_demo(state_dir, args.replicas)
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"\ndemo failed: {e}\nlogs: {state_dir}/logs; stop with: shoal dev-cluster down")
        return 1


if __name__ == "__main__":
    sys.exit(main())
