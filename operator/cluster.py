"""The operator's I/O edge: the few Kubernetes API calls it makes, as plain dicts.

Everything here is a thin wrapper over the `kubernetes` client; nothing decides. Objects come
back in the API's own camelCase shape so the pure modules read them the same way whether
they came from here, from kopf, or from a test.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from shoal.operator.spec import GROUP, PLURAL, VERSION
from shoal.operator.workers import pods_selector

log = logging.getLogger("shoal.operator")
COMPONENT = "shoal-operator"


def load_kube_config(kubeconfig: str | None = None) -> None:
    """In-cluster config inside a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
        return
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cluster:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    # -- ModelDeployments ---------------------------------------------------------------

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}
            )
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report on
                raise

    # -- pods and services --------------------------------------------------------------

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=pods_selector(name))
        return [self._plain(p) for p in pods.items]

    def create_pod(self, manifest: Mapping[str, Any]) -> str:
        namespace = manifest["metadata"]["namespace"]
        pod = self.core.create_namespaced_pod(namespace, dict(manifest))
        return pod.metadata.name

    def delete_pod(self, namespace: str, name: str) -> bool:
        """Ask for a graceful delete; False if it was already gone."""
        try:
            _drain(self.core.delete_namespaced_pod(name, namespace, _preload_content=False))
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def ensure_service(self, manifest: Mapping[str, Any]) -> bool:
        """Create the Service if it is missing; True when it was created now."""
        meta = manifest["metadata"]
        try:
            self.core.read_namespaced_service(meta["name"], meta["namespace"])
            return False
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            self.core.create_namespaced_service(meta["namespace"], dict(manifest))
            return True
        except ApiException as e:
            if e.status == 409:  # another replica or a race: it exists, which is the goal
                return False
            raise

    def delete_service(self, namespace: str, name: str) -> None:
        try:
            # Not deserialized: a 1.20 API server answers a Status here, which this client
            # version refuses to parse as a Service.
            _drain(self.core.delete_namespaced_service(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status != 404:
                raise

    # -- events -------------------------------------------------------------------------

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `obj` (what `kubectl describe` shows). Never fails the caller."""
        meta = obj.get("metadata") or {}
        stamp = now()
        body = {
            "metadata": {
                "generateName": f"{meta.get('name', 'shoal')}.",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta.get("namespace"), body)
        except ApiException as e:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), e.reason)

    # -- kopf peering -------------------------------------------------------------------

    def ensure_peering(self, name: str, namespace: str | None) -> None:
        """Create the kopf peering object (cluster-wide when namespace is None) if missing."""
        body = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
        try:
            if namespace is None:
                body["kind"] = "ClusterKopfPeering"
                self.custom.create_cluster_custom_object(
                    "kopf.dev", "v1", "clusterkopfpeerings", body
                )
            else:
                body["kind"] = "KopfPeering"
                self.custom.create_namespaced_custom_object(
                    "kopf.dev", "v1", namespace, "kopfpeerings", body
                )
        except ApiException as e:
            if e.status != 409:
                raise


def _drain(response: Any) -> None:
    """Read and release a raw (not deserialized) response so its connection is reused."""
    for method in ("read", "release_conn"):
        fn = getattr(response, method, None)
        if callable(fn):
            fn()
