"""Where a run's numbers came from: the project's commit (and whether its tree had changes), the
versions of Python and torch, the threads torch used and the processor it ran on. A table of results
names the commit it was produced with; this is how a run directory says it. The processor matters:
torch's CPU kernels dispatch on the instruction set (AVX2, AVX-512), and the same seed, commit and
thread count give different numbers on two processors that differ there."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The `koala` package directory (this module is koala/run/provenance.py)."""


def _git(*args: str) -> str | None:
    """The output of a git command run in the package's checkout, or None (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkout_package(checkout: Path) -> Path:
    """The `koala` package directory inside the project checkout `checkout` (its src/ layout)."""
    return (checkout / "src" / "koala").resolve()


def source_version() -> dict[str, Any]:
    """The commit the `koala` package was imported from, and whether tracked files differ from it;
    for an installed (non-checkout) package, its version instead."""
    top = _git("rev-parse", "--show-toplevel")
    if top is not None and checkout_package(Path(top)) == PACKAGE_DIR:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}
    try:
        return {"commit": None, "dirty": None, "version": metadata.version("koala-fl")}
    except metadata.PackageNotFoundError:
        return {"commit": None, "dirty": None}


def processor_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows, which may
    be empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model"):
                return value.strip()
    return platform.processor() or platform.machine()


def environment(engine: str) -> dict[str, Any]:
    """What produced a run: the source version, Python, torch, the thread count, the processor and
    the instruction set torch's CPU kernels use on it, and the engine."""
    return {
        **source_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": processor_name(),
        "cpu-capability": torch.backends.cpu.get_cpu_capability(),
        "engine": engine,
    }
