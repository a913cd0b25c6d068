"""Pod discovery for Prometheus over HTTP SD, in the shape of `kubernetes_sd_configs`.

Why this exists: Debian's `prometheus` binary (2.42.0+ds) is built without the Kubernetes
service discovery (only file, http, dns and some clouds). This small process reads the pods
from the apiserver on every request and serves them as Prometheus HTTP SD targets carrying
the same `__meta_kubernetes_*` labels that `kubernetes_sd_configs` with `role: pod`
produces, so the scrape config's relabelling (prometheus.io/scrape, /port, /path
annotations) is exactly the one a real cluster would use.

Run: python -m shoal.e2e.pod_sd --kubeconfig FILE --port PORT   (serves GET /targets)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client, config

log = logging.getLogger("shoal.e2e.pod_sd")


def sanitize(name: str) -> str:
    """Prometheus's label-name sanitising: every invalid character becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_labels(pod: dict[str, Any]) -> dict[str, str]:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    labels = {
        "__meta_kubernetes_namespace": meta.get("namespace", ""),
        "__meta_kubernetes_pod_name": meta.get("name", ""),
        "__meta_kubernetes_pod_ip": status.get("podIP", ""),
        "__meta_kubernetes_pod_ready": conds.get("Ready", "unknown").lower(),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
        "__meta_kubernetes_pod_uid": meta.get("uid", ""),
    }
    for kind in ("label", "annotation"):
        for k, v in (meta.get(f"{kind}s") or {}).items():
            labels[f"__meta_kubernetes_pod_{kind}_{sanitize(k)}"] = v
            labels[f"__meta_kubernetes_pod_{kind}present_{sanitize(k)}"] = "true"
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            labels["__meta_kubernetes_pod_controller_kind"] = owner.get("kind", "")
            labels["__meta_kubernetes_pod_controller_name"] = owner.get("name", "")
    return labels


def targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One target per container port (per container without ports: the bare pod IP),
    for every pod that has an IP, as `role: pod` does."""
    groups = []
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            continue
        base = pod_labels(pod)
        for c in pod.get("spec", {}).get("containers") or []:
            cl = {**base, "__meta_kubernetes_pod_container_name": c["name"]}
            ports = c.get("ports") or []
            if not ports:
                groups.append({"targets": [ip], "labels": cl})
            for p in ports:
                groups.append(
                    {
                        "targets": [f"{ip}:{p['containerPort']}"],
                        "labels": {
                            **cl,
                            "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                            "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                            "__meta_kubernetes_pod_container_port_protocol": p.get(
                                "protocol", "TCP"
                            ),
                        },
                    }
                )
    return groups


def serve(api: client.ApiClient, port: int) -> None:
    core = client.CoreV1Api(api)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/targets":
                self.send_error(404)
                return
            try:
                pods = api.sanitize_for_serialization(core.list_pod_for_all_namespaces().items)
                body = json.dumps(targets(pods)).encode()
            except Exception as e:  # Prometheus keeps the last good targets on errors
                log.warning("listing pods failed: %s", e)
                self.send_error(502, str(e))
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    log.info("serving pod targets on http://127.0.0.1:%d/targets", port)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(config.new_client_from_config(config_file=args.kubeconfig), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
