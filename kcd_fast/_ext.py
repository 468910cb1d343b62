"""The compiled modules: ``_cpu`` always, ``_cuda`` when the build found nvcc."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import _cpu
from ._version import __version__

_cuda: ModuleType | None
try:
    from . import _cuda
except ImportError:  # built without CUDA (no nvcc, or KCD_FAST_NO_CUDA=1)
    _cuda = None


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
