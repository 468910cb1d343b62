"""ValueBank on the CPU: accumulation, values, state round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kcd_fast import ValueBank, condense
from kcd_fast import _reference as R

_GEN = np.random.default_rng(1234)


def randn(*shape: int) -> torch.Tensor:
    return torch.from_numpy(_GEN.standard_normal(shape).astype(np.float32))


def test_bank_accumulates_and_values_match_reference() -> None:
    rng = np.random.default_rng(0)
    bank = ValueBank(20, period=4, alpha=0.05)
    ref_s, ref_c = np.zeros(20), np.zeros(20, np.int32)
    for _ in range(5):
        idx = torch.from_numpy(rng.choice(20, 8, replace=False))
        logits = torch.from_numpy(rng.standard_normal((8, 11)).astype(np.float32) * 3)
        bank.observe(idx, logits)
        R.observe(ref_s, ref_c, idx.numpy(), R.entropy(logits.numpy()))
    np.testing.assert_allclose(bank.sums.numpy(), ref_s, rtol=1e-5)
    np.testing.assert_array_equal(bank.counts.numpy(), ref_c)
    np.testing.assert_allclose(bank.values().numpy(), R.values(ref_s, ref_c, 4, 0.05), rtol=1e-5)
    assert np.isinf(bank.values().numpy()[ref_c == 0]).all()


def test_bank_kl_needs_teacher() -> None:
    bank = ValueBank(4, period=2, measure="kl")
    s = randn(2, 5)
    with pytest.raises(ValueError, match="measure 'kl' needs teacher_logits, got None"):
        bank.observe(torch.tensor([0, 1]), s)
    bank.observe(torch.tensor([0, 1]), s, s * 2)
    assert bank.counts.tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(bank.sums[:2].numpy(), R.kl(s.numpy(), (s * 2).numpy(), 4.0), rtol=1e-5, atol=1e-6)


def test_random_values_resume_the_same_stream() -> None:
    run = ValueBank(20, period=1, measure="random", seed=3)
    run.values()
    state = run.state_dict()
    resumed = ValueBank(20, period=1, measure="random", seed=99)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.values().numpy(), run.values().numpy())


def test_random_values_by_draw_leave_the_stream_alone() -> None:
    bank = ValueBank(30, period=1, measure="random", seed=4)
    at_2 = bank.values(draw=2).numpy()
    np.testing.assert_array_equal(bank.values(draw=2).numpy(), at_2)  # a function of (seed, draw)
    assert bank.state_dict()["random_draws"] == 0  # explicit draws do not advance the counter
    assert not np.array_equal(bank.values(draw=3).numpy(), at_2)
    np.testing.assert_array_equal(bank.values().numpy(), bank.values(draw=0).numpy())  # the counter's first draw
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="draw must be an int >= 0 or None, got"):
            bank.values(draw=bad)


def test_bank_random_is_seeded() -> None:
    a, b = ValueBank(50, period=1, measure="random", seed=7), ValueBank(50, period=1, measure="random", seed=7)
    np.testing.assert_array_equal(a.values().numpy(), b.values().numpy())
    assert not np.array_equal(a.values().numpy(), ValueBank(50, period=1, measure="random", seed=8).values().numpy())


def test_state_dict_round_trip_and_condense_agree() -> None:
    rng = np.random.default_rng(1)
    bank = ValueBank(30, period=3, device=None)
    assert bank.device is None
    bank.observe(torch.arange(10), torch.from_numpy(rng.standard_normal((10, 4)).astype(np.float32)))
    assert bank.device == torch.device("cpu")
    state = bank.state_dict()
    fresh = ValueBank(30, period=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sums, bank.sums) and torch.equal(fresh.counts, bank.counts)
    np.testing.assert_array_equal(condense(fresh.values(), 12).keep.numpy(), condense(bank.values(), 12).keep.numpy())


def test_state_is_a_snapshot() -> None:
    bank = ValueBank(4, period=1)
    state = bank.state_dict()
    bank.observe(torch.tensor([1]), randn(1, 3))
    assert float(state["sums"].sum()) == 0.0 and int(state["counts"].sum()) == 0


def test_load_mismatched_state() -> None:
    state = ValueBank(30, period=3).state_dict()
    with pytest.raises(ValueError, match="holds 30 points but this bank has 31"):
        ValueBank(31, period=3).load_state_dict(state)
    with pytest.raises(ValueError, match="measure = 'entropy' but this bank has 'kl'"):
        ValueBank(30, period=3, measure="kl").load_state_dict(state)
    with pytest.raises(KeyError, match="missing"):
        ValueBank(30, period=3).load_state_dict({"n": 30})


def test_bad_observations_change_nothing() -> None:
    bank = ValueBank(5, period=1)
    bank.observe(torch.arange(3), randn(3, 4))
    before = bank.state_dict()
    with pytest.raises(IndexError, match=r"indices\[1\] = 7 is outside \[0, 5\)"):
        bank.observe(torch.tensor([0, 7]), randn(2, 4))
    bad = randn(2, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        bank.observe(torch.tensor([0, 1]), bad)
    after = bank.state_dict()
    assert torch.equal(before["sums"], after["sums"]) and torch.equal(before["counts"], after["counts"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0, "period": 1}, "n must be an int >= 1"),
        ({"n": 5, "period": 0}, "period must be > 0, got 0"),
        ({"n": 5, "period": 1, "measure": "margin"}, "value must be one of 'entropy', 'kl', 'random', got 'margin'"),
        ({"n": 5, "period": 1, "temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
        ({"n": 5, "period": 1, "device": "meta"}, "device must be cpu or cuda, got meta"),
    ],
)
def test_bad_bank_arguments(kwargs, match) -> None:
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        ValueBank(n, **kwargs)


def test_random_measure_checks_its_input() -> None:
    bank = ValueBank(6, period=1, measure="random")
    with pytest.raises(ValueError, match="indices has 5 entries but logits has 3 rows"):
        bank.observe(torch.arange(5), randn(3, 3))
    bad = randn(2, 3)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="row 1 .*non-finite"):
        bank.observe(torch.arange(2), bad)
    with pytest.raises(TypeError, match="logits must have dtype"):
        bank.observe(torch.arange(2), randn(2, 3).double())
    with pytest.raises(IndexError, match=r"indices\[0\] = 9"):
        bank.observe(torch.tensor([9]), randn(1, 3))
    assert int(bank.counts.sum()) == 0
    bank.observe(torch.tensor([1, 1, 4]), randn(3, 3))
    assert bank.counts.tolist() == [0, 2, 0, 0, 1, 0]


def test_malformed_state_changes_nothing_and_empty_state_resets() -> None:
    bank = ValueBank(4, period=1)
    bank.observe(torch.arange(2), randn(2, 3))
    before = bank.state_dict()
    bad = dict(before, random_draws="x")
    with pytest.raises(ValueError, match="random_draws must be an int >= 0, got 'x'"):
        bank.load_state_dict(bad)
    assert torch.equal(bank.sums, before["sums"]) and torch.equal(bank.counts, before["counts"])
    fresh_state = ValueBank(4, period=1, device=None).state_dict()
    assert fresh_state["sums"] is None
    bank.load_state_dict(fresh_state)
    assert int(bank.counts.sum()) == 0 and float(bank.sums.sum()) == 0.0


@pytest.mark.parametrize("seq", [False, True])
def test_a_change_of_the_class_count_is_refused_before_anything_changes(seq: bool) -> None:
    bank = ValueBank(8, period=2)
    idx = torch.arange(4)

    def batch(c: int) -> dict:
        if seq:  # [B, L, V] token logits under a mask: V is fixed the same way
            return {"logits": randn(4, 3, c), "mask": torch.ones(4, 3, dtype=torch.bool)}
        return {"logits": randn(4, c)}

    bank.observe(idx, **batch(10))
    sums, counts = bank.sums.clone(), bank.counts.clone()
    with pytest.raises(
        ValueError, match=r"logits have 5 columns \(shape \(4, (3, )?5\)\) but the first observed logits had 10"
    ):
        bank.observe(idx, **batch(5))
    assert torch.equal(bank.sums, sums) and torch.equal(bank.counts, counts)
    bank.observe(idx, **batch(10))  # the same count still goes in
    # the count travels with the state: a resumed bank refuses the other count too
    again = ValueBank(8, period=2)
    again.load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="first observed logits had 10"):
        again.observe(idx, **batch(5))


def test_a_failed_first_observe_fixes_no_class_count() -> None:
    bank = ValueBank(8, period=2)
    with pytest.raises(IndexError, match="99 is outside"):
        bank.observe(torch.tensor([0, 99]), randn(2, 10))  # a bad index: refused
    assert bank.classes is None
    bank.observe(torch.arange(2), randn(2, 5))  # so 5 classes is the first accepted count
    assert bank.classes == 5


def test_kl_checks_the_class_count_of_the_student() -> None:
    bank = ValueBank(8, period=2, measure="kl")
    bank.observe(torch.arange(2), randn(2, 10), randn(2, 10))
    with pytest.raises(ValueError, match="student_logits have 7 columns"):
        bank.observe(torch.arange(2), randn(2, 7), randn(2, 7))
