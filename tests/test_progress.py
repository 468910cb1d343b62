"""The loader's model of progress (kcd_fast.loader.progress): an observe names its batch by
its indices, so partial, split and merged observes of a batch count it once, and a mid-epoch
resume after them is exact (indices, images, bank, active set, history, against an
uninterrupted run); observes that arrive after their epoch's condensation warn (strict:
raise) and are never taken for progress of the next epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_epochs import SCHED, assert_same_log, final_state, make_loader, one_ahead
from test_loader import Student, assert_same_state

from kcd_fast import KCDLoader

Observe = Callable[[KCDLoader, torch.Tensor, torch.Tensor], None]


def masked(loader: KCDLoader, idx: torch.Tensor, logits: torch.Tensor) -> None:
    """A partial observe: rows with an 'ignore' label left out (never a whole batch)."""
    keep = idx % 3 != 1
    keep[0] = True
    loader.observe(idx[keep], logits[keep])


def split(loader: KCDLoader, idx: torch.Tensor, logits: torch.Tensor) -> None:
    """One batch observed in two calls."""
    h = idx.shape[0] // 2
    loader.observe(idx[:h], logits[:h])
    loader.observe(idx[h:], logits[h:])


def run(
    loader: KCDLoader,
    student: Student,
    observe: Observe,
    log: list[Any],
    fetch: Callable[[KCDLoader], Any] = iter,
    stop: tuple[int, int] | None = None,
    device: str = "cpu",
) -> dict[str, Any] | None:
    """Trains from the loader's epoch to the end (or until ``stop = (epoch, batches)``
    batches of that epoch were trained; then returns the state)."""
    for e in range(loader.epoch, SCHED.epochs):
        k = loader.resume_position
        for x, _y, idx in fetch(loader):
            if stop is not None and (e, k) == stop:
                return loader.state_dict()
            observe(loader, idx.to(device), student(x).to(device))
            log.append((loader.epoch, idx.clone(), x.clone()))
            k += 1
    return None


@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # the masked-out points: never observed
@pytest.mark.parametrize("observe", [masked, split], ids=["masked", "split"])
@pytest.mark.parametrize("fetch", [iter, one_ahead], ids=["loop", "read_ahead"])
@pytest.mark.parametrize("stop", [(0, 5), (2, 1), (3, 3)])
def test_partial_and_split_observes_resume_exactly(observe: Observe, fetch: Any, stop: tuple[int, int]) -> None:
    ref_log: list[Any] = []
    ref = make_loader()
    run(ref, Student(), observe, ref_log, fetch)
    first, student, log = make_loader(), Student(), []
    state = run(first, student, observe, log, fetch, stop)
    assert state is not None and (state["epoch"], state["position"]) == stop  # the batches trained
    second = make_loader()
    second.load_state_dict(state)
    run(second, student, observe, log, fetch)
    assert_same_log(log, ref_log)
    assert_same_state(final_state(second), final_state(ref))


def test_merged_observes_count_each_batch_once() -> None:
    """Two batches observed in one call (gradient accumulation): both are trained."""
    loader, student = make_loader(), Student()
    it = iter(loader)
    (xa, _, ia), (xb, _, ib) = next(it), next(it)
    loader.observe(torch.cat([ia, ib]), torch.cat([student(xa), student(xb)]))
    assert loader.state_dict()["position"] == 2
    x, _, i = next(it)
    loader.observe(i[:3], student(x)[:3])  # a partial observe of the third
    loader.observe(i[:3], student(x)[:3])  # the same rows again: still one batch
    assert loader.state_dict()["position"] == 3
    assert int(loader.bank.counts.sum()) == int(ia.numel() + ib.numel()) + 6  # every observed row counts


@pytest.mark.needs_cuda
@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")
def test_device_indices_name_their_batches_too() -> None:
    ref_log: list[Any] = []
    ref = make_loader(device="cuda")
    run(ref, Student(), masked, ref_log, one_ahead, device="cuda")
    first, student, log = make_loader(device="cuda"), Student(), []
    state = run(first, student, masked, log, one_ahead, (2, 2), device="cuda")
    assert state is not None and (state["epoch"], state["position"]) == (2, 2)
    second = make_loader(device="cuda")
    second.load_state_dict(state)
    run(second, student, masked, log, one_ahead, device="cuda")
    assert_same_log(log, ref_log)
    assert_same_state(final_state(second), final_state(ref))


# -- late observes ----------------------------------------------------------------------------
def observe_after_the_loop(loader: KCDLoader, student: Student) -> None:
    """A loop that observes its epoch's batches only after the loop (StopIteration has
    already run the condensation before the next epoch)."""
    batches = list(loader)
    for x, _y, idx in batches:
        loader.observe(idx, student(x))


def test_a_late_observe_warns_once_per_epoch_and_is_not_progress() -> None:
    loader, student = make_loader(), Student()
    assert 1 in SCHED.condensation_epochs
    with pytest.warns(UserWarning, match=r"arrived after the condensation before epoch 1 ran") as caught:
        observe_after_the_loop(loader, student)
    late = [w for w in caught if "arrived after the condensation" in str(w.message)]
    assert len(late) == 1  # once per epoch, not per batch
    assert int(loader.bank.counts.sum()) == SCHED.epoch_sizes(97)[0]  # counted: toward the next condensation
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)  # not progress of epoch 1
    assert len(list(loader)) == loader.steps_per_epoch()[1]


def test_a_late_observe_after_len_warns() -> None:
    """A framework that asks len() (which ends the completed epoch) before the last observe."""
    loader, student = make_loader(), Student()
    it = iter(loader)
    for _ in range(len(loader) - 1):
        x, _y, idx = next(it)
        loader.observe(idx, student(x))
    x, _y, idx = next(it)
    with pytest.warns(UserWarning, match="1 of the 97 active points were never observed"):
        len(loader)  # epoch 0 is complete: the condensation before epoch 1 runs now (without the last batch)
    with pytest.warns(UserWarning, match="before epoch 1 ran, before any batch of epoch 1 was yielded"):
        loader.observe(idx, student(x))


def test_strict_refuses_a_late_observe_before_anything_changes() -> None:
    loader, student = make_loader(strict=True), Student()
    for x, _y, idx in loader:
        loader.observe(idx, student(x))
    counts = loader.bank.counts.clone()  # the loop ended: the condensation before epoch 1 ran
    with pytest.raises(ValueError, match="arrived after the condensation before epoch 1 ran"):
        loader.observe(idx, student(x))
    assert torch.equal(loader.bank.counts, counts)


# -- iterators and loads ------------------------------------------------------------------------
def test_an_iterator_made_before_a_load_follows_it() -> None:
    """Lightning makes the loader's iterator before a callback can load a state into it."""
    first, student = make_loader(), Student()
    it = iter(first)
    for _ in range(3):
        x, _y, idx = next(it)
        first.observe(idx, student(x))
    state = first.state_dict()
    second = make_loader()
    made = iter(second)  # not pulled yet
    second.load_state_dict(state)
    assert torch.equal(next(made)[-1], next(it)[-1])  # the 4th batch of epoch 0


# -- accelerate -------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")
@pytest.mark.parametrize("stop", [(1, 2), (2, 0)])  # mid-epoch 1; the start of epoch 2 (after a for loop)
def test_accelerate_save_state_resumes_exactly(tmp_path, stop: tuple[int, int]) -> None:
    """``accelerator.register_for_checkpointing(loader)``: ``save_state`` / ``load_state``
    round-trip the loader (not prepared: it shards itself) like a plain loop's state."""
    accelerate = pytest.importorskip("accelerate")
    ref_log: list[Any] = []
    ref = make_loader()
    run(ref, Student(), masked, ref_log, one_ahead)
    first, student, log = make_loader(), Student(), []
    acc = accelerate.Accelerator(cpu=True)
    acc.register_for_checkpointing(first)
    run(first, student, masked, log, one_ahead, stop)
    acc.save_state(str(tmp_path / "state"))
    second = make_loader()
    acc2 = accelerate.Accelerator(cpu=True)
    acc2.register_for_checkpointing(second)
    acc2.load_state(str(tmp_path / "state"))
    assert (second.epoch, second.resume_position) == stop
    run(second, student, masked, log, one_ahead)
    assert_same_log(log, ref_log)
    assert_same_state(final_state(second), final_state(ref))


def test_a_state_at_an_epochs_end_resumes_at_any_world_size() -> None:
    """A state taken after every batch of its epoch was trained (before the condensation)
    names the epoch's batch count on the world size it was taken at; it is complete on any
    other world size too. One taken mid-epoch resumes only on its own world size."""
    ref_log: list[Any] = []
    ref = make_loader()
    run(ref, Student(), split, ref_log)
    first, student, log = make_loader(), Student(), []
    run(first, student, split, log, stop=(1, 0))
    it = iter(first)
    for _ in range(len(first)):  # exactly len() pulls: no StopIteration, no condensation yet
        x, _y, idx = next(it)
        split(first, idx, student(x))
        log.append((first.epoch, idx.clone(), x.clone()))
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 5)  # 77 points in batches of 16, one rank
    on_two = {**state, "world_size": 2, "position": 3}  # the same moment on 2 ranks: 39 points each
    with pytest.raises(ValueError, match=r"taken mid-epoch \(after 2 batches\) on 2 rank"):
        make_loader().load_state_dict({**on_two, "position": 2})
    second = make_loader()
    second.load_state_dict(on_two)
    assert (second.epoch, second.resume_position, len(second)) == (1, 5, 5)
    run(second, student, split, log)
    assert_same_log(log, ref_log)
    assert_same_state(final_state(second), final_state(ref))
