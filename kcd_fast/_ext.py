"""The compiled modules: ``_cpu`` always, ``_cuda`` when the build found nvcc."""

from __future__ import annotations

import os
import warnings
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
        try:
            if not sep or not value.strip().isdigit():
                raise ValueError(f"items are name=value, got {item!r}")
            _cuda.set_variant(name.strip(), int(value))
        except ValueError as err:  # a typo must not break `import kcd_fast`: the defaults stay
            warnings.warn(f"KCD_FAST_CUDA_VARIANTS={spec!r} ignored ({err}); the default kernels run", stacklevel=2)
            for default in ("entropy_batch", "blend_per_thread"):
                _cuda.set_variant(default, 1)
            return


_apply_cuda_variants(os.environ.get("KCD_FAST_CUDA_VARIANTS", ""))


_RUNS_ON: dict[int, bool] = {}  # device index -> the module has code it runs (checked once per device)


def cuda_module() -> Any:
    """The compiled ``_cuda`` module, or where the build had no nvcc, the run-time compiled
    fallback (:mod:`kcd_fast._rtc`: the same kernel headers through cupy's NVRTC; raises
    naming both ways out when cupy is missing)."""
    if _cuda is None:
        from . import _rtc

        return _rtc.module()
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        ok = _RUNS_ON.get(device)
        if ok is None:
            ok = _RUNS_ON[device] = runs_on(torch.cuda.get_device_capability(device))
        if not ok:
            cap = torch.cuda.get_device_capability(device)
            raise RuntimeError(
                f"kcd_fast's CUDA kernels were built for {_cuda.cuda_archs}, which a device of compute capability "
                f"{cap[0]}.{cap[1]} cannot run; rebuild with KCD_FAST_CUDA_ARCHS including {cap[0]}{cap[1]}-real"
            )
    return _cuda


def _archs() -> tuple[set[int], set[int]]:
    """Compute capabilities the CUDA module holds machine code for, and PTX for (e.g.
    "80-real" -> 80 native, "90-virtual" -> 90 PTX)."""
    native, ptx = set(), set()
    for a in _cuda.cuda_archs.split(",") if _cuda is not None else []:
        num, _, kind = a.strip().partition("-")
        if num.isdigit():
            (ptx if kind == "virtual" else native).add(int(num))
            if kind == "":  # "80" alone: both
                ptx.add(int(num))
    return native, ptx


def runs_on(capability: tuple[int, int]) -> bool:
    """Whether the CUDA module has code a device of ``capability`` (major, minor) runs:
    machine code for the same major and a minor not above the device's, or PTX of a
    capability not above it (compiled by the driver)."""
    native, ptx = _archs()
    cc = 10 * capability[0] + capability[1]
    return any(a // 10 == capability[0] and a <= cc for a in native) or any(p <= cc for p in ptx)


def build_info() -> dict[str, Any]:
    """What the installed extension was built with: ``cuda_archs`` as CMake named them,
    ``cuda_native_archs`` (machine code) and ``cuda_ptx_archs`` (JIT-compiled by the driver)."""
    native, ptx = _archs()
    if _cuda is not None:
        path = "compiled"
    else:
        from . import _rtc

        path = "rtc" if not _rtc.disabled() and _rtc.available() else None
    return {
        "version": __version__,
        "cuda_compiled": _cuda is not None,
        # which CUDA kernels CUDA tensors get: "compiled" (nvcc), "rtc" (NVRTC at first use,
        # kcd_fast._rtc) or None (none: a CUDA tensor raises naming the ways out)
        "cuda_path": path,
        "cuda_archs": _cuda.cuda_archs.split(",") if _cuda is not None else [],
        "cuda_native_archs": sorted(native),
        "cuda_ptx_archs": sorted(ptx),
        "openmp": bool(_cpu.openmp_enabled()),
        "openmp_threads": int(_cpu.openmp_threads()),
        "cpu_condense_isa": str(_cpu.condense_isa()),
        "cuda_devices": int(_cuda.device_count()) if _cuda is not None else 0,
    }


def has_cuda() -> bool:
    """True when CUDA kernels can run here: a CUDA device is present and either the compiled
    module has code the current device runs (a T4 with a build for sm_80+ only: False) or the
    run-time compiled fallback is available (cupy with NVRTC)."""
    import torch

    if not torch.cuda.is_available():
        return False
    if _cuda is None:
        from . import _rtc

        return not _rtc.disabled() and _rtc.available()
    if _cuda.device_count() == 0:
        return False
    return runs_on(torch.cuda.get_device_capability())
