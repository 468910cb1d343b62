"""CUDA ordering and scale (issue: CUDA correctness; run by benchmarks/gpu_check.sh): every op
runs on the caller's current stream (inputs written there after a sleep are the ones it
reads), the value bank orders a second stream after the one it was used on, in-place results
on cupy arrays are ordered back onto cupy's stream, `bank.observe` replays in a CUDA graph,
observe never waits for the host, images over 2**31 bytes and unaligned views blend like the
CPU, strided half-precision logits and -inf rows score like the CPU, condense at N = 2**30
keeps what a stable torch.sort keeps."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import ops

pytestmark = pytest.mark.needs_cuda
SLEEP = int(2e8)  # GPU cycles (~0.1 s): long enough for a wrong-stream read to see stale data


def _cpu_entropy(lg: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, c = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int32)
    ops.observe_entropy(lg.cpu(), idx.cpu(), s, c)
    return s, c


def test_ops_run_on_the_callers_stream() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(64, 10, generator=g)
    idx = torch.randint(0, 20, (64,), generator=g)
    want_s, want_c = _cpu_entropy(real, idx, 20)
    side = torch.cuda.Stream()
    real_dev, idx_dev = real.cuda(), idx.cuda()  # made before: only device-to-device copies below
    src_img = torch.arange(6 * 192, dtype=torch.int64).remainder(251).to(torch.uint8).view(6, 8, 8, 3).cuda()
    pairs = (
        torch.tensor([0, 1], device="cuda"),
        torch.tensor([2, 3], device="cuda"),
        torch.tensor([0.75, 0.8], dtype=torch.float64, device="cuda"),
    )
    err = torch.zeros(2, dtype=torch.int64, device="cuda")
    lg = torch.zeros(64, 10, device="cuda")  # zeros until the side stream writes them, after a sleep
    s = torch.zeros(20, dtype=torch.float64, device="cuda")
    c = torch.zeros(20, dtype=torch.int32, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)
        lg.copy_(real_dev)
        ops.observe_entropy(lg, idx_dev, s, c, errors=err)
        v = ops.values(s, c, 4.0)
        images = torch.zeros_like(src_img)
        images.copy_(src_img)
        ops.blend_(images, *pairs, check=False)
        cond = kcd_fast.condense(v, n_keep=10)
    side.synchronize()
    assert torch.equal(s.cpu(), want_s) or torch.allclose(s.cpu(), want_s, rtol=1e-6, atol=0)
    assert torch.equal(c.cpu(), want_c)
    want_img = torch.arange(6 * 192).remainder(251).to(torch.uint8).view(6, 8, 8, 3).numpy().copy()
    ops.blend_(want_img, np.array([0, 1]), np.array([2, 3]), np.array([0.75, 0.8]))
    assert np.array_equal(images.cpu().numpy(), want_img)
    want_keep = kcd_fast.condense(ops.values(s.cpu(), c.cpu(), 4.0), n_keep=10).keep
    assert torch.equal(cond.keep.cpu(), want_keep)


def test_the_bank_orders_a_second_stream_after_the_first() -> None:
    g = torch.Generator().manual_seed(1)
    real = torch.randn(128, 10, generator=g)
    idx = torch.randint(0, 50, (128,), generator=g)
    want_s, want_c = _cpu_entropy(real, idx, 50)
    bank = kcd_fast.ValueBank(50, period=4, device="cuda")
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    lg, real_dev, idx_dev = torch.zeros(128, 10, device="cuda"), real.cuda(), idx.cuda()
    a.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(SLEEP)
        lg.copy_(real_dev)
        bank.observe(idx_dev, lg)
    with torch.cuda.stream(b):
        v = bank.values()  # must wait for a's observe
        got_counts = bank.counts.clone()
    b.synchronize()
    assert torch.equal(got_counts.cpu(), want_c)
    assert torch.allclose(v.cpu(), ops.values(want_s, want_c, 4.0), rtol=1e-6, atol=0, equal_nan=True)


def test_cupy_accumulators_are_ordered_back_onto_cupys_stream() -> None:
    cupy = pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(2)
    real = torch.randn(256, 10, generator=g)
    idx = torch.randint(0, 30, (256,), generator=g)
    want_s, want_c = _cpu_entropy(real, idx, 30)
    s_cp, c_cp = cupy.zeros(30, dtype=cupy.float64), cupy.zeros(30, dtype=cupy.int32)
    side = torch.cuda.Stream()
    cs = cupy.cuda.Stream(non_blocking=True)
    lg, real_dev, idx_dev = torch.zeros(256, 10, device="cuda"), real.cuda(), idx.cuda()
    err = torch.zeros(2, dtype=torch.int64, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with cs, torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)
        lg.copy_(real_dev)
        ops.observe_entropy(lg, idx_dev, s_cp, c_cp, errors=err)
        total = c_cp.sum()  # on cupy's stream: must wait for the kernel on torch's side stream
    cs.synchronize()
    assert int(total) == int(want_c.sum())
    assert np.allclose(cupy.asnumpy(s_cp), want_s.numpy(), rtol=1e-6, atol=0)


def test_bank_observe_replays_in_a_cuda_graph() -> None:
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(32, 10, generator=g).cuda()
    idx = torch.randint(0, 16, (32,), generator=g).cuda()
    bank = kcd_fast.ValueBank(16, period=4, device="cuda")
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        bank.observe(idx, lg)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bank.observe(idx, lg)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    want_s, want_c = _cpu_entropy(lg, idx, 16)
    # warm-up + 3 replays: work issued inside torch.cuda.graph(...) is recorded, not run
    assert torch.equal(bank.counts.cpu(), 4 * want_c)
    assert torch.allclose(bank.sums.cpu(), 4 * want_s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("pinned", [False, True])
def test_observe_never_waits_for_the_device(pinned: bool) -> None:
    bank = kcd_fast.ValueBank(1000, period=4, device="cuda")
    lg = torch.randn(256, 100, device="cuda")
    idx = torch.randint(0, 1000, (256,))
    if pinned:
        idx = idx.pin_memory()
    bank.observe(idx, lg)  # warm-up (kernels loaded, pool primed)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s queued on the current stream
    t0 = time.perf_counter()
    bank.observe(idx, lg)
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert took < 0.1, f"observe waited {took:.3f} s for the device"


def test_blend_over_2_gib_and_unaligned_views_match_the_cpu() -> None:
    d = (1 << 30) + 7  # two images: 2**31 + 14 bytes, rows not 16-byte multiples
    rng = np.random.default_rng(4)
    host = torch.from_numpy(rng.integers(0, 256, 2 * d + 1, dtype=np.uint8))
    dev = host.cuda()
    images = dev[1:].view(2, d)  # unaligned base pointer
    ops.blend_(
        images,
        torch.tensor([0], device="cuda"),
        torch.tensor([1], device="cuda"),
        torch.tensor([0.7], dtype=torch.float64, device="cuda"),
    )
    want = host[1:].view(2, d).numpy().copy()
    ops.blend_(want, np.array([0]), np.array([1]), np.array([0.7]))
    assert np.array_equal(images.cpu().numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_half_logits_and_inf_rows_score_like_the_cpu(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    wide = (torch.randn(40, 30, generator=g) * 4).to(dtype)
    lg = wide[:, :17]  # row stride 30 > C = 17
    lg[3, 5] = float("-inf")
    idx = torch.arange(40)
    good = torch.ones(40, dtype=torch.bool)
    good[3] = False
    want_s, want_c = _cpu_entropy(lg[good], idx[good], 40)
    s = torch.zeros(40, dtype=torch.float64, device="cuda")
    c = torch.zeros(40, dtype=torch.int32, device="cuda")
    err = torch.zeros(2, dtype=torch.int64, device="cuda")
    ops.observe_entropy(lg.cuda(), idx.cuda(), s, c, errors=err)
    assert err.tolist() == [0, 1]  # the -inf row: skipped and counted as non-finite
    assert torch.equal(c.cpu(), want_c)
    assert torch.allclose(s.cpu(), want_s, rtol=1e-5, atol=1e-6)


def test_condense_at_2_pow_30_keeps_what_a_stable_sort_keeps() -> None:
    n = 1 << 30
    gen = torch.Generator(device="cuda").manual_seed(6)
    v = torch.randint(0, 1 << 20, (n,), device="cuda", generator=gen).to(torch.float64)  # many ties
    n_keep = int(n * 0.7)
    got = kcd_fast.condense(v, n_keep=n_keep, vaks="off")
    order = torch.sort(v, descending=True, stable=True).indices  # value desc, ties by index asc
    want = torch.sort(order[:n_keep]).values
    assert torch.equal(got.keep, want)
