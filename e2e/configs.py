"""Config files the cluster's processes read: kubeconfigs and Prometheus's config (pure)."""

from __future__ import annotations

from pathlib import Path

import yaml


def kubeconfig(
    server: str,
    ca_file: Path,
    user: str,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    token: str | None = None,
    cluster_name: str = "shoal-local",
) -> str:
    """A kubeconfig with one cluster, one user (client cert or bearer token), one context."""
    creds: dict[str, str] = {}
    if cert_file and key_file:
        creds = {"client-certificate": str(cert_file), "client-key": str(key_file)}
    elif token:
        creds = {"token": token}
    else:
        raise ValueError("a kubeconfig user needs a client certificate and key, or a token")
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": cluster_name,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def prometheus_config(pod_sd_url: str, scrape_interval: str = "2s") -> str:
    """Scrape every pod annotated prometheus.io/scrape=true at its annotated port and path.

    The classic annotation convention: prometheus.io/port replaces the target's port,
    prometheus.io/path the metrics path (default /metrics). Pod labels become series labels,
    plus `namespace` and `pod`. Targets come from HTTP SD served by pod_sd.py with the
    labels of `kubernetes_sd_configs` role pod (Debian's build lacks Kubernetes SD), so the
    relabelling below is the one a real cluster uses.
    """
    doc = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "scrape_timeout": scrape_interval,
                "http_sd_configs": [{"url": pod_sd_url, "refresh_interval": scrape_interval}],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                        "action": "keep",
                        "regex": "true",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
                        "action": "replace",
                        "target_label": "__metrics_path__",
                        "regex": "(.+)",
                    },
                    {
                        "source_labels": [
                            "__address__",
                            "__meta_kubernetes_pod_annotation_prometheus_io_port",
                        ],
                        "action": "replace",
                        "regex": r"([^:]+)(?::\d+)?;(\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)
