"""The chart ships the repository's CRDs unchanged (Helm installs them from crds/)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CRDS = sorted((ROOT / "crds").glob("*.yaml"))


def test_repository_has_crds():
    assert any(p.name == "modeldeployment.yaml" for p in CRDS)


@pytest.mark.parametrize("crd", CRDS, ids=lambda p: p.name)
def test_chart_crd_is_identical_to_the_repository_crd(crd: Path):
    copy = ROOT / "charts" / "shoal" / "crds" / crd.name
    assert copy.is_file(), f"{copy} missing: cp crds/{crd.name} charts/shoal/crds/"
    assert copy.read_bytes() == crd.read_bytes(), (
        f"charts/shoal/crds/{crd.name} differs from crds/{crd.name}: "
        f"cp crds/{crd.name} charts/shoal/crds/"
    )


def test_chart_has_no_stale_crd():
    names = {p.name for p in CRDS}
    extra = [p.name for p in (ROOT / "charts/shoal/crds").glob("*.yaml") if p.name not in names]
    assert not extra, f"charts/shoal/crds/ has CRDs the repository no longer has: {extra}"
