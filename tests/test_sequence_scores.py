"""Masked sequence scoring and caller-computed scores: the compiled kernels against the
numpy reference (kcd_fast._reference), bad masks and scores refused with nothing changed,
and the bank / loader surface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kcd_fast import CondensationSchedule, KCDLoader, ValueBank, ops
from kcd_fast import _reference as R

SEEDS = range(5)
SHAPES = [(0, 3, 4), (1, 1, 1), (1, 5, 7), (3, 1, 2), (6, 9, 33), (17, 4, 130), (2, 40, 1031)]


def _bank(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int32)


def _case(seed: int, b: int, length: int, v: int):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy((rng.standard_normal((b, length, v)) * rng.uniform(0.1, 20)).astype(np.float32))
    lens = rng.integers(1, length + 1, size=b)
    mask = np.zeros((b, length), dtype=np.int64)
    for i, n in enumerate(lens):  # ragged: each sequence keeps a random subset of >= 1 tokens
        mask[i, rng.choice(length, size=n, replace=False)] = 1
    n_points = max(1, b + 2)
    idx = torch.from_numpy(rng.integers(0, n_points, size=b))  # repeats included
    return logits, torch.from_numpy(mask), idx, n_points


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
def test_sequence_entropy_matches_reference(seed: int, shape: tuple[int, int, int], mask_dtype) -> None:
    logits, mask, idx, n = _case(seed, *shape)
    sums, counts = _bank(n)
    sums += 0.5
    ops.observe_entropy_seq(logits, mask.to(mask_dtype), idx, sums, counts)
    ref_s, ref_c = np.full(n, 0.5), np.zeros(n, np.int32)
    if shape[0]:
        R.observe(ref_s, ref_c, idx.numpy(), R.sequence_entropy(logits.numpy(), mask.numpy()))
    np.testing.assert_allclose(sums.numpy(), ref_s, rtol=2e-6, atol=2e-6 * max(1, shape[2]))
    np.testing.assert_array_equal(counts.numpy(), ref_c)  # one count per sequence, not per token


def test_masked_tokens_are_never_read() -> None:
    logits, mask, idx, n = _case(0, 4, 6, 5)
    poisoned = logits.clone()
    poisoned[mask == 0] = float("nan")  # padding logits may hold anything
    a, b = _bank(n), _bank(n)
    ops.observe_entropy_seq(logits, mask, idx, *a)
    ops.observe_entropy_seq(poisoned, mask, idx, *b)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sequence_entropy_half_precision(dtype) -> None:
    logits, mask, idx, n = _case(3, 5, 7, 257)
    logits = logits.to(dtype)
    sums, counts = _bank(n)
    ops.observe_entropy_seq(logits, mask, idx, sums, counts)
    ref_s, ref_c = np.zeros(n), np.zeros(n, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), R.sequence_entropy(logits.float().numpy(), mask.numpy()))
    np.testing.assert_allclose(sums.numpy(), ref_s, rtol=1e-5, atol=1e-5)


def _mask_all_zero_row(m):
    m = m.clone()
    m[2] = 0
    return m


def _mask_two(m):
    m = m.clone()
    m[1, 0] = 2
    return m


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (
            lambda lg, m, ix: (lg, _mask_all_zero_row(m), ix),
            ValueError,
            r"mask row 2 \(point \d+\) has no unmasked token",
        ),
        (lambda lg, m, ix: (lg, _mask_two(m), ix), ValueError, r"mask must hold only 0 and 1 .* mask\[1, 0\] = 2"),
        (lambda lg, m, ix: (lg, m[:, :-1], ix), ValueError, r"mask must be \[B, L\] = \[4, 6\] .* got \(4, 5\)"),
        (lambda lg, m, ix: (lg, m[0], ix), ValueError, r"mask must be \[B, L\] = \[4, 6\] .* got \(6,\)"),
        (lambda lg, m, ix: (lg, m.to(torch.complex64), ix), TypeError, r"mask must be bool, integer or floating"),
        (lambda lg, m, ix: (lg[:, 0], m, ix), ValueError, r"logits must be 3-D \[B, L, V\]"),
        (lambda lg, m, ix: (lg, m, ix[:3]), ValueError, r"indices has 3 entries but logits has 4 rows"),
        (lambda lg, m, ix: (lg, m, ix + 100), IndexError, r"indices\[0\] = \d+ is outside \[0, 6\)"),
        (lambda lg, m, ix: (_inf_at_unmasked(lg, m), m, ix), ValueError, r"logits row \d+ .*non-finite"),
    ],
)
def test_bad_masks_and_logits_change_nothing(mutate, exc, match) -> None:
    logits, mask, idx, n = _case(1, 4, 6, 5)
    sums, counts = _bank(n)
    ops.observe_entropy_seq(logits, mask, idx, sums, counts)  # some state to keep
    before = sums.clone(), counts.clone()
    lg, m, ix = mutate(logits, mask, idx)
    with pytest.raises(exc, match=match):
        ops.observe_entropy_seq(lg, m, ix, sums, counts)
    assert torch.equal(sums, before[0]) and torch.equal(counts, before[1])


def _inf_at_unmasked(lg, m):
    lg = lg.clone()
    b, t = (int(v) for v in m.nonzero()[-1])
    lg[b, t, 0] = float("inf")
    return lg


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("b", [0, 1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_observe_scores_matches_reference(seed: int, b: int, dtype) -> None:
    rng = np.random.default_rng(seed)
    n = b // 3 + 2
    scores = torch.from_numpy(rng.standard_normal(b) * 10).to(dtype)
    idx = torch.from_numpy(rng.integers(0, n, size=b))
    sums, counts = _bank(n)
    ops.observe_scores(scores, idx, sums, counts)
    ref_s, ref_c = np.zeros(n), np.zeros(n, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), scores.double().numpy())
    np.testing.assert_allclose(sums.numpy(), ref_s, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), ref_c)


@pytest.mark.parametrize(
    "scores, idx, exc, match",
    [
        ([1.0, float("nan")], [0, 1], ValueError, r"scores row 1 \(point 1\) holds a non-finite value"),
        ([1.0, 2.0], [0, 9], IndexError, r"indices\[1\] = 9 is outside \[0, 4\)"),
        ([[1.0, 2.0]], [0, 1], ValueError, r"scores must be 1-D \[B\]"),
        ([True, False], [0, 1], TypeError, r"scores must be real numbers .* got bool"),
        ([1.0, 2.0, 3.0], [0, 1], ValueError, r"indices has 2 entries but scores has 3 rows"),
    ],
)
def test_bad_scores_change_nothing(scores, idx, exc, match) -> None:
    sums, counts = _bank(4)
    with pytest.raises(exc, match=match):
        ops.observe_scores(torch.tensor(scores), torch.tensor(idx), sums, counts)
    assert not sums.any() and not counts.any()


def test_bank_and_loader_take_masks_and_scores() -> None:
    logits, mask, idx, n = _case(2, 5, 4, 9)
    bank = ValueBank(n, period=2)
    bank.observe(idx, logits, mask=mask)
    ref_s, ref_c = np.zeros(n), np.zeros(n, np.int32)
    R.observe(ref_s, ref_c, idx.numpy(), R.sequence_entropy(logits.numpy(), mask.numpy()))
    np.testing.assert_allclose(bank.sums.numpy(), ref_s, rtol=2e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, L, V\] token logits need mask=\[B, L\]"):
        bank.observe(idx, logits)
    with pytest.raises(ValueError, match="measure 'kl' scores \\[B, C\\] rows and takes no mask"):
        ValueBank(n, period=2, measure="kl").observe(idx, logits, logits, mask=mask)
    rnd = ValueBank(n, period=2, measure="random")
    rnd.observe(idx, logits, mask=mask)
    rnd.observe_scores(idx, torch.ones(5))
    np.testing.assert_array_equal(rnd.counts.numpy(), 2 * ref_c)
    assert not rnd.sums.any()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int):
            return torch.full((4,), i), i % 3

    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    first = sched.condensation_epochs[0]
    loader = KCDLoader(Tokens(), sched, batch_size=5, seed=0)
    scored: set[int] = set()
    for _ in range(first):
        for x, _y, i in loader:
            scored |= set(i[:2].tolist())
            loader.observe_scores(i[:2], -x[:2, 0].double())  # higher index: lower value
            loader.observe(i[2:], torch.randn(len(i) - 2, 4, 3), mask=torch.ones(len(i) - 2, 4))
    assert loader.epoch == first and loader.history[0]["epoch"] == first
    # the sequences' entropies are all > 0 > every score: the scored points are the ones dropped
    dropped = set(range(12)) - set(loader.active_indices.tolist())
    n_drop = 12 - sched.epoch_sizes(12)[first]
    assert dropped == set(sorted(scored)[-n_drop:])  # the most negative scores: the highest indices


def test_non_image_uint8_data_is_never_blended() -> None:
    class TokenIds(torch.utils.data.Dataset):  # uint8 token ids [N, L] with targets: not images
        def __init__(self) -> None:
            self.data = np.arange(40 * 6, dtype=np.uint8).reshape(40, 6)
            self.targets = [i % 2 for i in range(40)]

        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int):
            return torch.from_numpy(self.data[i].astype(np.int64)), self.targets[i]

    ds = TokenIds()
    before = ds.data.copy()
    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    loader = KCDLoader(ds, sched, batch_size=8, shuffle=True, seed=0)
    assert loader.vaks.value == "off" and loader.images is None
    for _ in range(sched.epochs):
        for _x, _y, i in loader:
            loader.observe(i, torch.randn(len(i), 2))
    assert loader.history and all(h["pairs"] == 0 or loader.vaks.value == "off" for h in loader.history)
    np.testing.assert_array_equal(ds.data, before)
    with pytest.raises(ValueError, match=r"TokenIds.data has shape \(40, 6\), not images"):
        KCDLoader(ds, sched, batch_size=8, vaks="low")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sequence_entropy_cuda_matches_cpu(seed: int, shape, dtype) -> None:
    logits, mask, idx, n = _case(seed, *shape)
    logits = logits.to(dtype)
    cpu = _bank(n)
    ops.observe_entropy_seq(logits, mask, idx, *cpu)
    gpu = tuple(t.cuda() for t in _bank(n))
    errors = torch.zeros(2, dtype=torch.int64, device="cuda")
    ops.observe_entropy_seq(logits.cuda(), mask.cuda(), idx.cuda(), *gpu, errors=errors)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and not errors.any()


@pytest.mark.needs_cuda
def test_cuda_bad_sequences_and_scores_are_counted_not_written() -> None:
    logits, mask, idx, n = _case(4, 4, 6, 5)
    mask = mask.clone()
    mask[0] = 0  # no unmasked token
    mask[1, 0] = 3  # not 0 / 1
    idx = idx.clone()
    idx[2] = n + 5  # bad index
    sums, counts = (t.cuda() for t in _bank(n))
    errors = torch.zeros(2, dtype=torch.int64, device="cuda")
    ops.observe_entropy_seq(logits.cuda(), mask.cuda(), idx.cuda(), sums, counts, errors=errors, strict=False)
    assert errors.tolist() == [1, 2] and int(counts.sum()) == 1
    ops.observe_scores(
        torch.tensor([1.0, float("inf")], device="cuda"),
        torch.tensor([0, 1], device="cuda"),
        sums,
        counts,
        errors=errors,
        strict=False,
    )
    assert errors.tolist() == [1, 3] and int(counts.sum()) == 2
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .* mask\[1, 0\] = 3"):
        ops.observe_entropy_seq(logits.cuda(), mask.cuda(), idx.cuda(), sums, counts)  # strict by default
    mask[1, 0] = 1  # the bad value mended: the empty sequence 0 is what strict refuses next
    with pytest.raises(ValueError, match="no unmasked token"):
        ops.observe_entropy_seq(logits.cuda(), mask.cuda(), idx.cuda(), sums, counts)
    with pytest.raises(ValueError, match="mask row 0 .* no unmasked token"):  # a bool mask too (it skipped the check)
        ops.observe_entropy_seq(logits.cuda(), mask.cuda().bool(), idx.cuda(), sums, counts)
    assert errors.tolist() == [1, 3] and int(counts.sum()) == 2  # nothing changed, nothing counted
