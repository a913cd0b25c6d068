"""`shoal operator`: run the ModelDeployment operator (kopf, in this process).

Two or more replicas are safe: they meet in a kopf peering object (`shoal-operator`) and only
the one with the highest priority acts; the others pause until its keep-alive lapses. Each
replica takes a random priority unless given one, so exactly one is active without any
configuration (kopf pauses *all* replicas that share a priority).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re

DEFAULT_PEERING = "shoal-operator"
log = logging.getLogger("shoal.operator")


class QuietRoutine(logging.Filter):
    """Drop kopf's "succeeded" line for the periodic resync and pod events: they fire every
    few seconds per pool and say nothing a person needs; what they change is logged."""

    ROUTINE = re.compile(
        r"^(Timer|Handler) 'on_(timer|pod_event)' succeeded\.$|^Timer 'autoscale[^']*' succeeded\.$"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.ROUTINE.match(record.getMessage())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  shoal operator --all-namespaces --liveness http://127.0.0.1:8080/healthz\n"
        "  shoal operator --namespace demo --standalone\n"
        "Before the first run: kubectl apply -f crds/ (ModelDeployment and kopf peering CRDs)."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="watch only this namespace (repeat for several)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve the operator's Prometheus metrics (shoal_operator_*) here, e.g. 0.0.0.0:9090",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run without peering (only safe when exactly one operator runs)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority; the highest live one acts (default: random per process)",
    )
    parser.add_argument(
        "--peering",
        default=DEFAULT_PEERING,
        metavar="NAME",
        help=f"name of the kopf peering object (default: {DEFAULT_PEERING})",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig to use (default: in-cluster config, else $KUBECONFIG or ~/.kube/config)",
    )
    parser.add_argument(
        "--no-check-model-source",
        dest="check_model_source",
        action="store_false",
        help="do not check that spec.model.source exists on this host (use when the operator "
        "does not run on the nodes' filesystem)",
    )
    parser.add_argument(
        "--prometheus-url",
        metavar="URL",
        default=os.environ.get("SHOAL_PROMETHEUS_URL") or None,
        help="Prometheus the autoscaler queries (default: $SHOAL_PROMETHEUS_URL); without it "
        "an autoscaled pool holds its replicas and says so in a condition",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="kopf's detailed logs")


def run(args: argparse.Namespace) -> int:
    # Imported here so `shoal operator --help` stays fast.
    import kopf
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    from shoal.operator import handlers  # noqa: F401  (registers the kopf handlers)
    from shoal.operator.cluster import Cluster, load_kube_config

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        for h in logging.getLogger().handlers:
            h.addFilter(QuietRoutine())
    kubeconfig = os.path.abspath(args.kubeconfig) if args.kubeconfig else None
    try:
        load_kube_config(kubeconfig)
    except (ConfigException, OSError) as e:
        log.error("no Kubernetes configuration: %s (pass --kubeconfig or set KUBECONFIG)", e)
        return 2

    namespaces = list(args.namespace or [])
    cluster = Cluster()
    from shoal.operator.autoscaler import Autoscaler
    from shoal.operator.prometheus import Prometheus

    prometheus = Prometheus(args.prometheus_url) if args.prometheus_url else None
    autoscaler = Autoscaler(cluster, prometheus)
    if prometheus is None:
        log.info("no --prometheus-url: autoscaled pools hold their replicas")
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    if not args.standalone:
        try:
            for ns in namespaces or [None]:
                cluster.ensure_peering(args.peering, ns)
        except ApiException as e:
            if e.status == 404:
                log.error(
                    "the kopf peering CRDs are missing: kubectl apply -f crds/kopf-peering.yaml "
                    "(or run one operator with --standalone)"
                )
            else:
                log.error("cannot set up peering %r: %s %s", args.peering, e.status, e.reason)
            return 2
        except HTTPError as e:
            log.error("cannot reach the Kubernetes API server: %s", e)
            return 2
        log.info(
            "peering %r with priority %d: the highest live priority acts", args.peering, priority
        )

    if args.metrics:
        from shoal.operator import metrics

        try:
            metrics.serve(args.metrics)
        except (OSError, ValueError) as e:
            log.error("cannot serve metrics on %r: %s", args.metrics, e)
            return 2
        log.info("metrics on http://%s/metrics", args.metrics)

    scope = ", ".join(namespaces) if namespaces else "all namespaces"
    log.info("Shoal operator starting: watching ModelDeployments in %s", scope)
    kopf.run(
        standalone=args.standalone,
        priority=None if args.standalone else priority,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness,
        clusterwide=not namespaces,
        namespaces=namespaces,
        memo=kopf.Memo(
            cluster=cluster,
            check_source=args.check_model_source,
            kubeconfig=kubeconfig,
            autoscaler=autoscaler,
        ),
    )
    return 0
