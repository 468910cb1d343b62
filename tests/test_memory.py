"""The cache of large CPU result buffers (kcd_fast.memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _reference as R
from kcd_fast._ext import _cpu


@pytest.fixture
def fresh_cache():
    limit = kcd_fast.memory.cache_limit()
    kcd_fast.memory.empty_cache()
    yield
    kcd_fast.memory.set_cache_limit(limit)
    kcd_fast.memory.empty_cache()


def _values(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 7, n))


def test_released_result_buffer_is_reused_and_results_stay_exact(fresh_cache) -> None:
    n, n_keep = 600_011, 520_000
    v = _values(1, n)
    first = kcd_fast.condense(v, n_keep, n, "low")
    ptr = first.keep.untyped_storage().data_ptr()
    assert kcd_fast.memory.cached_bytes() == 0  # still in use
    del first
    held = kcd_fast.memory.cached_bytes()
    assert held >= 8 * n_keep  # the released buffer waits in the cache
    w = _values(2, n)
    second = kcd_fast.condense(w, n_keep, n, "low")
    assert second.keep.untyped_storage().data_ptr() == ptr  # handed the cached buffer
    assert kcd_fast.memory.cached_bytes() == 0
    ref = R.condense(w.numpy(), n_keep, n, vaks="low")
    for name in ("keep", "dropped", "dst", "src"):
        np.testing.assert_array_equal(getattr(second, name).numpy(), ref[name])
    np.testing.assert_allclose(second.eps.numpy(), ref["eps"], rtol=0, atol=1e-15)


def test_live_results_are_never_handed_out(fresh_cache) -> None:
    n, n_keep = 600_011, 500_000
    a = kcd_fast.condense(_values(3, n), n_keep, n)
    keep_a = a.keep.clone()
    b = kcd_fast.condense(_values(4, n), n_keep, n)
    sa, sb = a.keep.untyped_storage(), b.keep.untyped_storage()
    assert sa.data_ptr() + sa.nbytes() <= sb.data_ptr() or sb.data_ptr() + sb.nbytes() <= sa.data_ptr()
    torch.testing.assert_close(a.keep, keep_a)  # the second call left the first's result alone


def test_cache_limit_and_empty_cache(fresh_cache) -> None:
    n = 600_011
    kcd_fast.condense(_values(5, n), 500_000, n)  # result dropped at once
    held = kcd_fast.memory.cached_bytes()
    assert held > 0
    assert kcd_fast.memory.empty_cache() == held
    assert kcd_fast.memory.cached_bytes() == 0
    assert kcd_fast.memory.set_cache_limit(0) == 256 << 20  # the default limit
    assert kcd_fast.memory.cache_limit() == 0
    kcd_fast.condense(_values(5, n), 500_000, n)
    assert kcd_fast.memory.cached_bytes() == 0  # a zero limit caches nothing
    kcd_fast.memory.set_cache_limit(held)
    kcd_fast.condense(_values(5, n), 500_000, n)
    assert kcd_fast.memory.cached_bytes() == held
    kcd_fast.memory.set_cache_limit(held - 1)  # lowering the limit evicts at once
    assert kcd_fast.memory.cached_bytes() == 0


def test_cache_keeps_at_most_four_buffers(fresh_cache) -> None:
    bufs = [torch.from_dlpack(_cpu.empty_bytes(2 << 20)) for _ in range(6)]
    del bufs
    assert kcd_fast.memory.cached_bytes() == 4 * (2 << 20)


def test_cached_buffer_serves_only_requests_it_fits(fresh_cache) -> None:
    small = torch.from_dlpack(_cpu.empty_bytes(2 << 20))
    ptr = small.data_ptr()
    del small
    big = torch.from_dlpack(_cpu.empty_bytes(6 << 20))  # too big for the cached 2 MiB buffer
    assert big.data_ptr() != ptr and kcd_fast.memory.cached_bytes() == 2 << 20
    tiny = torch.from_dlpack(_cpu.empty_bytes(1))  # rounds up to one 2 MiB page: the cached buffer fits
    assert tiny.data_ptr() == ptr
    del big
    small = torch.from_dlpack(_cpu.empty_bytes(2 << 20))  # the 6 MiB buffer is over twice its size
    assert kcd_fast.memory.cached_bytes() == 6 << 20 and small.data_ptr() != ptr


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
def test_set_cache_limit_refuses_bad_values(fresh_cache, bad) -> None:
    before = kcd_fast.memory.cache_limit()
    with pytest.raises((TypeError, ValueError), match="nbytes must be") as info:
        kcd_fast.memory.set_cache_limit(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    assert kcd_fast.memory.cache_limit() == before


def test_zero_byte_requests_do_not_push_real_buffers_out(fresh_cache) -> None:
    buf = torch.from_dlpack(_cpu.empty_bytes(2 << 20))
    del buf
    for _ in range(5):
        assert torch.from_dlpack(_cpu.empty_bytes(0)).numel() == 0
    assert kcd_fast.memory.cached_bytes() == 2 << 20


def _kernels_in_child(q, v, logits, sums, counts, images, dst, src, eps) -> None:
    # Runs in a forked child: only our kernels (each large enough for OpenMP), then numpy.
    c = kcd_fast.condense(v, 500_000, v.shape[0])
    q.put(int(c.keep.numpy()[:1000].sum()))
    del c
    q.put(kcd_fast.memory.cached_bytes())
    kcd_fast.ops.observe_entropy(logits, torch.arange(logits.shape[0]), sums, counts)
    q.put(float(sums.numpy()[: logits.shape[0]].mean()))
    kcd_fast.ops.blend_(images, dst, src, eps)
    q.put(float(images.numpy()[: dst.shape[0]].mean()))


def test_kernels_run_in_a_forked_child(fresh_cache) -> None:
    # libgomp's pool does not survive fork(): a child opening a team of two threads after the
    # parent used OpenMP would wait forever. Children run the kernels on one thread, and
    # inherit the cache of result buffers.
    import multiprocessing as mp

    n = 600_011
    v = _values(6, n)
    kcd_fast.condense(v, 500_000, n)  # the parent's OpenMP pool is up; a buffer is cached
    assert kcd_fast.memory.cached_bytes() > 0
    images = torch.full((200_000, 8), 100, dtype=torch.uint8)
    images[100_000:] = 200
    args = (
        v,
        torch.zeros(512, 1000),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.int32),
        images,
        torch.arange(100_000),
        torch.arange(100_000, 200_000),
        torch.full((100_000,), 0.5, dtype=torch.float64),
    )
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_kernels_in_child, args=(q, *args))
    p.start()
    try:
        got = [q.get(timeout=60) for _ in range(4)]
    finally:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    ref = R.condense(v.numpy(), 500_000, n)
    assert got[0] == int(ref["keep"][:1000].sum()) and got[1] > 0
    assert got[2] == pytest.approx(np.log(1000.0))  # entropy of uniform logits
    assert got[3] == 150.0


# -- team sizes on busy cores (csrc/cpu/threads.cpp) ---------------------------------------------
def test_team_is_sized_by_free_cores_within_bounds() -> None:
    for want in (1, 2, 3, 8):
        assert 1 <= _cpu.free_cores_team(want) <= want
    assert _cpu.free_cores_team(1) == 1
    # switched off: the full team whatever the load
    code = "from kcd_fast._ext import _cpu; print(_cpu.free_cores_team(7))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "KCD_FAST_LOAD_AWARE": "0"}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "7", out.stderr
