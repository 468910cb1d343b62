"""Scoring, value and blend kernels (CPU) against the numpy oracle in kcd_fast._reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _reference as R
from kcd_fast import ops

SEEDS = range(6)
SHAPES = [(0, 5), (1, 1), (1, 7), (3, 2), (17, 10), (64, 1000), (5, 1031), (130, 33)]


def _bank(n: int):
    return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int32)


def _logits(rng: np.random.Generator, b: int, c: int, scale: float = 5.0) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal((b, c)) * scale).astype(np.float32))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_observe_entropy_matches_reference(seed: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    b, c = shape
    n = max(1, b // 2 + 3)
    logits = _logits(rng, b, c, scale=rng.uniform(0.1, 30))
    idx = torch.from_numpy(rng.integers(0, n, size=b))  # repeats included
    sums, counts = _bank(n)
    sums += 0.25  # accumulate on top of existing state
    ops.observe_entropy(logits, idx, sums, counts)
    ref_s, ref_c = np.full(n, 0.25), np.zeros(n, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), R.entropy(logits.numpy()))
    np.testing.assert_allclose(sums.numpy(), ref_s, rtol=2e-6, atol=2e-6 * max(1, c))
    np.testing.assert_array_equal(counts.numpy(), ref_c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_observe_entropy_half_precision(dtype: torch.dtype, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = _logits(rng, 33, 257).to(dtype)
    idx = torch.arange(33)
    sums, counts = _bank(33)
    ops.observe_entropy(logits, idx, sums, counts)
    ref = R.entropy(logits.float().numpy())  # the oracle sees the same rounded inputs
    np.testing.assert_allclose(sums.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_saturated_logits_stay_finite_where_naive_entropy_is_nan() -> None:
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0], [88.0, -88.0, 50.0]], dtype=torch.float32)
    p = torch.softmax(logits, dim=1)
    naive = -(p * p.log()).sum(dim=1)
    assert torch.isnan(naive[0])  # what the released code computes
    sums, counts = _bank(3)
    ops.observe_entropy(logits, torch.arange(3), sums, counts)
    assert torch.isfinite(sums).all()
    np.testing.assert_allclose(sums.numpy(), R.entropy(logits.numpy()), atol=1e-6)
    assert abs(float(sums[0])) < 1e-12 and abs(float(sums[1]) - np.log(3)) < 1e-6


def test_observe_entropy_strided_rows_and_numpy_inputs() -> None:
    rng = np.random.default_rng(1)
    big = _logits(rng, 9, 40)
    view = big[:, 5:25]  # rows with stride 40 > C = 20
    sums, counts = np.zeros(12), np.zeros(12, np.int32)
    ops.observe_entropy(view.numpy(), np.arange(9, dtype=np.int64), sums, counts)
    np.testing.assert_allclose(sums[:9], R.entropy(view.numpy()), rtol=2e-6, atol=1e-6)
    assert counts.tolist() == [1] * 9 + [0] * 3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 10), (64, 1000), (31, 77)])
def test_observe_kl_matches_reference(seed: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    b, c = shape
    s, t = _logits(rng, b, c), _logits(rng, b, c, scale=8)
    temp = float(rng.choice([1.0, 4.0, 0.5]))
    idx = torch.from_numpy(rng.integers(0, 5, size=b))
    sums, counts = _bank(5)
    ops.observe_kl(s, t, idx, sums, counts, temperature=temp)
    ref_s, ref_c = np.zeros(5), np.zeros(5, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), R.kl(s.numpy(), t.numpy(), temp))
    np.testing.assert_allclose(sums.numpy(), ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts.numpy(), ref_c)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 70001])
def test_values_matches_reference(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    sums = rng.uniform(0, 50, n)
    counts = rng.integers(0, 40, n).astype(np.int32)
    period, alpha = float(rng.choice([1, 10, 40])), float(rng.choice([0.0, 0.03, 0.1]))
    out = ops.values(sums, counts, period, alpha)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, R.values(sums, counts, period, alpha), rtol=1e-13)
    assert np.isinf(out[counts == 0]).all()
    t = ops.values(torch.from_numpy(sums), torch.from_numpy(counts), period, alpha)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)


def _pairs(rng: np.random.Generator, n: int, pairs: int):
    perm = rng.permutation(n)
    return perm[:pairs].astype(np.int64), perm[pairs : 2 * pairs].astype(np.int64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 4), (2, 1), (9, 3, 5), (40, 8, 8, 3), (33, 32, 32, 3), (6, 17)])
def test_blend_matches_reference(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    n = shape[0]
    pairs = int(rng.integers(0, n // 2 + 1))
    dst, src = _pairs(rng, n, pairs)
    eps = rng.uniform(0, 1, pairs)
    if pairs:
        eps[0] = 0.5  # exact .5 ties: round half up
    expect = R.blend(images, dst, src, eps)
    got = images.copy()
    ops.blend_(got, dst, src, eps)
    np.testing.assert_array_equal(got, expect)
    t = torch.from_numpy(images.copy())
    ops.blend_(t, torch.from_numpy(dst), torch.from_numpy(src), torch.from_numpy(eps).float())
    np.testing.assert_array_equal(t.numpy(), R.blend(images, dst, src, eps.astype(np.float32).astype(np.float64)))


def test_blend_rounds_half_up_and_keeps_eps_one() -> None:
    images = np.array([[0, 1, 255], [1, 2, 0], [7, 7, 7]], dtype=np.uint8)
    ops.blend_(images, np.array([0, 2]), np.array([1, 1]), np.array([0.5, 1.0]))
    assert images.tolist() == [[1, 2, 128], [1, 2, 0], [7, 7, 7]]


# ---------------------------------------------------------------- bad input, nothing changed
def _state():
    rng = np.random.default_rng(3)
    logits = _logits(rng, 4, 6)
    sums, counts = _bank(5)
    sums += torch.arange(5, dtype=torch.float64)
    counts += 1
    return logits, sums, counts


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda lg, ix: (lg, torch.tensor([0, 1, 5, 2])), IndexError, r"indices\[2\] = 5 is outside \[0, 5\)"),
        (lambda lg, ix: (lg, torch.tensor([0, -1, 1, 2])), IndexError, r"indices\[1\] = -1"),
        (
            lambda lg, ix: (lg.index_put((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"))), ix),
            ValueError,
            r"row 3 .*non-finite",
        ),
        (
            lambda lg, ix: (lg.index_put((torch.tensor([1]), torch.tensor([0])), torch.tensor(float("inf"))), ix),
            ValueError,
            r"row 1 .*non-finite",
        ),
        (lambda lg, ix: (lg.double(), ix), TypeError, r"logits must have dtype .* got float64"),
        (lambda lg, ix: (lg, ix.int()), TypeError, r"indices must have dtype int64, got int32"),
        (lambda lg, ix: (lg[0], ix), ValueError, r"logits must be 2-D \[B, C\], got shape \(6,\)"),
        (lambda lg, ix: (lg, ix[:3]), ValueError, r"indices has 3 entries but logits has 4 rows"),
        (lambda lg, ix: ([[1.0]], ix), TypeError, r"logits must be a torch.Tensor"),
    ],
)
def test_observe_entropy_rejects_bad_input_without_changes(mutate, exc, match) -> None:
    logits, sums, counts = _state()
    lg, ix = mutate(logits, torch.tensor([0, 1, 2, 3]))
    before_s, before_c = sums.clone(), counts.clone()
    with pytest.raises(exc, match=match):
        ops.observe_entropy(lg, ix, sums, counts)
    assert torch.equal(sums, before_s) and torch.equal(counts, before_c)


def test_observe_bank_type_and_length_errors() -> None:
    logits, sums, counts = _state()
    with pytest.raises(TypeError, match="sums must have dtype float64, got float32"):
        ops.observe_entropy(logits, torch.arange(4), sums.float(), counts)
    with pytest.raises(TypeError, match="counts must have dtype int32, got int64"):
        ops.observe_entropy(logits, torch.arange(4), sums, counts.long())
    with pytest.raises(ValueError, match="counts has 4 entries but sums has 5"):
        ops.observe_entropy(logits, torch.arange(4), sums, counts[:4])
    with pytest.raises(ValueError, match="sums is updated in place and must be contiguous"):
        ops.observe_entropy(logits, torch.arange(4), torch.zeros(10, dtype=torch.float64)[::2], counts)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        ops.observe_kl(logits, logits, torch.arange(4), sums, counts, temperature=0)
    with pytest.raises(TypeError, match="student_logits is float32 but teacher_logits is float16"):
        ops.observe_kl(logits, logits.half(), torch.arange(4), sums, counts)
    with pytest.raises(ValueError, match=r"student_logits \(4, 6\) and teacher_logits \(4, 5\)"):
        ops.observe_kl(logits, logits[:, :5], torch.arange(4), sums, counts)


def test_observe_kl_rejects_non_finite_teacher_without_changes() -> None:
    logits, sums, counts = _state()
    teacher = logits.clone()
    teacher[2, 3] = float("-inf")
    before = sums.clone()
    with pytest.raises(ValueError, match="row 2"):
        ops.observe_kl(logits, teacher, torch.arange(4), sums, counts)
    assert torch.equal(sums, before) and counts.tolist() == [1] * 5


@pytest.mark.parametrize(
    "dst, src, eps, exc, match",
    [
        ([0, 9], [1, 2], [0.7, 0.8], IndexError, r"dst\[1\] = 9 is outside \[0, 6\)"),
        ([0, 3], [1, -2], [0.7, 0.8], IndexError, r"src\[1\] = -2"),
        ([0, 0], [1, 2], [0.7, 0.8], ValueError, r"dst\[1\] = 0 appears twice"),
        ([0, 3], [3, 2], [0.7, 0.8], ValueError, r"src\[0\] = 3 is also in dst"),
        ([0, 3], [1, 2], [0.7, 1.5], ValueError, r"eps\[1\] = 1.5.* outside \[0, 1\]"),
        ([0, 3], [1, 2], [0.7, float("nan")], ValueError, r"eps\[1\] = nan"),
        ([0, 3], [1], [0.7, 0.2], ValueError, r"dst \(2,\), src \(1,\) and eps \(2,\) must all be \[L\]"),
    ],
)
def test_blend_rejects_bad_pairs_without_changes(dst, src, eps, exc, match) -> None:
    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    before = images.copy()
    with pytest.raises(exc, match=match):
        ops.blend_(images, np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64), np.array(eps))
    np.testing.assert_array_equal(images, before)


def test_blend_type_errors() -> None:
    images = np.zeros((3, 2), np.uint8)
    with pytest.raises(TypeError, match="images must have dtype uint8, got float32"):
        ops.blend_(images.astype(np.float32), np.array([0]), np.array([1]), np.array([0.5]))
    with pytest.raises(TypeError, match="dst must have dtype int64, got int32"):
        ops.blend_(images, np.array([0], np.int32), np.array([1]), np.array([0.5]))
    with pytest.raises(ValueError, match="images is updated in place and must be contiguous"):
        ops.blend_(np.zeros((3, 4), np.uint8)[:, ::2], np.array([0]), np.array([1]), np.array([0.5]))


def test_values_bad_input() -> None:
    with pytest.raises(ValueError, match="period must be > 0, got 0"):
        ops.values(np.zeros(3), np.zeros(3, np.int32), 0)
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        ops.values(np.zeros(3), np.zeros(3, np.int32), 1, float("nan"))
    with pytest.raises(TypeError, match="counts must have dtype int32, got int64"):
        ops.values(np.zeros(3), np.zeros(3, np.int64), 1)


def test_build_info_and_has_cuda() -> None:
    info = kcd_fast.build_info()
    assert {"cuda_compiled", "cuda_archs", "openmp", "version"} <= set(info)
    assert info["version"] == kcd_fast.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        wanted = os.environ.get("KCD_FAST_CUDA_ARCHS", "75-real;80-real;90-real;90-virtual").split(";")
        assert info["cuda_archs"] == wanted
    assert kcd_fast.has_cuda() == (info["cuda_compiled"] and info["cuda_devices"] > 0)


def test_cuda_variant_names_are_checked() -> None:
    from kcd_fast import _ext

    if _ext._cuda is None:
        pytest.skip("built without CUDA")
    with pytest.raises(ValueError, match="variant must be 'entropy_batch' or 'blend_per_thread', got 'x'"):
        _ext._cuda.set_variant("x", 4)
    with pytest.raises(ValueError, match="variant entropy_batch takes 1 or 4, got 3"):
        _ext._cuda.set_variant("entropy_batch", 3)
    with pytest.warns(UserWarning, match="KCD_FAST_CUDA_VARIANTS='bad' ignored .*items are name=value, got 'bad'"):
        _ext._apply_cuda_variants("bad")  # a typo: a warning, the defaults stay
    _ext._apply_cuda_variants("entropy_batch=1, blend_per_thread=1")  # the defaults
