"""Session fixtures shared by the fast tier: tiny random-weight models.

``tiny_model_factory(arch, **kwargs)`` builds a model directory once per test session.
With $SHOAL_CACHE set (``make`` sets it) the directories are also kept across sessions,
keyed by the factory's own source and the library versions, so a changed factory never
serves a stale model. Directories are built under a temporary name and renamed into
place, so concurrent sessions never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

FACTORY_SOURCES = ("factory.py", "tokenizer.py")


def _factory_fingerprint() -> str:
    import tokenizers
    import torch
    import transformers

    import shoal.runtime.testing as testing

    h = hashlib.sha256()
    folder = Path(testing.__file__).parent
    for name in FACTORY_SOURCES:
        h.update((folder / name).read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    from shoal.runtime.testing import make_tiny_model

    cache = os.environ.get("SHOAL_CACHE")
    root = Path(cache) / "tiny-models" if cache else tmp_path_factory.getbasetemp() / "tiny-models"
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = _factory_fingerprint()
    built: dict[str, Path] = {}

    def make(arch: str, **kwargs) -> Path:
        spec = json.dumps({"arch": arch, **kwargs, "v": fingerprint}, sort_keys=True)
        key = f"{arch}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
        if key in built:
            return built[key]
        final = root / key
        if not (final / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            make_tiny_model(arch, staging, **kwargs)
            try:
                staging.rename(final)
            except OSError:  # another session finished first: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
        built[key] = final
        return final

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    """The default tiny Llama (float32), for tests that need any model."""
    return tiny_model_factory("llama")
