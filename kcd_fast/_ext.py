"""The compiled modules: ``_cpu`` always, ``_cuda`` when the build found nvcc."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from . import _cpu
from ._version import __version__

_cuda: ModuleType | None
try:
    from . import _cuda
except ImportError:  # built without CUDA (no nvcc, or KCD_FAST_NO_CUDA=1)
    _cuda = None


def _apply_cuda_variants(spec: str) -> None:
    """Opt-in CUDA kernel variants for A/B runs, e.g. "entropy_batch=4,blend_per_thread=4"
    (environment variable KCD_FAST_CUDA_VARIANTS; benchmarks/gpu_check.sh sets it)."""
    if _cuda is None or not spec.strip():
        return
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"KCD_FAST_CUDA_VARIANTS items are name=value, got {item!r}")
        _cuda.set_variant(name.strip(), int(value))


_apply_cuda_variants(os.environ.get("KCD_FAST_CUDA_VARIANTS", ""))


def cuda_module() -> ModuleType:
    if _cuda is None:
        raise RuntimeError(
            "kcd_fast was built without CUDA kernels; rebuild where nvcc is on PATH "
            "(and KCD_FAST_NO_CUDA is unset) to use CUDA tensors"
        )
    return _cuda


def build_info() -> dict[str, Any]:
    """What the installed extension was built with."""
    return {
        "version": __version__,
        "cuda_compiled": _cuda is not None,
        "cuda_archs": _cuda.cuda_archs.split(",") if _cuda is not None else [],
        "openmp": bool(_cpu.openmp_enabled()),
        "openmp_threads": int(_cpu.openmp_threads()),
        "cpu_condense_isa": str(_cpu.condense_isa()),
        "cuda_devices": int(_cuda.device_count()) if _cuda is not None else 0,
    }


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled and a CUDA device is present."""
    return _cuda is not None and _cuda.device_count() > 0
