"""``shoal gateway``: one OpenAI-compatible endpoint for every model in the cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DESCRIPTION = """\
One OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models) for
every served model. Each request goes to the least-loaded ready worker of the pool named
by its `model`; a worker that fails before its first byte is replaced by another.

Workers are found either in a cluster (watching ModelDeployments and worker pods through
the Kubernetes API) or from a fixed list:

  shoal gateway --kubeconfig ~/.kube/config --namespace demo
  shoal gateway --static tiny=http://127.0.0.1:8001,http://127.0.0.1:8002
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    found = parser.add_argument_group("where workers are found (static, or Kubernetes)")
    found.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="MODEL=URL[,URL...]",
        help="serve MODEL from these worker base URLs, no cluster needed (repeatable)",
    )
    found.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else the in-cluster service account "
        "when in a pod, else ~/.kube/config)",
    )
    found.add_argument(
        "--namespace",
        help="watch this namespace only (default: all namespaces)",
    )
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--max-attempts", type=int, default=3, help="workers tried per request (default 3)"
    )
    tuning.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between reads of each worker's /metrics (default 1)",
    )
    tuning.add_argument(
        "--upstream-timeout",
        type=float,
        default=600.0,
        help="seconds a worker may stay silent mid-response (default 600)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def _kube_api_client(kubeconfig: str | None):  # noqa: ANN202 - kubernetes is untyped
    from kubernetes import client, config

    # An explicit kubeconfig (flag, then $KUBECONFIG) wins over the in-cluster account: on
    # the local cluster the node agent runs pods as local processes with no token mounted.
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    return config.new_client_from_config()


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from shoal.runtime.gateway.app import GatewayConfig, create_app
    from shoal.runtime.gateway.discovery import KubernetesDiscovery, StaticDiscovery
    from shoal.runtime.gateway.pools import parse_static

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":  # one line per proxied request and scrape is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.max_attempts < 1 or args.scrape_interval <= 0 or args.upstream_timeout <= 0:
        print(
            "shoal gateway: --max-attempts must be >= 1, --scrape-interval and "
            "--upstream-timeout > 0",
            file=sys.stderr,
        )
        return 2
    if args.static and (args.kubeconfig or args.namespace):
        print(
            "shoal gateway: --static cannot be combined with --kubeconfig/--namespace",
            file=sys.stderr,
        )
        return 2
    if args.static:
        try:
            discovery = StaticDiscovery(parse_static(args.static))
        except ValueError as exc:
            print(f"shoal gateway: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            api_client = _kube_api_client(args.kubeconfig)
        except Exception as exc:  # missing file, bad YAML, no context: say so, no traceback
            print(
                f"shoal gateway: cannot load Kubernetes credentials ({exc}). Pass "
                "--kubeconfig, run inside a pod, or use --static MODEL=URL.",
                file=sys.stderr,
            )
            return 2
        discovery = KubernetesDiscovery(api_client, args.namespace)
    config = GatewayConfig(
        max_attempts=args.max_attempts,
        scrape_interval_s=args.scrape_interval,
        read_timeout_s=args.upstream_timeout,
    )
    app = create_app(discovery, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
