"""condense (CPU) against the full-sort numpy oracle: ties, +inf, skewed and ragged sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _reference as R

VAKS = ["low", "high", "random", "off"]


def _compare(values: np.ndarray, n_keep: int, n_prev: int, vaks: str, eps_m: float = 0.7, seed: int = 0) -> None:
    got = kcd_fast.condense(values, n_keep, n_prev, vaks=vaks, eps_m=eps_m, seed=seed)
    ref = R.condense(values, n_keep, n_prev, vaks=vaks, eps_m=eps_m, seed=seed)
    for key in ("keep", "dropped", "dst", "src"):
        np.testing.assert_array_equal(getattr(got, key), ref[key], err_msg=key)
    np.testing.assert_allclose(got.eps, ref["eps"], rtol=0, atol=1e-15)
    assert got.pairs == len(ref["dst"])


def _values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        return rng.uniform(0, 7, n)
    if kind == "ties":  # few distinct values: ranks decided by index
        return rng.integers(0, 4, n).astype(np.float64) * 0.5
    if kind == "inf":  # unobserved points mixed in
        v = rng.exponential(1.0, n)
        v[rng.random(n) < 0.3] = np.inf
        return v
    if kind == "skewed":  # one huge value squeezes every other into one bucket
        v = rng.uniform(0, 1e-6, n)
        v[rng.integers(0, n)] = 1e300
        return v
    if kind == "signed":  # -inf, -0.0 and +0.0 (equal), negatives
        v = rng.standard_normal(n)
        v[rng.random(n) < 0.1] = -0.0
        v[rng.random(n) < 0.1] = 0.0
        v[rng.random(n) < 0.05] = -np.inf
        return v
    raise AssertionError(kind)


@pytest.mark.parametrize("vaks", VAKS)
@pytest.mark.parametrize("kind", ["uniform", "ties", "inf", "skewed", "signed"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 3, 10, 97, 1000, 4099])
def test_condense_matches_reference(vaks: str, kind: str, seed: int, n: int) -> None:
    rng = np.random.default_rng([seed, n])
    values = _values(rng, n, kind)
    n_prev = int(rng.integers(1, n + 1))
    n_keep = int(rng.integers(1, n_prev + 1))
    _compare(values, n_keep, n_prev, vaks, eps_m=float(rng.uniform(0, 1)), seed=seed)


@pytest.mark.parametrize("vaks", VAKS)
def test_condense_edge_counts(vaks: str) -> None:
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, 50)
    for n_keep, n_prev in [(50, 50), (1, 50), (25, 50), (10, 20), (49, 50), (1, 1), (30, 31)]:
        _compare(v, n_keep, n_prev, vaks)


def test_more_dropped_than_kept_pairs_only_n_keep() -> None:
    v = np.arange(10, dtype=np.float64)[::-1].copy()  # pi = 0..9
    c = kcd_fast.condense(v, 3, 10, vaks="low")
    assert c.keep.tolist() == [0, 1, 2] and c.dropped.tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert c.dst.tolist() == [0, 1, 2] and c.src.tolist() == [3, 4, 5]
    np.testing.assert_allclose(c.eps, [1.0, 0.9, 0.8])


def test_docstring_example_and_eps_weights() -> None:
    c = kcd_fast.condense(np.array([0.9, 0.1, np.inf, 0.5, 0.1]), 3)
    assert c.keep.tolist() == [0, 2, 3] and c.dropped.tolist() == [1, 4]
    assert c.dst.tolist() == [0, 3] and c.src.tolist() == [1, 4]
    np.testing.assert_allclose(c.eps, [1.0, 0.85])
    h = kcd_fast.condense(np.array([0.9, 0.1, np.inf, 0.5, 0.1]), 3, vaks="high")
    assert h.dst.tolist() == [2, 0]


def test_random_vaks_is_seeded_and_pairs_kept_points() -> None:
    v = np.random.default_rng(5).uniform(0, 1, 200)
    a = kcd_fast.condense(v, 150, vaks="random", seed=3)
    b = kcd_fast.condense(v, 150, vaks="random", seed=3)
    c = kcd_fast.condense(v, 150, vaks="random", seed=4)
    np.testing.assert_array_equal(a.dst, b.dst)
    assert not np.array_equal(a.dst, c.dst)
    assert set(a.dst.tolist()) <= set(a.keep.tolist()) and len(set(a.dst.tolist())) == 50
    assert np.all(a.eps == 0.7)


def test_torch_input_gives_torch_output_and_float32_is_accepted() -> None:
    v = torch.rand(100, generator=torch.Generator().manual_seed(0))
    c = kcd_fast.condense(v, 60)
    assert isinstance(c.keep, torch.Tensor) and c.keep.dtype == torch.int64
    ref = R.condense(v.double().numpy(), 60)
    np.testing.assert_array_equal(c.keep.numpy(), ref["keep"])


def test_large_n_matches_reference() -> None:
    rng = np.random.default_rng(11)
    n = 300_007
    v = rng.gamma(2.0, 1.0, n)
    v[:1000] = np.inf
    kc = kcd_fast.CondensationSchedule(240, 40).keep_counts(n)
    _compare(v, kc[0], n, "low")
    _compare(v, kc[3], kc[2], "low")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n_keep": 0}, ValueError, r"n_keep must be in \[1, n_prev = 10\], got 0"),
        ({"n_keep": 11}, ValueError, r"n_keep must be in \[1, n_prev = 10\], got 11"),
        ({"n_keep": 6, "n_prev": 5}, ValueError, r"n_keep must be in \[1, n_prev = 5\], got 6"),
        ({"n_keep": 3, "n_prev": 12}, ValueError, r"n_prev must be in \[1, N = 10\], got 12"),
        ({"n_keep": 3.0}, TypeError, r"n_keep must be an int, got float 3.0"),
        (
            {"n_keep": 3, "vaks": "middle"},
            ValueError,
            r"vaks must be one of 'low', 'high', 'random', 'off', got 'middle'",
        ),
        ({"n_keep": 3, "eps_m": 1.5}, ValueError, r"eps_m must be in \[0, 1\], got 1.5"),
    ],
)
def test_condense_bad_arguments(kwargs, exc, match) -> None:
    v = np.linspace(0, 1, 10)
    before = v.copy()
    with pytest.raises(exc, match=match):
        kcd_fast.condense(v, **kwargs)
    np.testing.assert_array_equal(v, before)


def test_condense_bad_values() -> None:
    with pytest.raises(ValueError, match=r"values\[2\] is nan"):
        kcd_fast.condense(np.array([1.0, 2.0, np.nan, 0.0]), 2)
    with pytest.raises(ValueError, match="values is empty"):
        kcd_fast.condense(np.zeros(0), 1)
    with pytest.raises(TypeError, match="values must be a floating dtype, got int64"):
        kcd_fast.condense(np.arange(4), 2)
    with pytest.raises(ValueError, match=r"values must be 1-D \[N\]"):
        kcd_fast.condense(np.zeros((2, 2)), 1)


# ---- The sample selection at sizes that use threads, the radix sort and both ISAs ------

from kcd_fast import _cpu  # noqa: E402

ISAS = ["generic", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test under each compaction kernel the CPU has, then restores "auto"."""
    try:
        _cpu.set_condense_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    _cpu.set_condense_isa("auto")


def test_isa_names_and_bad_isa() -> None:
    assert _cpu.condense_isa() in ("avx512", "avx2", "generic")
    assert kcd_fast.build_info()["cpu_condense_isa"] == _cpu.condense_isa()
    with pytest.raises(ValueError, match="isa must be 'auto', 'generic', 'avx2' or 'avx512', got 'sse9'"):
        _cpu.set_condense_isa("sse9")


@pytest.mark.parametrize("vaks", VAKS)
@pytest.mark.parametrize("kind", ["uniform", "ties", "inf", "skewed", "signed"])
@pytest.mark.parametrize("n", [70_001, 262_147])
def test_condense_large_matches_reference(isa: str, vaks: str, kind: str, n: int) -> None:
    rng = np.random.default_rng(n + len(kind))
    v = _values(rng, n, kind)
    for _ in range(2):
        n_prev = int(rng.integers(n // 2, n + 1))
        n_keep = int(rng.integers(1, n_prev + 1))
        _compare(v, n_keep, n_prev, vaks, seed=int(rng.integers(0, 100)))
    _compare(v, n - 1, n, vaks)  # one dropped point
    _compare(v, n, n, vaks)  # nothing dropped


def _sampled(n: int) -> np.ndarray:
    """The positions the CPU condense samples (512 cache lines of 8 values, evenly spread)."""
    mask = np.zeros(n, dtype=bool)
    for j in range(512):
        mask[n * j // 512 : n * j // 512 + 8] = True
    return mask


def _misleading(n: int, seed: int, bulk: float, spread: float) -> np.ndarray:
    """Sampled points uniform over [0, 1); every other point within `spread` above `bulk`."""
    rng = np.random.default_rng(seed)
    v = bulk + spread * rng.random(n)
    s = _sampled(n)
    v[s] = rng.random(s.sum())
    return v


def test_condense_recovers_from_a_misleading_sample(isa: str) -> None:
    # The sampled points spread over [0, 1); every other point sits near 0.9, so the
    # zone predicted for rank 2n/3 misses it: the pass repeats with widened zones.
    n = 200_003
    v = _misleading(n, 5, 0.9, 1e-3)
    for vaks in VAKS:
        _compare(v, 2 * n // 3, n, vaks)
        assert _cpu.last_condense_stats()["passes"] == 2
    _compare(v, n // 3, 2 * n // 3, "high")
    _compare(v, n // 2, n, "low")  # wants every rank: one pass


def test_condense_recopies_when_the_predicted_zone_overflows(isa: str) -> None:
    # The sample says few points lie near the median; in fact almost all do, so the copy
    # made during the pass runs out of room and the members are copied again.
    n = 200_003
    v = _misleading(n, 6, 0.5, 1e-9)
    _compare(v, n // 2, n, "off")  # wants ranks around n/2: the zone holds 0.5
    stats = _cpu.last_condense_stats()
    assert stats["recopied"] and stats["passes"] == 1 and stats["members"] > n // 2


def test_condense_sorts_only_near_the_wanted_ranks() -> None:
    rng = np.random.default_rng(7)
    n = 1_000_003
    v = rng.uniform(0, 7, n)
    n_keep = int(0.94 * n)
    kcd_fast.condense(v, n_keep, n, "low")
    stats = _cpu.last_condense_stats()
    wanted = 2 * (n - n_keep)  # the dropped points and their partners
    assert stats["passes"] == 1 and not stats["recopied"]
    assert wanted <= stats["members"] < wanted + n // 20


def test_condense_refuses_more_than_2_pow_32_points() -> None:
    huge = torch.zeros(1, dtype=torch.float64).expand(2**32)  # no memory behind it
    with pytest.raises(ValueError, match=r"CPU condense handles N < 2\*\*32 points, got N = 4294967296"):
        kcd_fast.condense(huge, 1)


def test_large_cpu_outputs_share_one_fresh_buffer_and_stay_valid() -> None:
    rng = np.random.default_rng(8)
    n = 600_011
    v = torch.from_numpy(rng.uniform(0, 7, n))
    ref = R.condense(v.numpy(), 500_000, n, vaks="low")
    got = kcd_fast.condense(v, 500_000, n, "low")
    keep, dropped, dst, src, eps = got.keep, got.dropped, got.dst, got.src, got.eps
    # Over 4 MB of outputs: one huge-page buffer, five views of it.
    assert keep.untyped_storage().data_ptr() == eps.untyped_storage().data_ptr()
    del got
    for t in (keep, dst, src, eps):  # other views still alive after the rest are gone
        assert t.is_contiguous() and t.device.type == "cpu"
    np.testing.assert_array_equal(keep.numpy(), ref["keep"])
    np.testing.assert_array_equal(dropped.numpy(), ref["dropped"])
    np.testing.assert_array_equal(dst.numpy(), ref["dst"])
    np.testing.assert_allclose(eps.numpy(), ref["eps"], rtol=0, atol=1e-15)
    keep[:] = -1  # writable, and writing one view leaves the others intact
    np.testing.assert_array_equal(src.numpy(), ref["src"])


def test_empty_bytes() -> None:
    buf = torch.from_dlpack(_cpu.empty_bytes(5 << 20))
    assert buf.shape == (5 << 20,) and buf.dtype == torch.uint8
    buf.fill_(7)
    assert int(buf[-1]) == 7
    assert torch.from_dlpack(_cpu.empty_bytes(0)).numel() == 0
    _cpu.empty_bytes(1 << 20)  # never consumed: the capsule frees it
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        _cpu.empty_bytes(-1)


@pytest.mark.parametrize("env", [{"OMP_THREAD_LIMIT": "1", "OMP_NUM_THREADS": "2"}, {"OMP_DYNAMIC": "true"}])
def test_condense_when_openmp_grants_fewer_threads(env: dict[str, str]) -> None:
    # Every parallel loop runs a fixed number of chunks, whatever team OpenMP grants.
    code = """
import numpy as np, kcd_fast
from kcd_fast import _reference as R
rng = np.random.default_rng(3)
v = rng.uniform(0, 7, 300_007)
for n_keep, n_prev, vaks in ((150_000, 225_000, "low"), (250_000, 300_007, "high"), (100_000, 300_007, "off")):
    got = kcd_fast.condense(v, n_keep, n_prev, vaks)
    ref = R.condense(v, n_keep, n_prev, vaks=vaks)
    for key in ("keep", "dropped", "dst", "src"):
        np.testing.assert_array_equal(getattr(got, key), ref[key])
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_condense_with_an_outlier_keeps_keys_spread() -> None:
    # One -1e300 among values of order 1 at a sampled position: the keys still spread (the
    # zone's stand-in range leaves out the sample's extremes), and the result is exact.
    rng = np.random.default_rng(9)
    n = 400_009
    v = rng.uniform(0, 1, n)
    v[0] = -1e300
    v[_sampled(n).nonzero()[0][100]] = 1e300
    for vaks in ("off", "high"):
        _compare(v, n // 2, n, vaks)
