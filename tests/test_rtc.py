"""The run-time compiled CUDA fallback (kcd_fast/_rtc.py): on the CPU, its source (the same
kernel headers nvcc compiles) compiles with NVRTC for sm_75 / sm_80 / sm_90 into every kernel
it launches, its launch constants are the headers', and without cupy (or with the fallback
switched off) a CUDA op raises naming both ways out while `build_info()` says which path is
active. On a GPU (`needs_cuda`, run by benchmarks/gpu_check.sh): each fallback kernel gives
the compiled module's bits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _arrays as A
from kcd_fast import _rtc

ROOT = Path(__file__).resolve().parents[1]


def _nvrtc_or_skip() -> None:
    reason = _rtc.why_unavailable()
    if reason is not None:  # .ci/run installs cupy (the `rtc` extra): there this runs
        pytest.skip(f"cupy with NVRTC is not installed here ({reason}); pip install -e '.[rtc]'")


@pytest.mark.parametrize("arch", ["compute_75", "compute_80", "compute_90"])
def test_the_fallback_compiles_every_kernel_from_the_shared_headers(arch: str) -> None:
    _nvrtc_or_skip()
    ptx = _rtc.compile_ptx(arch)
    assert f".target sm_{arch.split('_')[1]}" in ptx
    entries = set(re.findall(r"\.entry (\S+)\(", ptx))
    assert len(entries) == len(_rtc.KERNELS) == 14
    for name in ("entropy_kernel", "kl_kernel", "entropy_seq_kernel", "scores_kernel", "values_kernel", "blend_vec16"):
        assert any(name in e for e in entries), name


def test_the_fallback_reads_the_headers_nvcc_compiles() -> None:
    inc = _rtc.include_dir()
    assert inc == ROOT / "csrc" / "include"  # an editable checkout: no second copy of the math
    text = "".join((inc / h).read_text() for h in ("kcd/cuda/scoring_kernels.cuh", "kcd/cuda/blend_kernels.cuh"))
    for name in _rtc.KERNELS:
        assert re.search(rf"__global__ void {name.split('<')[0].split('::')[-1]}\(", text), name
    launch = (inc / "kcd" / "cuda" / "launch.cuh").read_text()
    assert f"kThreads = {_rtc._THREADS};" in launch and f"kWarp = {_rtc._WARP};" in launch
    for cu in ("scoring.cu", "blend.cu"):  # nvcc's launchers include the same kernels
        assert "kcd/cuda/" in (ROOT / "csrc" / "cuda" / cu).read_text()


def test_a_compile_error_is_reported_with_nvrtcs_log(monkeypatch: pytest.MonkeyPatch) -> None:
    _nvrtc_or_skip()
    monkeypatch.setattr(_rtc, "source", lambda: "__global__ void broken( { }\n")
    with pytest.raises(RuntimeError, match="NVRTC could not compile kcd_fast's kernels for compute_80"):
        _rtc.compile_ptx("compute_80")


_NO_MODULE = """
import sys
sys.modules["kcd_fast._cuda"] = None  # as if built where there was no nvcc
{block}
import kcd_fast, torch
from kcd_fast import _ext
info = kcd_fast.build_info()
print("PATH", info["cuda_compiled"], info["cuda_path"])
try:
    m = _ext.cuda_module()
    print("MODULE", type(m).__name__)
except RuntimeError as err:
    print("ERROR", err)
"""


def _run(code: str, **env: str) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_the_compiled_module_cuda_ops_take_the_fallback() -> None:
    _nvrtc_or_skip()
    out = _run(_NO_MODULE.format(block=""))
    assert "PATH False rtc" in out and "MODULE RtcModule" in out


@pytest.mark.parametrize("how", ["no cupy", "switched off"])
def test_without_cupy_the_error_names_both_ways_out(how: str) -> None:
    block = 'sys.modules["cupy"] = None' if how == "no cupy" else ""
    out = _run(_NO_MODULE.format(block=block), **({"KCD_FAST_NO_RTC": "1"} if how == "switched off" else {}))
    assert "PATH False None" in out
    msg = out.split("ERROR", 1)[1]
    assert "pip install cupy-cuda12x or cupy-cuda13x" in msg and "rebuild where nvcc is on PATH" in msg
    assert "installing on a GPU machine without nvcc" in msg
    assert ("KCD_FAST_NO_RTC" in msg) == (how == "switched off")


def test_build_info_names_the_compiled_path() -> None:
    info = kcd_fast.build_info()
    assert info["cuda_path"] == ("compiled" if info["cuda_compiled"] else info["cuda_path"])


# -- on a GPU: the fallback's kernels give the compiled module's bits ---------------------------
def _bank(n: int, dev: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(n, dtype=torch.float64, device=dev),
        torch.zeros(n, dtype=torch.int32, device=dev),
        torch.zeros(2, dtype=torch.int64, device=dev),
    )


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_fallback_scoring_matches_the_compiled_module(dtype: torch.dtype, seed: int) -> None:
    from kcd_fast._ext import _cuda

    if _cuda is None:
        pytest.skip("the compiled module is what the fallback is compared with")
    _nvrtc_or_skip()
    rtc = _rtc.module()
    g = torch.Generator().manual_seed(seed)
    b, c, n = 301, 1000 + seed * 3, 500
    lg = (torch.randn(b, c, generator=g) * 5).to(dtype).cuda()
    te = (torch.randn(b, c, generator=g) * 5).to(dtype).cuda()
    idx = torch.randint(0, n, (b,), generator=g).cuda()
    idx[:7] = -1  # bad rows: skipped and counted
    stream = torch.cuda.current_stream().cuda_stream
    for name in ("observe_entropy", "observe_kl"):
        got = []
        for mod in (_cuda, rtc):
            s, k, e = _bank(n, "cuda")
            extra = (A.capsule(te),) if name == "observe_kl" else ()
            args = (A.capsule(lg), *extra, A.capsule(idx), A.capsule(s), A.capsule(k))
            scratch = A.capsule(torch.empty(b, dtype=torch.float64, device="cuda"))
            if name == "observe_kl":
                getattr(mod, name)(*args, 2.0, A.capsule(e), scratch, stream)
            else:
                getattr(mod, name)(*args, A.capsule(e), scratch, stream)
            got.append((s.cpu(), k.cpu(), e.cpu()))
        (s0, k0, e0), (s1, k1, e1) = got
        assert torch.equal(k0, k1) and torch.equal(e0, e1) and int(e0[0]) == 7
        assert torch.equal(s0, s1)  # the same kernels, rows added in row order: the same bits
    seq = (torch.randn(9, 13, 257, generator=g) * 3).to(dtype).cuda()
    mask = (torch.rand(9, 13, generator=g) > 0.3).to(torch.uint8).cuda()
    mask[:, 0] = 1
    sidx = torch.arange(9).cuda()
    scores = torch.rand(b, generator=g, dtype=torch.float64).cuda()
    outs = []
    for mod in (_cuda, rtc):
        s, k, e = _bank(n, "cuda")
        scratch = torch.empty(b, dtype=torch.float64, device="cuda")
        mod.observe_entropy_seq(
            A.capsule(seq),
            A.capsule(mask),
            A.capsule(sidx),
            A.capsule(s),
            A.capsule(k),
            A.capsule(e),
            A.capsule(scratch),
            stream,
        )
        mod.observe_scores(
            A.capsule(scores), A.capsule(idx), A.capsule(s), A.capsule(k), A.capsule(e), A.capsule(scratch), stream
        )
        v = torch.empty_like(s)
        mod.values(A.capsule(s), A.capsule(k), A.capsule(v), 4.0, 0.03, stream)
        outs.append((s.cpu(), k.cpu(), e.cpu(), v.cpu()))
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [(40, 32, 32, 3), (17, 7, 5, 3)])  # 16-byte rows and ragged
def test_fallback_blend_and_condense_match_the_compiled_module(shape: tuple[int, ...]) -> None:
    from kcd_fast._ext import _cuda

    if _cuda is None:
        pytest.skip("the compiled module is what the fallback is compared with")
    _nvrtc_or_skip()
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).cuda()
    n = shape[0]
    dst = torch.arange(0, n // 2).cuda()
    src = torch.arange(n // 2, 2 * (n // 2)).cuda()
    eps = torch.from_numpy(rng.uniform(0.7, 1.0, n // 2)).cuda()
    outs = []
    for mod in (_cuda, _rtc.module()):
        im = images.clone()
        err = torch.zeros(1, dtype=torch.int64, device="cuda")
        mod.blend(
            A.capsule(im),
            A.capsule(dst),
            A.capsule(src),
            A.capsule(eps),
            A.capsule(err),
            torch.cuda.current_stream().cuda_stream,
        )
        outs.append(im.cpu())
    assert torch.equal(outs[0], outs[1])
    want = images.cpu().numpy().copy()
    kcd_fast.ops.blend_(want, dst.cpu().numpy(), src.cpu().numpy(), eps.cpu().numpy())
    assert np.array_equal(outs[1].numpy(), want)  # and the CPU kernel's
