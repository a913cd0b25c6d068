"""The local cluster's fixtures for every e2e test (see shoal.e2e.fixtures)."""

import pytest

from shoal.e2e.fixtures import cluster, namespace, prepare_binaries  # noqa: F401
from tests.e2e.helpers import crds, tiny_model  # noqa: F401


def pytest_collection_finish(session: pytest.Session) -> None:
    prepare_binaries(session)  # a cold build happens here, outside any test's timeout
