"""A saved state records the options that decide an epoch's batches (kcd_fast.loader.order):
a state for another configuration is refused, naming the option and both values, before
anything changes; between epochs the batch size may change, and the run then continues
exactly. One process, 60 points (tests/test_distributed.py's data and student)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kcd_fast import ArrayDataset, KCDLoader

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import SCHED, STOP, Model, assert_same_run, make_data, outcome, run  # noqa: E402

N = 60
MID = 2


def kwargs(**kw: Any) -> dict[str, Any]:
    return {"batch_size": 4, "shuffle": True, "seed": 7, "drop_last": False, **kw}


def mid_epoch_state(**kw: Any) -> dict[str, Any]:
    """The state after STOP epochs and MID observed batches of the next one."""
    ds = ArrayDataset(*make_data(N))
    loader = KCDLoader(ds, SCHED, **kwargs(**kw))
    model = Model(N)
    run(loader, ds, model, STOP)
    it = iter(loader)
    for _ in range(MID):
        _x, _y, idx = next(it)
        loader.observe(idx, model(idx, ds.images))
    state = loader.state_dict()
    assert state["position"] == MID and state["epoch"] == STOP
    return state


def boundary_state(**kw: Any) -> dict[str, Any]:
    ds = ArrayDataset(*make_data(N))
    loader = KCDLoader(ds, SCHED, **kwargs(**kw))
    run(loader, ds, Model(N), STOP)
    state = loader.state_dict()
    assert state["position"] == 0 and state["epoch"] == STOP
    return state


def assert_refused(state: dict[str, Any], match: str, **kw: Any) -> None:
    loader = KCDLoader(ArrayDataset(*make_data(N)), SCHED, **kwargs(**kw))
    before = loader.state_dict()
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)
    after = loader.state_dict()  # nothing changed
    assert after["epoch"] == 0 and after["position"] == 0 and after["summaries"] == []
    assert torch.equal(after["active"], before["active"]) and after["order"] == before["order"]


def test_the_state_records_the_options_that_decide_the_batches() -> None:
    state = boundary_state()
    assert state["order"] == {
        "batch_size": 4,
        "shuffle": True,
        "drop_last": False,
        "seed": 7,
        "world_size": 1,
        "backend": "torch",
        "augment": None,
    }
    loader = KCDLoader(ArrayDataset(*make_data(N)), SCHED, **kwargs(seed=3))
    loader.load_state_dict(state)  # the run's seed continues: it is state
    assert loader.seed == 7 and loader.state_dict()["order"]["seed"] == 7


def test_batch_size_4_to_6_mid_epoch_is_refused() -> None:
    """Accepted silently before: points [0, 7, 12, 13, 16, 19] were never visited that epoch."""
    state = mid_epoch_state()
    assert_refused(
        state,
        r"the state was taken mid-epoch \(after 2 batches of epoch 3\) with batch_size=4, this loader has "
        r"batch_size=6: the batches left of that epoch depend on batch_size",
        batch_size=6,
    )
    assert_refused(state, "with batch_size=4, this loader has batch_size=2", batch_size=2)


@pytest.mark.parametrize(("key", "saved", "mine"), [("shuffle", True, False), ("drop_last", False, True)])
def test_another_order_mid_epoch_is_refused(key: str, saved: bool, mine: bool) -> None:
    assert_refused(
        mid_epoch_state(),
        f"mid-epoch \\(after 2 batches of epoch 3\\) with {key}={saved}, this loader has {key}={mine}: the "
        f"batches left of that epoch depend on {key}",
        **{key: mine},
    )


def test_another_back_end_mid_epoch_is_refused() -> None:
    state = mid_epoch_state()
    assert_refused(state, "with backend='torch', this loader has backend='tensor'", backend="tensor")
    KCDLoader(ArrayDataset(*make_data(N)), SCHED, **kwargs(backend="tensor")).load_state_dict(boundary_state())


def test_another_world_size_mid_epoch_is_refused() -> None:
    state = mid_epoch_state()
    state = {**state, "order": {**state["order"], "world_size": 2}, "world_size": 2}  # as two ranks save it
    assert_refused(state, "with world_size=2, this loader has world_size=1")


def test_a_state_without_a_record_is_checked_as_before() -> None:
    state = mid_epoch_state()
    del state["order"]
    loader = KCDLoader(ArrayDataset(*make_data(N)), SCHED, **kwargs())
    loader.load_state_dict(state)
    assert loader.resume_position == MID
    with pytest.raises(ValueError, match="state order must be a dict"):
        KCDLoader(ArrayDataset(*make_data(N)), SCHED, **kwargs()).load_state_dict({**state, "order": 4})


@pytest.mark.parametrize("change", [{"batch_size": 6}, {"shuffle": False}])
def test_batch_size_or_shuffle_change_between_epochs_exactly(change: dict[str, Any]) -> None:
    """Batch size 4 for STOP epochs, then 6 (or shuffled, then ascending): the same active
    sets, summaries, images and value bank (bit for bit: the student's logits are per row)
    as the uninterrupted run; the epochs after the change are ordered and cut by the new
    options."""
    model = Model(N)
    ds = ArrayDataset(*make_data(N))
    whole = KCDLoader(ds, SCHED, **kwargs())
    full = outcome(whole, ds, run(whole, ds, model, SCHED.epochs))

    state = boundary_state()
    ds = ArrayDataset(*make_data(N))  # the ORIGINAL images
    resumed = KCDLoader(ds, SCHED, **kwargs(**change))
    resumed.load_state_dict(state)
    assert resumed.epoch == STOP and resumed.state_dict()["order"] == {**state["order"], **change}
    got = outcome(resumed, ds, run(resumed, ds, model, SCHED.epochs - STOP))
    bs = change.get("batch_size", 4)
    for e, rec in enumerate(got["epochs"], start=STOP):
        want = full["epochs"][e]
        order = want["order"] if "batch_size" in change else torch.sort(want["order"]).values
        assert torch.equal(rec["order"], order) and torch.equal(rec["seen"], order), e
        assert rec["batches"] == -(-order.numel() // bs)
    assert_same_run(got, full, exact_bank=True)


def test_a_state_with_its_epoch_fully_trained_takes_another_batch_size_exactly() -> None:
    """Taken after the last batch of epoch STOP - 1 was observed, before the loop asked for more
    (Lightning's epoch-end checkpoints): every batch of that epoch was trained and its
    condensation has not run, so it sits between epochs, where batch_size may change; the run
    then continues exactly as the uninterrupted one."""
    model = Model(N)
    ds = ArrayDataset(*make_data(N))
    whole = KCDLoader(ds, SCHED, **kwargs())
    full = outcome(whole, ds, run(whole, ds, model, SCHED.epochs))

    ds = ArrayDataset(*make_data(N))
    loader = KCDLoader(ds, SCHED, **kwargs())
    run(loader, ds, model, STOP - 1)
    it = iter(loader)
    for _ in range(len(loader)):
        _x, _y, idx = next(it)
        loader.observe(idx, model(idx, ds.images))
    state = loader.state_dict()
    assert state["epoch"] == STOP - 1 and state["position"] == len(loader)  # complete, not condensed yet

    ds = ArrayDataset(*make_data(N))  # the ORIGINAL images
    resumed = KCDLoader(ds, SCHED, **kwargs(batch_size=6))
    resumed.load_state_dict(state)
    assert resumed.epoch == STOP - 1  # as saved: its first iterator ends that epoch, empty
    got = outcome(resumed, ds, run(resumed, ds, model, SCHED.epochs - STOP + 1))
    first, *rest = got["epochs"]
    assert first["batches"] == 0
    got["epochs"] = rest
    for e, rec in enumerate(rest, start=STOP):  # what each epoch yielded, in batches of 6
        assert torch.equal(rec["seen"], full["epochs"][e]["seen"]), e
        assert rec["batches"] == -(-rec["seen"].numel() // 6)
    assert_same_run(got, full, exact_bank=True)
