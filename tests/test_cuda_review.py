"""The CUDA review's findings (issue 32) and issue 29's wide logits and overflowing sums: the
CPU side of each rule (one row classification for the CPU and CUDA, the mask rules, the
condensation's workspace, the fallback's compile options, wide rows exact to 1e-6) runs here;
the device side (`needs_cuda`) runs in benchmarks/gpu_check.sh's tests stage."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _rtc, ops
from kcd_fast._ext import _cpu

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ROOT / "csrc" / "include" / "kcd"


def _bank(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.int32, device=device)


def _entropy64(x: torch.Tensor) -> float:
    """float64 oracle: the entropy of softmax(x) for one row."""
    x = x.double()
    return float(-(torch.softmax(x, 0) * torch.log_softmax(x, 0)).sum())


def _kl64(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    a, b = t.double() / temp, s.double() / temp
    return float((torch.softmax(a, 0) * (torch.log_softmax(a, 0) - torch.log_softmax(b, 0))).sum())


# -- wide logits (issue 29): float64 totals of float32 blocks, exact to 1e-6 relative ---------------
WIDE = 1 << 22  # main's float32 lane sums: 1.8e-5 relative error here (1.6e-4 at 2^24); now 2.3e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_score_within_1e6_of_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    lg = (torch.randn(2, WIDE, generator=g) * 3).to(dtype)
    sums, counts = _bank(2)
    ops.observe_entropy(lg, torch.tensor([0, 1]), sums, counts)
    for r in range(2):
        assert sums[r].item() == pytest.approx(_entropy64(lg[r]), rel=1e-6)
    seq_s, seq_c = _bank(1)
    ops.observe_entropy_seq(lg[None], torch.ones(1, 2), torch.tensor([0]), seq_s, seq_c)
    assert seq_s.item() == pytest.approx((_entropy64(lg[0]) + _entropy64(lg[1])) / 2, rel=1e-6)
    te = (torch.randn(1, WIDE, generator=g) * 3).to(dtype)
    kl_s, kl_c = _bank(1)
    ops.observe_kl(lg[:1], te, torch.tensor([0]), kl_s, kl_c, temperature=2.0)
    assert kl_s.item() == pytest.approx(_kl64(lg[0], te[0], 2.0), rel=1e-6)


def test_zero_logits_score_log_c_exactly() -> None:
    # the case at a size a unit test can hold (2^30 float16 zeros are 2 GiB: the GPU test)
    for c in (1, 3, 1024, 1025, (1 << 24) + 3):
        sums, counts = _bank(1)
        ops.observe_entropy(torch.zeros(1, c, dtype=torch.float16), torch.tensor([0]), sums, counts)
        assert sums.item() == pytest.approx(math.log(c), rel=1e-12, abs=1e-12), c


def test_the_block_size_is_shared_and_documented() -> None:
    text = (HEADERS / "scoring.h").read_text()
    assert "constexpr int64_t kSumBlock = 1024;" in text
    cuda = (HEADERS / "cuda" / "scoring_kernels.cuh").read_text()
    assert "kSumBlock" in cuda and "RowStats" in cuda  # the CUDA lanes use the same float64 totals


# -- sums that overflow (issue 29): scores beyond +-1e298 refused, documented -------------------
@pytest.mark.parametrize("bad", [1e308, -1e308, 2e298])
def test_scores_beyond_the_limit_are_refused_before_anything_changes(bad: float) -> None:
    sums, counts = _bank(3)
    sums[0] = 1.0
    with pytest.raises(ValueError, match=r"scores row 1 \(point 0\) = .* is beyond \+-1e298"):
        ops.observe_scores(torch.tensor([1.0, bad], dtype=torch.float64), torch.tensor([2, 0]), sums, counts)
    assert sums.tolist() == [1.0, 0.0, 0.0] and not counts.any()


def test_scores_at_the_limit_sum_without_overflow() -> None:
    sums, counts = _bank(1)
    for _ in range(3):
        scores = torch.full((4,), ops.SCORE_LIMIT, dtype=torch.float64)
        ops.observe_scores(scores, torch.zeros(4, dtype=torch.int64), sums, counts)
    assert math.isfinite(sums.item()) and counts.item() == 12
    assert ops.SCORE_LIMIT * 2**31 < sys.float_info.max  # the documented bound holds for any int32 count
    assert "constexpr double kScoreLimit = 1e298;" in (HEADERS / "scoring.h").read_text()


def test_a_kl_that_overflows_is_refused_on_the_cpu() -> None:
    s = torch.tensor([[1.0, 2.0], [-3e38, 3e38]])
    t = torch.tensor([[2.0, 1.0], [3e38, -3e38]])
    sums, counts = _bank(2)
    with pytest.raises(ValueError, match=r"row 1 \(point 1\) holds a non-finite value .* its score overflows"):
        ops.observe_kl(s, t, torch.tensor([0, 1]), sums, counts, temperature=1.0)
    assert not sums.any() and not counts.any()


# -- one row classification for the CPU and CUDA: a bad index first ---------------------------
@pytest.mark.parametrize("op", ["entropy", "kl", "seq", "scores"])
def test_a_row_with_a_bad_index_and_a_nan_is_a_bad_index(op: str) -> None:
    lg = torch.randn(3, 5)
    lg[1, 2] = float("nan")
    idx = torch.tensor([0, 9, 1])  # row 1: both a bad index and a NaN
    sums, counts = _bank(4)
    with pytest.raises(IndexError, match=r"indices\[1\] = 9 is outside \[0, 4\)"):
        if op == "entropy":
            ops.observe_entropy(lg, idx, sums, counts)
        elif op == "kl":
            ops.observe_kl(lg, lg.clone(), idx, sums, counts)
        elif op == "seq":
            ops.observe_entropy_seq(lg[:, None, :], torch.ones(3, 1), idx, sums, counts)
        else:
            ops.observe_scores(lg[:, 2].double(), idx, sums, counts)
    assert not sums.any() and not counts.any()


def test_every_cuda_kernel_classifies_rows_through_row_status() -> None:
    cuda = (HEADERS / "cuda" / "scoring_kernels.cuh").read_text()
    cpu = (ROOT / "csrc" / "cpu" / "scoring.cpp").read_text()
    # the only place the kernels count a bad row is row_ok, which asks row_status
    assert len(re.findall(r"atomicAdd\(reinterpret_cast<unsigned long long\*>\(errors", cuda)) == 1
    assert re.search(r"row_ok\(.*\) \{\n  const int32_t status = row_status\(", cuda)
    for kernel in ("entropy_kernel", "entropy_seq_kernel", "scores_kernel", "kl_kernel"):
        body = cuda.split(f"__global__ void {kernel}(")[1].split("__global__")[0]
        assert "row_ok(" in body, kernel
    assert "row_status(indices[r], N, h[r])" in cpu


# -- the mask rules: a bool mask is checked like any other -------------------------------------
def test_a_bool_mask_with_an_empty_sequence_is_refused_by_the_check() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    idx = torch.tensor([4, 7])
    with pytest.raises(ValueError, match=r"mask row 1 \(point 7\) has no unmasked token: a sequence is scored"):
        ops.mask_arg(mask, idx, 2, 2, torch.device("cpu"), True)
    out = ops.mask_arg(mask[:1], idx[:1], 1, 2, torch.device("cpu"), True)
    assert out.dtype == torch.uint8 and out.tolist() == [[1, 0]]


# -- the condensation's workspace: 33 bytes per point + CUB's temp (DoubleBuffer sort) --------
def test_cuda_condense_workspace_is_33_bytes_per_point_plus_cubs_temp() -> None:
    for n in (1, 1000, 1 << 20, 1 << 30):
        got = _cpu.cuda_condense_workspace_bytes(n, 0)
        assert 33 * n <= got <= 33 * n + 6 * 256, n
        assert _cpu.cuda_condense_workspace_bytes(n, 1000) == got + 1024  # CUB's bytes, 256-aligned
    assert _cpu.cuda_condense_workspace_bytes(1 << 30, 0) < 33.01 * 2**30  # was ~49 GiB with the copying sort
    doc = kcd_fast.condense.__doc__ or ""
    doc += (ROOT / "kcd_fast" / "condense.py").read_text()
    assert "33 bytes per point" in doc


# -- the NVRTC fallback: plain NVRTC (no -ftz), bfloat16 as int16 --------------------------------
def _nvrtc_or_skip() -> None:
    reason = _rtc.why_unavailable()
    if reason is not None:
        pytest.skip(f"cupy with NVRTC is not installed here ({reason})")


def test_the_fallback_keeps_denormals() -> None:
    _nvrtc_or_skip()

    def flushing(ptx: str) -> set[str]:  # instructions that flush denormals
        ops_ = set(re.findall(r"([a-z0-9]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*)", ptx))
        return ops_ - {"ex2.approx.ftz.f32", "rcp.approx.ftz.f64"}  # inside expf / the f64 divide, nvcc's too

    assert flushing(_rtc.compile_ptx("compute_80")) == set()  # nvcc's build keeps denormals; so does the fallback
    ftz, _ = _rtc._compile("compute_80", ("-ftz=true",))
    assert {"add.ftz.f32", "mul.ftz.f32"} <= flushing(ftz)  # cupy's own compile path appends -ftz=true
    src = Path(_rtc.__file__).read_text()
    assert "RawModule(code=" not in src and "RawModule(path=" in src


def test_the_fallback_lowers_every_kernel_name() -> None:
    _nvrtc_or_skip()
    ptx, lowered = _rtc._compile("compute_75")
    assert set(lowered) == set(_rtc.KERNELS)
    for name in lowered.values():
        assert f".entry {name}(" in ptx


def test_the_fallback_targets_the_devices_arch_or_the_newest_below() -> None:
    assert _rtc.arch_for(90, (75, 80, 86, 90)) == "compute_90"
    assert _rtc.arch_for(89, (75, 80, 86, 90)) == "compute_86"
    assert _rtc.arch_for(121, (75, 80, 90, 120)) == "compute_120"
    with pytest.raises(RuntimeError, match="none at or below the device's 70"):
        _rtc.arch_for(70, (75, 80))


def test_the_fallback_launch_constants_are_the_headers() -> None:
    blend = (HEADERS / "cuda" / "blend_kernels.cuh").read_text()
    assert f"constexpr int64_t kBlendSpan = {_rtc._BLEND_SPAN};" in blend
    assert _rtc._BLEND_SPAN % 16 == 0


# -- on a GPU --------------------------------------------------------------------------------------
DEV = "cuda"


@pytest.mark.needs_cuda
def test_cuda_wide_rows_match_float64() -> None:
    g = torch.Generator().manual_seed(1)
    lg = torch.randn(2, WIDE, generator=g) * 3
    te = torch.randn(2, WIDE, generator=g) * 3
    sums, counts = _bank(2, DEV)
    ops.observe_entropy(lg.to(DEV), torch.tensor([0, 1], device=DEV), sums, counts)
    for r in range(2):
        assert sums[r].item() == pytest.approx(_entropy64(lg[r]), rel=1e-6)
    sums, counts = _bank(2, DEV)
    ops.observe_kl(lg.to(DEV), te.to(DEV), torch.tensor([0, 1], device=DEV), sums, counts, temperature=2.0)
    for r in range(2):
        assert sums[r].item() == pytest.approx(_kl64(lg[r], te[r], 2.0), rel=1e-6)


@pytest.mark.needs_cuda
def test_cuda_2_pow_30_zero_logits_score_log_2_pow_30() -> None:
    if torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 2 GiB of logits and room to spare")
    lg = torch.zeros(1, 1 << 30, dtype=torch.float16, device=DEV)  # 2 GiB (main scored ln 2^28 on the CPU)
    sums, counts = _bank(1, DEV)
    ops.observe_entropy(lg, torch.tensor([0], device=DEV), sums, counts)
    assert sums.item() == pytest.approx(30 * math.log(2), rel=1e-6)
    del lg
    torch.cuda.empty_cache()


@pytest.mark.needs_cuda
def test_cuda_refuses_an_overflowing_kl_like_the_cpu() -> None:
    s = torch.tensor([[1.0, 2.0], [-3e38, 3e38]], device=DEV)
    t = torch.tensor([[2.0, 1.0], [3e38, -3e38]], device=DEV)
    idx = torch.tensor([0, 1], device=DEV)
    sums, counts = _bank(2, DEV)
    with pytest.raises(ValueError, match=r"row 1 \(point 1\) holds a non-finite value .* overflows"):
        ops.observe_kl(s, t, idx, sums, counts, temperature=1.0)  # strict by default: nothing changes
    assert not sums.any() and not counts.any()
    errors = torch.zeros(2, dtype=torch.int64, device=DEV)
    ops.observe_kl(s, t, idx, sums, counts, temperature=1.0, errors=errors)
    assert errors.tolist() == [0, 1] and counts.tolist() == [1, 0]  # counted, never +inf in the bank
    assert bool(torch.isfinite(sums).all())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("op", ["entropy", "kl", "seq", "scores"])
def test_cuda_counts_a_bad_index_with_a_nan_as_a_bad_index(op: str) -> None:
    lg = torch.randn(3, 5, device=DEV)
    lg[1, 2] = float("nan")
    idx = torch.tensor([0, 9, 1], device=DEV)
    sums, counts = _bank(4, DEV)
    errors = torch.zeros(2, dtype=torch.int64, device=DEV)
    kw = {"errors": errors, "strict": False}
    if op == "entropy":
        ops.observe_entropy(lg, idx, sums, counts, **kw)
    elif op == "kl":
        ops.observe_kl(lg, lg.clone(), idx, sums, counts, **kw)
    elif op == "seq":
        ops.observe_entropy_seq(lg[:, None, :], torch.ones(3, 1, device=DEV), idx, sums, counts, **kw)
    else:
        ops.observe_scores(lg[:, 2].double(), idx, sums, counts, **kw)
    assert errors.tolist() == [1, 0] and counts.tolist() == [1, 1, 0, 0]


@pytest.mark.needs_cuda
def test_cuda_scores_beyond_the_limit() -> None:
    idx = torch.tensor([0, 1], device=DEV)
    sums, counts = _bank(2, DEV)
    with pytest.raises(ValueError, match=r"scores row 1 \(point 1\) = 1e\+308 is beyond"):
        ops.observe_scores(torch.tensor([1.0, 1e308], dtype=torch.float64, device=DEV), idx, sums, counts)
    assert not counts.any()
    errors = torch.zeros(2, dtype=torch.int64, device=DEV)
    for _ in range(2):
        ops.observe_scores(
            torch.tensor([1.0, 1e308], dtype=torch.float64, device=DEV), idx, sums, counts, errors=errors
        )
    assert errors.tolist() == [0, 2] and counts.tolist() == [2, 0] and bool(torch.isfinite(sums).all())


@pytest.mark.needs_cuda
def test_cuda_condense_workspace_per_n() -> None:
    from kcd_fast._ext import _cuda

    if _cuda is None:
        pytest.skip("the compiled module")
    rows = {}
    for k in (10, 20, 26, 30):
        n = 1 << k
        got = int(_cuda.condense_workspace_bytes(n))
        rows[k] = got
        cub = got - _cpu.cuda_condense_workspace_bytes(n, 0)
        assert 0 <= cub <= max(64 << 20, n // 8), (k, cub)  # CUB's DoubleBuffer temp: small against 33 N
    print("condense workspace bytes per N:", {f"2^{k}": v for k, v in rows.items()})
    assert rows[30] < 34 * 2**30  # 49 GiB before


@pytest.mark.needs_cuda
@pytest.mark.parametrize("d", [3 * (1 << 20), 3 * (1 << 20) + 7, 100])  # many spans (vector, bytes), one span
def test_cuda_blend_of_large_pairs_matches_the_cpu(d: int) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, d), dtype=np.uint8)
    dst, src = np.array([0, 1, 2]), np.array([3, 4, 5])
    eps = rng.uniform(0.0, 1.0, 3)
    want = images.copy()
    ops.blend_(want, dst, src, eps)
    got = torch.from_numpy(images).to(DEV)
    ops.blend_(got, torch.from_numpy(dst).to(DEV), torch.from_numpy(src).to(DEV), torch.from_numpy(eps).to(DEV))
    assert np.array_equal(got.cpu().numpy(), want)
    with pytest.raises(IndexError, match="^1 summary pair"):  # a bad pair counted once, not once per span
        ops.blend_(
            got,
            torch.tensor([0, 9], device=DEV),
            torch.tensor([3, 4], device=DEV),
            torch.tensor([0.5, 0.5], dtype=torch.float64, device=DEV),
            check=False,
        )


@pytest.mark.needs_cuda
def test_cuda_bool_mask_with_an_empty_sequence_is_refused_or_counted() -> None:
    lg = torch.randn(2, 3, 4, device=DEV)
    mask = torch.tensor([[True, True, False], [False, False, False]], device=DEV)
    idx = torch.tensor([0, 1], device=DEV)
    sums, counts = _bank(2, DEV)
    with pytest.raises(ValueError, match="mask row 1 .* no unmasked token"):
        ops.observe_entropy_seq(lg, mask, idx, sums, counts)
    assert not counts.any()
    errors = torch.zeros(2, dtype=torch.int64, device=DEV)
    ops.observe_entropy_seq(lg, mask, idx, sums, counts, errors=errors)
    assert errors.tolist() == [0, 1] and counts.tolist() == [1, 0]


@pytest.mark.needs_cuda
def test_fallback_bf16_and_denormal_rows_match_the_compiled_module() -> None:
    from kcd_fast import _arrays as A
    from kcd_fast._ext import _cuda

    if _cuda is None:
        pytest.skip("the compiled module is what the fallback is compared with")
    _nvrtc_or_skip()
    rows = torch.tensor([[0.0, -88.0, -90.0], [0.0, -95.0, -100.0], [0.0, -104.0, -87.5], [1.0, 2.0, 3.0]])
    stream = torch.cuda.current_stream().cuda_stream
    for dtype in (torch.float32, torch.bfloat16):
        lg = rows.to(dtype).to(DEV)
        idx = torch.arange(4, device=DEV)
        got = []
        for mod in (_cuda, _rtc.module()):
            s, c = _bank(4, DEV)
            e = torch.zeros(2, dtype=torch.int64, device=DEV)
            scratch = torch.empty(4, dtype=torch.float64, device=DEV)
            mod.observe_entropy(*(A.capsule(t) for t in (lg, idx, s, c, e, scratch)), stream)
            got.append(s.cpu())
        assert torch.equal(got[0], got[1]), (dtype, got)
        assert bool((got[0][:3] > 0).all())  # nvcc keeps the ~1e-40 terms (the fallback flushed them to 0)


@pytest.mark.needs_cuda
def test_an_op_on_gpu_1_opens_no_context_on_gpu_0() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    code = (
        "import torch, kcd_fast\n"
        "from kcd_fast import ops\n"
        "from kcd_fast._ext import _cuda\n"
        "x = torch.randn(4, 8, device='cuda:1')\n"
        "s = torch.zeros(4, dtype=torch.float64, device='cuda:1')\n"
        "c = torch.zeros(4, dtype=torch.int32, device='cuda:1')\n"
        "ops.observe_entropy(x, torch.arange(4, device='cuda:1'), s, c)\n"
        "torch.cuda.synchronize(1)\n"
        "print('CTX0', _cuda.has_primary_context(0), 'CTX1', _cuda.has_primary_context(1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CTX0 False CTX1 True" in out.stdout


def test_the_fallback_keeps_its_ptx_in_the_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nvrtc_or_skip()
    monkeypatch.setenv("KCD_FAST_CACHE_DIR", str(tmp_path))
    path, lowered = _rtc.cached_ptx("compute_80")
    assert path.parent == tmp_path / "rtc" and path.read_text() == _rtc.compile_ptx("compute_80")
    assert set(lowered) == set(_rtc.KERNELS)
    stamp = path.stat().st_mtime_ns
    again, lowered2 = _rtc.cached_ptx("compute_80")  # read back, not compiled again
    assert again == path and lowered2 == lowered and again.stat().st_mtime_ns == stamp
    path.with_suffix(".json").write_text("{not json")  # a broken entry is compiled again
    third, lowered3 = _rtc.cached_ptx("compute_80")
    assert third == path and lowered3 == lowered
    assert _rtc.cached_ptx("compute_75")[0] != path  # one entry per target
