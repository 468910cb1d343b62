"""CUDA kernels against the CPU kernels and the numpy oracle (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _reference as R
from kcd_fast import ops

pytestmark = pytest.mark.needs_cuda
DEV = "cuda"


def _logits(rng, b, c, scale=5.0):
    return torch.from_numpy((rng.standard_normal((b, c)) * scale).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 3), (256, 1000), (33, 4097), (1000, 10)])
def test_entropy_cuda_matches_cpu_and_reference(dtype, seed, shape) -> None:
    rng = np.random.default_rng(seed)
    b, c = shape
    n = b + 5
    lg = _logits(rng, b, c).to(dtype)
    idx = torch.from_numpy(rng.integers(0, n, size=b))
    s_cpu, c_cpu = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int32)
    ops.observe_entropy(lg, idx, s_cpu, c_cpu)
    s_gpu, c_gpu = s_cpu.new_zeros(n).to(DEV), c_cpu.new_zeros(n).to(DEV)
    ops.observe_entropy(lg.to(DEV), idx.to(DEV), s_gpu, c_gpu)
    np.testing.assert_allclose(s_gpu.cpu().numpy(), s_cpu.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(c_gpu.cpu(), c_cpu)
    ref_s, ref_c = np.zeros(n), np.zeros(n, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), R.entropy(lg.float().numpy()))
    np.testing.assert_allclose(s_gpu.cpu().numpy(), ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(0, 3), (5, 7), (256, 1000)])
def test_kl_cuda_matches_reference(seed, shape) -> None:
    rng = np.random.default_rng(seed)
    b, c = shape
    s, t = _logits(rng, b, c), _logits(rng, b, c, 9)
    idx = torch.arange(b)
    sums, counts = torch.zeros(b, dtype=torch.float64, device=DEV), torch.zeros(b, dtype=torch.int32, device=DEV)
    ops.observe_kl(s.to(DEV), t.to(DEV), idx.to(DEV), sums, counts, temperature=4.0)
    np.testing.assert_allclose(sums.cpu().numpy(), R.kl(s.numpy(), t.numpy(), 4.0), rtol=1e-5, atol=1e-5)


def test_cuda_bad_rows_are_skipped_counted_and_raised_by_bank() -> None:
    bank = kcd_fast.ValueBank(10, period=1, device=DEV)
    lg = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(DEV)
    lg[1, 2] = float("nan")
    bank.observe(torch.tensor([0, 1, 2, 12]), lg)  # row 1 non-finite, row 3 out of range
    assert bank.counts.cpu().tolist()[:3] == [1, 0, 1]
    with pytest.raises(ValueError, match="1 observed row\\(s\\) had an index outside .* 1 row\\(s\\) had non-finite"):
        bank.check()
    bank.check()  # cleared
    strict = kcd_fast.ValueBank(10, period=1, device=DEV, strict=True)
    with pytest.raises(IndexError, match=r"indices\[3\] = 12"):
        strict.observe(torch.tensor([0, 1, 2, 12]), torch.zeros(4, 6, device=DEV))
    assert int(strict.counts.sum()) == 0


def test_raw_cuda_op_without_error_buffer_is_strict() -> None:
    sums, counts = torch.zeros(3, dtype=torch.float64, device=DEV), torch.zeros(3, dtype=torch.int32, device=DEV)
    lg = torch.zeros(2, 4, device=DEV)
    lg[0, 0] = float("inf")
    with pytest.raises(ValueError, match="row 0"):
        ops.observe_entropy(lg, torch.tensor([0, 1], device=DEV), sums, counts)
    assert int(counts.sum()) == 0


def test_values_cuda() -> None:
    rng = np.random.default_rng(0)
    sums = torch.from_numpy(rng.uniform(0, 9, 5000))
    counts = torch.from_numpy(rng.integers(0, 9, 5000).astype(np.int32))
    out = ops.values(sums.to(DEV), counts.to(DEV), 40, 0.03)
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), R.values(sums.numpy(), counts.numpy(), 40, 0.03), rtol=1e-12)


@pytest.mark.parametrize("vaks", ["low", "high", "random", "off"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2, 31, 1000, 100_003])
def test_condense_cuda_matches_reference(vaks, seed, n) -> None:
    rng = np.random.default_rng([seed, n])
    v = rng.uniform(0, 5, n)
    v[rng.random(n) < 0.2] = np.inf
    v[rng.random(n) < 0.2] = 1.0  # ties
    v[rng.random(n) < 0.05] = -0.0
    v[rng.random(n) < 0.05] = 0.0
    n_prev = int(rng.integers(1, n + 1))
    n_keep = int(rng.integers(1, n_prev + 1))
    got = kcd_fast.condense(torch.from_numpy(v).to(DEV), n_keep, n_prev, vaks=vaks, seed=seed)
    ref = R.condense(v, n_keep, n_prev, vaks=vaks, seed=seed)
    assert got.keep.is_cuda
    for key in ("keep", "dropped", "dst", "src"):
        np.testing.assert_array_equal(getattr(got, key).cpu().numpy(), ref[key], err_msg=key)
    np.testing.assert_allclose(got.eps.cpu().numpy(), ref["eps"], atol=1e-15)


def test_condense_cuda_rejects_nan() -> None:
    v = torch.tensor([1.0, float("nan"), 2.0], device=DEV, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"values\[1\] is nan"):
        kcd_fast.condense(v, 1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(2, 1), (50, 32, 32, 3), (40, 7, 5), (64, 16)])
def test_blend_cuda_matches_cpu(seed, shape) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    n = shape[0]
    pairs = n // 2
    perm = rng.permutation(n)
    dst, src = perm[:pairs].astype(np.int64), perm[pairs : 2 * pairs].astype(np.int64)
    eps = rng.uniform(0, 1, pairs)
    eps[:1] = 0.5
    expect = R.blend(images, dst, src, eps)
    gpu = torch.from_numpy(images).to(DEV)
    ops.blend_(gpu, torch.from_numpy(dst).to(DEV), torch.from_numpy(src).to(DEV), torch.from_numpy(eps).to(DEV))
    np.testing.assert_array_equal(gpu.cpu().numpy(), expect)


def test_blend_cuda_checks_pairs_before_writing() -> None:
    gpu = torch.arange(12, dtype=torch.uint8, device=DEV).reshape(4, 3)
    before = gpu.clone()
    with pytest.raises(ValueError, match="src and dst overlap"):
        ops.blend_(
            gpu,
            torch.tensor([0, 1], device=DEV),
            torch.tensor([1, 2], device=DEV),
            torch.tensor([0.5, 0.5], device=DEV),
        )
    assert torch.equal(gpu, before)


def test_mixed_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="indices is on cpu but logits is on cuda"):
        ops.observe_entropy(
            torch.zeros(2, 3, device=DEV),
            torch.tensor([0, 1]),
            torch.zeros(2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int32),
        )


def test_bank_follows_first_logits_device_and_round_trips() -> None:
    bank = kcd_fast.ValueBank(8, period=2, device=None)
    bank.observe(torch.tensor([0, 3]), torch.randn(2, 5, generator=torch.Generator().manual_seed(1)).to(DEV))
    assert bank.device.type == "cuda"
    state = bank.state_dict()
    cpu = kcd_fast.ValueBank(8, period=2)
    cpu.load_state_dict(state)
    np.testing.assert_allclose(cpu.values().numpy(), bank.values().cpu().numpy(), rtol=1e-12)


def test_cupy_arrays_cross_through_dlpack() -> None:
    """cupy arrays work as they are (DLPack), results come back as cupy arrays."""
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(4)
    sums = cp.asarray(rng.uniform(0, 5, 1000))
    counts = cp.asarray(rng.integers(0, 5, 1000).astype(np.int32))
    v = ops.values(sums, counts, 10, 0.03)
    assert isinstance(v, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(v), R.values(cp.asnumpy(sums), cp.asnumpy(counts), 10, 0.03), rtol=1e-12)
    c = kcd_fast.condense(v, 600)
    assert isinstance(c.keep, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(c.keep), R.condense(cp.asnumpy(v), 600)["keep"])
    images = cp.asarray(rng.integers(0, 256, (1000, 12), dtype=np.uint8))
    expect = R.blend(cp.asnumpy(images), cp.asnumpy(c.dst), cp.asnumpy(c.src), cp.asnumpy(c.eps))
    ops.blend_(images, c.dst, c.src, c.eps)
    np.testing.assert_array_equal(cp.asnumpy(images), expect)


@pytest.mark.parametrize("variant", [("entropy_batch", 4), ("blend_per_thread", 4)])
def test_kernel_variants_match_the_defaults(variant) -> None:
    from kcd_fast._ext import _cuda

    name, value = variant
    rng = np.random.default_rng(3)
    for b, c, d in [(3, 7, 16), (65, 1000, 3072), (33, 4099, 48 * 48 * 3)]:
        for dtype in (torch.float32, torch.float16):
            logits = _logits(rng, b, c).to(dtype).to(DEV)
            idx = torch.from_numpy(rng.integers(0, 50, b)).to(DEV)
            images = torch.from_numpy(rng.integers(0, 256, (40, d), dtype=np.uint8))
            dst, src = torch.tensor([1, 5, 7, 30]), torch.tensor([2, 3, 9, 0])
            eps = torch.tensor([0.9, 0.8, 0.7, 0.55], dtype=torch.float64)
            expected = images.clone()
            ops.blend_(expected, dst, src, eps)  # the CPU kernel
            results = []
            for v in (1, value):
                _cuda.set_variant(name, v)
                try:
                    sums = torch.zeros(50, dtype=torch.float64, device=DEV)
                    counts = torch.zeros(50, dtype=torch.int32, device=DEV)
                    ops.observe_entropy(logits, idx, sums, counts)
                    img = images.to(DEV)
                    ops.blend_(img, dst.to(DEV), src.to(DEV), eps.to(DEV))
                    results.append((sums.cpu(), counts.cpu(), img.cpu()))
                finally:
                    _cuda.set_variant(name, 1)
            assert torch.equal(results[0][0], results[1][0])  # the same order of operations
            assert torch.equal(results[0][1], results[1][1])
            assert torch.equal(results[1][2], expected) and torch.equal(results[0][2], expected)


# -- correctness at the edges (the GPU side of tests/test_correctness.py) ---------------------------
def test_ops_leave_the_callers_current_device_alone() -> None:
    last = torch.cuda.device_count() - 1
    x = torch.randn(8, 10, device=f"cuda:{last}")
    sums = torch.zeros(20, dtype=torch.float64, device=x.device)
    counts = torch.zeros(20, dtype=torch.int32, device=x.device)
    images = torch.zeros(20, 12, dtype=torch.uint8, device=x.device)
    torch.cuda.set_device(0)
    ops.observe_entropy(x, torch.arange(8, device=x.device), sums, counts)
    ops.values(sums, counts, 2.0)
    kcd_fast.condense(ops.values(sums, counts, 2.0), 10)
    ops.blend_(
        images,
        torch.tensor([1], device=x.device),
        torch.tensor([2], device=x.device),
        torch.tensor([0.5], device=x.device, dtype=torch.float64),
    )
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("row", [[3e38, -3e38], [1e37, -1e37], [3.4e38, 3.4e38], [1e30, 0.0, -1e30, 5.0]])
def test_extreme_logits_agree_with_the_cpu(row) -> None:
    logits = torch.tensor([row], dtype=torch.float32)
    cpu = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32))
    ops.observe_entropy(logits, torch.tensor([0]), *cpu)
    gpu = (torch.zeros(1, dtype=torch.float64, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV))
    errors = torch.zeros(2, dtype=torch.int64, device=DEV)
    ops.observe_entropy(logits.to(DEV), torch.tensor([0], device=DEV), *gpu, errors=errors)
    assert errors.tolist() == [0, 0] and gpu[1].item() == 1
    assert gpu[0].item() == pytest.approx(cpu[0].item(), abs=1e-6)


def test_strict_false_without_an_errors_buffer_is_refused() -> None:
    logits = torch.randn(4, 5, device=DEV)
    sums = torch.zeros(8, dtype=torch.float64, device=DEV)
    counts = torch.zeros(8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="no errors buffer was given"):
        ops.observe_entropy(logits, torch.arange(4, device=DEV), sums, counts, strict=False)


def test_blend_bounds_guard_skips_counts_and_raises() -> None:
    images = torch.zeros(10, 32, dtype=torch.uint8, device=DEV)
    images[3] = 200
    dst = torch.tensor([1, 12], device=DEV)  # 12 is out of bounds
    src = torch.tensor([3, 4], device=DEV)
    eps = torch.tensor([0.5, 0.5], dtype=torch.float64, device=DEV)
    with pytest.raises(IndexError, match="1 summary pair"):
        ops.blend_(images, dst, src, eps, check=False)
    assert int(images[1, 0]) == 100  # the good pair was blended; nothing written out of bounds


def test_a_device_without_code_is_reported() -> None:
    from kcd_fast._ext import runs_on

    cap = torch.cuda.get_device_capability()
    assert kcd_fast.has_cuda() == runs_on(cap)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("rows", [4096, 5000, 9000])  # one chunk, and rows across chunks (4096 each)
def test_duplicate_indices_add_in_row_order_like_the_cpu(rows: int) -> None:
    """Rows are added to the bank in row order (no float atomics): caller-computed scores with
    heavily repeated indices give the CPU's bits exactly, every run; 4096 rows of one index
    count exactly."""
    g = torch.Generator().manual_seed(rows)
    scores = torch.rand(rows, generator=g, dtype=torch.float64) * 10
    idx = torch.randint(0, 37, (rows,), generator=g)
    want_s, want_c = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.int32)
    ops.observe_scores(scores, idx, want_s, want_c)
    for _ in range(3):
        s = torch.zeros(50, dtype=torch.float64, device="cuda")
        c = torch.zeros(50, dtype=torch.int32, device="cuda")
        ops.observe_scores(scores.cuda(), idx.cuda(), s, c, strict=True)
        assert torch.equal(s.cpu(), want_s) and torch.equal(c.cpu(), want_c)
    same = torch.zeros(4096, dtype=torch.int64, device="cuda")
    logits = torch.randn(4096, 10, generator=g).cuda()
    runs = []
    for _ in range(3):
        s = torch.zeros(3, dtype=torch.float64, device="cuda")
        c = torch.zeros(3, dtype=torch.int32, device="cuda")
        ops.observe_entropy(logits, same, s, c, strict=True)
        runs.append((s.cpu(), c.cpu()))
    assert all(int(r[1][0]) == 4096 and torch.equal(r[0], runs[0][0]) for r in runs)
