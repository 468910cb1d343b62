"""The run-time compiled CUDA kernels: the fallback where kcd_fast was built without nvcc.

Most GPU machines that run PyTorch have a driver and torch's CUDA runtime but no CUDA
toolkit, so ``pip install`` there builds the CPU module only. When a CUDA tensor reaches a
kernel and the compiled ``_cuda`` module is absent, :func:`module` compiles the SAME kernel
headers the nvcc build uses (``kcd/cuda/scoring_kernels.cuh`` and ``blend_kernels.cuh``, with
``kcd/scoring.h``, ``kcd/blend.h`` and ``kcd/common.h``; shipped in the package as
``kcd_fast/include``) with NVRTC through cupy (``pip install cupy-cuda12x`` or ``-cuda13x``;
its wheel carries NVRTC, no nvcc needed), once per device architecture (then read from disk), and
launches them on the caller's stream with the launch geometry of ``csrc/cuda/*.cu`` (the PTX
is kept in :func:`cache_dir`, keyed by the headers' text and NVRTC's version). Results
are those of the compiled module (the same source, the same compiler front end, the same
options): the PTX comes from plain NVRTC (:func:`compile_ptx`) and is loaded by cupy, because
cupy's own compile path appends ``-ftz=true`` (denormals flushed: rows with logit gaps of
~87-104 would keep 0 where nvcc keeps ~1e-40 of entropy). bfloat16 tensors cross into cupy as
int16 views of the same memory (the kernels take ``const void*``; cupy 13 refuses bfloat16
DLPack and cupy 14 needs ``ml_dtypes`` for it).

Covered: ``observe_entropy``, ``observe_kl``, ``observe_entropy_seq``, ``observe_scores``,
``values`` and ``blend``. ``condense`` of CUDA values runs on the host (one copy of the
values and the kept indices, the CPU kernel in between); the tensor back end's fused
``augment`` needs the compiled module (its CPU storage path works without).

Why cupy: NVRTC compiles CUDA C++ with no toolkit installed, and cupy is the maintained way
to reach it from Python (program cache, name expressions for templates, launches on an
external stream, DLPack); numba's CUDA target compiles Python, not our headers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from ._cache import default_cache_dir

__all__ = [
    "KERNELS",
    "RtcModule",
    "arch_for",
    "available",
    "cache_dir",
    "cached_ptx",
    "compile_ptx",
    "include_dir",
    "module",
    "source",
    "why_unavailable",
]

_KINDS = ("kcd::FloatKind::kF32", "kcd::FloatKind::kF16", "kcd::FloatKind::kBF16")
_THREADS, _WARP = 256, 32  # kcd/cuda/launch.cuh: kThreads, kWarp (tests check they agree)
_CHUNK = 4096  # kcd/cuda/scoring_kernels.cuh: kAccumulateChunk
_BLEND_SPAN = 65536  # kcd/cuda/blend_kernels.cuh: kBlendSpan

# Kernel name expressions (templates instantiated by NVRTC): what the fallback launches.
KERNELS: tuple[str, ...] = (
    *(f"kcd::cuda::kernels::entropy_kernel<{k}, 1>" for k in _KINDS),
    *(f"kcd::cuda::kernels::kl_kernel<{k}>" for k in _KINDS),
    *(f"kcd::cuda::kernels::entropy_seq_kernel<{k}>" for k in _KINDS),
    "kcd::cuda::kernels::scores_kernel",
    "kcd::cuda::kernels::accumulate_kernel",
    "kcd::cuda::kernels::values_kernel",
    "kcd::cuda::kernels::blend_vec16",
    "kcd::cuda::kernels::blend_bytes",
)
_HEADERS = ("kcd/cuda/scoring_kernels.cuh", "kcd/cuda/blend_kernels.cuh")


def include_dir() -> Path:
    """The kernel headers: ``kcd_fast/include`` in an installed wheel, else the source
    checkout's ``csrc/include`` (editable installs)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "include", here.parent / "csrc" / "include"):
        if all((cand / h).is_file() for h in _HEADERS):
            return cand
    raise RuntimeError(
        f"kcd_fast's kernel headers ({', '.join(_HEADERS)}) are missing from {here / 'include'} "
        "and from a source checkout; reinstall kcd_fast"
    )


def source() -> str:
    """The translation unit NVRTC compiles: the kernel headers, nothing else."""
    return "".join(f'#include "{h}"\n' for h in _HEADERS)


def options(arch: str | None) -> tuple[str, ...]:
    """NVRTC options: C++17, the header directory, and ``arch`` (e.g. "compute_90"; None:
    cupy picks the current device's)."""
    return ("-std=c++17", f"-I{include_dir()}", *((f"-arch={arch}",) if arch else ()))


def compile_ptx(arch: str = "compute_80") -> str:
    """Compiles the fallback's source for ``arch`` with NVRTC and returns the PTX; needs
    cupy (its NVRTC), no GPU and no driver. Raises ``RuntimeError`` with NVRTC's log. No
    ``-ftz``: denormals are kept, as nvcc's build keeps them."""
    return _compile(arch)[0]


def _compile(arch: str, extra: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """``(PTX, {name expression: lowered (mangled) name})`` for ``arch`` with plain NVRTC."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source(), "kcd_fast_rtc.cu", [], [])
    try:
        for name in KERNELS:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [*options(arch), *extra])
        except nvrtc.NVRTCError as err:
            raise RuntimeError(
                f"NVRTC could not compile kcd_fast's kernels for {arch}: {err}\n{nvrtc.getProgramLog(prog)}"
            ) from err
        ptx = nvrtc.getPTX(prog)
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in KERNELS}
        return (ptx.decode() if isinstance(ptx, bytes) else ptx).rstrip("\x00"), lowered
    finally:
        nvrtc.destroyProgram(prog)


def cache_dir() -> Path:
    """The folder whose ``rtc/`` holds the fallback's compiled PTX: kcd_fast's cache folder
    (``$KCD_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/kcd_fast``, else ``~/.cache/kcd_fast``)."""
    return default_cache_dir()


def cache_key(arch: str) -> str:
    """Names one compilation: the kernel headers' text, the options, the target and NVRTC's version."""
    import hashlib

    from cupy.cuda import nvrtc

    h = hashlib.sha256()
    inc = include_dir()
    for f in sorted(p for p in (inc / "kcd").rglob("*") if p.suffix in (".h", ".cuh")):
        h.update(f.relative_to(inc).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    opts = [o for o in options(arch) if not o.startswith("-I")]  # the folder's path is not the content
    h.update(repr((opts, KERNELS, nvrtc.getVersion())).encode())
    return h.hexdigest()[:32]


def cached_ptx(arch: str) -> tuple[Path, dict[str, str]]:
    """``(PTX file, lowered names)`` for ``arch``: read from :func:`cache_dir` when a compilation
    of the same headers, options and NVRTC is there, else compiled by :func:`_compile` and
    stored (atomically; an unwritable cache folder falls back to a temporary one)."""
    import json
    import tempfile

    key = cache_key(arch)
    try:
        folder = cache_dir() / "rtc"
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="kcd_fast_rtc_"))
    ptx_path, names_path = folder / f"{key}-{arch}.ptx", folder / f"{key}-{arch}.json"
    try:
        lowered = json.loads(names_path.read_text())
        if ptx_path.is_file() and isinstance(lowered, dict) and set(lowered) == set(KERNELS):
            return ptx_path, lowered
    except (OSError, ValueError):
        pass
    ptx, lowered = _compile(arch)
    for path, text in ((ptx_path, ptx), (names_path, json.dumps(lowered))):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # the PTX first: the names file marks a complete entry
    return ptx_path, lowered


def arch_for(compute_capability: int, supported: tuple[int, ...]) -> str:
    """The NVRTC target for a device: its own ``compute_XY`` when NVRTC knows it, else the newest
    it knows below (PTX the driver compiles for the device)."""
    usable = [a for a in supported if a <= compute_capability]
    if not usable:
        raise RuntimeError(
            f"this NVRTC supports compute capabilities {list(supported)}, none at or below the device's "
            f"{compute_capability}"
        )
    return f"compute_{max(usable)}"


def cupy_array(t: torch.Tensor) -> Any:
    """``t`` for a cupy kernel argument (the same memory): bfloat16 as an int16 view, which every
    cupy takes through DLPack (the kernels read raw bits)."""
    import cupy

    return cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def why_unavailable() -> str | None:
    """None when the fallback can run (cupy importable and NVRTC loadable), else why not."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as err:  # ImportError, or cupy present without a loadable NVRTC
        return f"{type(err).__name__}: {err}"
    return None


def available() -> bool:
    return why_unavailable() is None


class RtcModule:
    """The fallback's kernels with the compiled ``_cuda`` module's call signatures (DLPack
    capsules in, the caller's stream as an int); each device's binary is compiled at its
    first launch there (for its own architecture) and kept."""

    cuda_archs = "rtc"  # machine code for whatever device it runs on

    def __init__(self) -> None:
        self._per_device: dict[int, dict[str, Any]] = {}

    def kernels(self, device: int) -> dict[str, Any]:
        """name -> cupy kernel for ``device``, compiled on first use."""
        got = self._per_device.get(device)
        if got is None:
            import cupy
            from cupy.cuda import nvrtc

            with cupy.cuda.Device(device) as dev:
                arch = arch_for(int(dev.compute_capability), tuple(nvrtc.getSupportedArchs()))
                # plain NVRTC (cupy compiling the source itself would add -ftz=true), loaded from a file
                path, lowered = cached_ptx(arch)
                mod = cupy.RawModule(path=str(path))
                got = {name: mod.get_function(lowered[name]) for name in KERNELS}
                self._per_device[device] = got
        return got

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _tensor(capsule: Any) -> torch.Tensor:
        return torch.utils.dlpack.from_dlpack(capsule)

    def _launch(self, name: str, grid: int, block: int, args: tuple, stream: int) -> None:
        import cupy

        device = next(a.device.index for a in args if isinstance(a, torch.Tensor))
        kernel = self.kernels(device)[name]
        with cupy.cuda.Device(device):
            ext = cupy.cuda.ExternalStream(int(stream), device)
            with ext:  # DLPack exchange on the launch stream: no cross-stream waits (graph capturable)
                arrays = tuple(cupy_array(a) if isinstance(a, torch.Tensor) else a for a in args)
            kernel((max(1, grid),), (block,), arrays, stream=ext)

    def _scored(
        self, name: str, grid: int, args: tuple, ix, s, c, scratch, stream: int, rows: int, commit: bool = True
    ) -> None:
        """Launches scoring kernel ``name`` with ``args`` (its scratch argument is the
        placeholder None), then (``commit``) adds the rows to the bank in row order, chunk by
        chunk (accumulate_kernel): the launch sequence of csrc/cuda/scoring.cu."""
        full = tuple(scratch if a is None else a for a in args)
        self._launch(name, grid, _THREADS, full, stream)
        if commit:
            self._accumulate(ix, s, c, scratch, stream, rows)

    def _accumulate(self, ix, s, c, scratch, stream: int, rows: int) -> None:
        import numpy as np

        for c0 in range(0, rows, _CHUNK):
            n = min(rows - c0, _CHUNK)
            self._launch(
                "kcd::cuda::kernels::accumulate_kernel",
                self._grid_for(n),
                _THREADS,
                (ix[c0 : c0 + n], scratch[c0 : c0 + n], np.int64(n), s, c),
                stream,
            )

    @staticmethod
    def _kind(t: torch.Tensor) -> str:
        try:
            return {torch.float32: _KINDS[0], torch.float16: _KINDS[1], torch.bfloat16: _KINDS[2]}[t.dtype]
        except KeyError:
            raise TypeError(f"logits must be float32, float16 or bfloat16, got {t.dtype}") from None

    @staticmethod
    def _vec(t: torch.Tensor, ld: int) -> bool:
        return t.data_ptr() % 16 == 0 and (ld * t.element_size()) % 16 == 0

    @staticmethod
    def _grid_for(work: int, per_block: int = _THREADS, cap: int = 65535 * 16) -> int:
        return int(min(max(1, -(-work // per_block)), cap))

    # -- the ops (signatures of csrc/bind_cuda.cpp) --------------------------------------------
    def observe_entropy(self, logits, indices, sums, counts, errors, scratch, stream: int) -> None:
        import numpy as np

        lg, ix, s, c, er, sc = map(self._tensor, (logits, indices, sums, counts, errors, scratch))
        b, k = lg.shape
        if b == 0:
            return
        ld = lg.stride(0)
        vec = np.bool_(self._vec(lg, ld))
        args = (lg, np.int64(b), np.int64(k), np.int64(ld), vec, ix, np.int64(s.shape[0]), None, er)
        name = f"kcd::cuda::kernels::entropy_kernel<{self._kind(lg)}, 1>"
        self._scored(name, -(-b * _WARP // _THREADS), args, ix, s, c, sc, stream, b)

    def observe_kl(
        self,
        student,
        teacher,
        indices,
        sums,
        counts,
        temperature: float,
        errors,
        scratch,
        stream: int,
        commit: bool = True,
    ) -> None:
        import numpy as np

        st, te, ix, s, c, er, sc = map(self._tensor, (student, teacher, indices, sums, counts, errors, scratch))
        b, k = st.shape
        if b == 0:
            return
        inv = np.float32(1.0) / np.float32(temperature)  # as the C++ launcher: 1.0f / temperature
        strides = (np.int64(st.stride(0)), np.int64(te.stride(0)))
        args = (st, te, np.int64(b), np.int64(k), *strides, ix, np.int64(s.shape[0]), None, inv, er)
        name = f"kcd::cuda::kernels::kl_kernel<{self._kind(st)}>"
        self._scored(name, -(-b * _WARP // _THREADS), args, ix, s, c, sc, stream, b, commit)

    def accumulate_rows(self, indices, scratch, sums, counts, stream: int) -> None:
        ix, sc, s, c = map(self._tensor, (indices, scratch, sums, counts))
        if ix.shape[0]:
            self._accumulate(ix, s, c, sc, stream, ix.shape[0])

    def observe_entropy_seq(self, logits, mask, indices, sums, counts, errors, scratch, stream: int) -> None:
        import numpy as np

        lg, mk, ix, s, c, er, sc = map(self._tensor, (logits, mask, indices, sums, counts, errors, scratch))
        b, length, v = lg.shape
        if b == 0:
            return
        vec = np.bool_(self._vec(lg, v))
        args = (lg, np.int64(length), np.int64(v), np.int64(v), vec, mk, ix, np.int64(s.shape[0]), None, er)
        self._scored(f"kcd::cuda::kernels::entropy_seq_kernel<{self._kind(lg)}>", b, args, ix, s, c, sc, stream, b)

    def observe_scores(self, scores, indices, sums, counts, errors, scratch, stream: int) -> None:
        import numpy as np

        vals, ix, s, c, er, sc = map(self._tensor, (scores, indices, sums, counts, errors, scratch))
        b = vals.shape[0]
        if b == 0:
            return
        args = (vals, ix, np.int64(b), np.int64(s.shape[0]), None, er)
        self._scored("kcd::cuda::kernels::scores_kernel", self._grid_for(b), args, ix, s, c, sc, stream, b)

    def values(self, sums, counts, out, period: float, alpha: float, stream: int) -> None:
        import numpy as np

        s, c, o = map(self._tensor, (sums, counts, out))
        n = s.shape[0]
        if n == 0:
            return
        args = (s, c, np.int64(n), np.float64(period), np.float64(alpha), o)
        self._launch("kcd::cuda::kernels::values_kernel", self._grid_for(n), _THREADS, args, stream)

    def blend(self, images, dst, src, eps, errors, stream: int) -> None:
        import numpy as np

        im, d, s, e, er = map(self._tensor, (images, dst, src, eps, errors))
        n, length = im.shape[0], d.shape[0]
        size = im[0].numel() if n else 0
        if length == 0 or size == 0:
            return
        spans = -(-size // _BLEND_SPAN) if size > _BLEND_SPAN else 1
        grid = min(length * spans, 65535 * 8)  # a block per (pair, span) step, as csrc/cuda/blend.cu
        name = "blend_vec16" if size % 16 == 0 and im.data_ptr() % 16 == 0 else "blend_bytes"
        args = (im, np.int64(n), np.int64(size), d, s, e, np.int64(length), er)
        self._launch(f"kcd::cuda::kernels::{name}", grid, _THREADS, args, stream)

    def augment(self, *args: Any) -> None:
        raise RuntimeError(
            "the tensor back end's fused CUDA augmentation needs kcd_fast's compiled CUDA module; the run-time "
            "compiled fallback (cupy/NVRTC) covers scoring, values and blending only. Keep the storage on the CPU "
            "(tensor_device='cuda' still puts the batches on the GPU), or install a kcd_fast wheel built with CUDA "
            "(README: installing on a GPU machine without nvcc)"
        )

    def device_count(self) -> int:
        return torch.cuda.device_count()


@functools.cache
def _module() -> RtcModule:
    return RtcModule()


def module() -> RtcModule:
    """The fallback (one per process; each device compiled at its first launch)."""
    reason = "KCD_FAST_NO_RTC is set" if disabled() else why_unavailable()
    if reason is not None:
        raise RuntimeError(
            "kcd_fast was built without CUDA kernels and cannot compile them at run time "
            f"({reason}). Either install cupy for your CUDA version (pip install cupy-cuda12x "
            "or cupy-cuda13x): kcd_fast then compiles its kernels with NVRTC at first use; or "
            "install a kcd_fast wheel built with CUDA (README: installing on a GPU machine without "
            "nvcc), or rebuild where nvcc is on PATH"
        )
    return _module()


def disabled() -> bool:
    """``KCD_FAST_NO_RTC=1`` switches the fallback off (the error then names the ways out)."""
    return os.environ.get("KCD_FAST_NO_RTC", "") not in ("", "0")
