"""`shoal dev-cluster up|down|status`: the local Kubernetes cluster from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from shoal.e2e import cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("up", "down", "status"),
        help="up: build/fetch binaries if needed, then start a fresh cluster; "
        "down: stop it; status: say what runs",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="state directory (certificates, etcd data, logs, kubeconfig); "
        "default: $SHOAL_CACHE/dev-cluster (~/.cache/shoal/dev-cluster)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    state_dir = (args.dir or cluster.default_state_dir()).resolve()
    if args.action == "up":
        try:
            state = cluster.up(state_dir)
        except (RuntimeError, TimeoutError, OSError) as e:
            print(f"dev-cluster up failed: {e}")
            return 1
        print(cluster.usage_text(state))
        return 0
    if args.action == "down":
        stopped = cluster.down(state_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing was running ({state_dir})")
        return 0
    state = cluster.ClusterState.load(state_dir)
    if state is None:
        print(f"no cluster in {state_dir}")
        return 1
    running = state.running()
    extras = [n for n in state.pids if n not in cluster.COMPONENTS]
    for name in [*cluster.COMPONENTS, *extras]:
        if name in running:
            print(f"{name:26} {'running' if running[name] else 'STOPPED'}  pid {state.pids[name]}")
        else:
            print(f"{name:26} not running")
    if running and all(running.values()):
        print()
        print(cluster.usage_text(state))
        return 0
    return 1
