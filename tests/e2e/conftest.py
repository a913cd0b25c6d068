"""The local cluster's fixtures for every e2e test (see shoal.e2e.fixtures)."""

from shoal.e2e.fixtures import cluster, namespace  # noqa: F401
