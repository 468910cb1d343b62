"""How KCDLoader's epochs advance in any training loop: exactly len() pulls (Lightning's fit
loop, the HF Trainer), set_epoch, peeks, early breaks, and mid-epoch resume. Every rule is
checked against an uninterrupted run, bit for bit (indices, images, active sets, bank
values); alpha = 1.0 so that an observation counted twice would change the ranking."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from test_loader import Student, assert_same_state, make_arrays

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader

SCHED = CondensationSchedule(epochs=6, period=2, rho=0.5)  # N = 97: sizes [97, 77, 61, 61, 49, 49]
# condensations before epochs 1, 2 and 4; batches of 16: [7, 5, 4, 4, 4, 4]
N, BS = 97, 16


class Jitter:
    """A transform drawing from torch's and numpy's global RNGs (as torchvision and
    albumentations do): flip with p = 0.5, plus noise."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.permute(2, 0, 1).float() / 255.0
        if torch.rand(()) < 0.5:
            x = x.flip(2)
        return x + 0.01 * torch.randn(()) + 0.01 * float(np.random.rand())  # noqa: NPY002


def make_loader(workers: int | str = 0, transform: Any = None, **kw: Any) -> KCDLoader:
    ds = ArrayDataset(*make_arrays(N), transform=transform)
    persistent = workers == "persistent"
    opts: dict[str, Any] = dict(batch_size=BS, shuffle=True, seed=4, alpha=1.0)
    opts.update(num_workers=2 if persistent else int(workers), persistent_workers=persistent)
    opts.update(kw)
    return KCDLoader(ds, SCHED, **opts)


def train_batch(loader: KCDLoader, batch: tuple[Any, ...], student: Student, log: list[Any]) -> None:
    x, _y, idx = batch
    loader.observe(idx, student(x))
    log.append((loader.epoch, idx.clone(), x.clone()))


def run_for_loops(loader: KCDLoader, student: Student) -> list[Any]:
    """The reference: one plain ``for`` loop per epoch (StopIteration ends each epoch)."""
    log: list[Any] = []
    for _ in range(SCHED.epochs):
        for batch in loader:
            train_batch(loader, batch, student, log)
    return log


def assert_same_log(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (ea, ia, xa), (eb, ib, xb) in zip(a, b, strict=True):
        assert ea == eb and torch.equal(ia, ib) and torch.equal(xa, xb)


def final_state(loader: KCDLoader) -> dict[str, Any]:
    len(loader)  # completes an epoch whose last batch was trained (state_dict() changes nothing)
    st = loader.state_dict()
    st["images"] = loader.images.clone()
    return st


@pytest.fixture
def reference() -> tuple[list[Any], dict[str, Any]]:
    loader = make_loader()
    log = run_for_loops(loader, Student())
    return log, final_state(loader)


# -- exactly len() pulls ----------------------------------------------------------------------
@pytest.mark.parametrize("style", ["lightning", "hf", "plain_len"])
def test_exact_len_pulls_advance_like_for_loops(style: str, reference: tuple[list[Any], dict[str, Any]]) -> None:
    """Lightning: ``sampler.set_epoch(e)``, ``iter``, exactly ``len()`` ``next`` calls;
    the HF Trainer: ``loader.set_epoch(e)`` then the same; a plain loop: no set_epoch. No
    StopIteration ever reaches the loader, and every epoch advances and condenses on time."""
    loader, student, log = make_loader(), Student(), []
    lens = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in step: no warning
        for e in range(SCHED.epochs):
            if style == "lightning":
                loader.sampler.set_epoch(e)
                loader.batch_sampler.set_epoch(e)
            elif style == "hf":
                loader.set_epoch(e)
            n = len(loader)
            lens.append(n)
            it = iter(loader)
            for _ in range(n):
                train_batch(loader, next(it), student, log)
    assert lens == loader.steps_per_epoch()
    assert_same_log(log, reference[0])
    assert len(loader) == 0  # len() completes the last epoch (state_dict() changes nothing)
    assert_same_state(final_state(loader), reference[1])
    assert loader.epoch == SCHED.epochs and [h["epoch"] for h in loader.history] == SCHED.condensation_epochs


def test_each_trigger_completes_a_finished_epoch() -> None:
    """After the last batch of epoch 1 was yielded (no StopIteration), the condensation due
    before epoch 2 happens at the first of: iter(), len(), set_epoch(2); state_dict() changes
    nothing: it records epoch 1 with all its batches trained."""
    for trigger in ("iter", "len", "set_epoch", "state_dict"):
        loader, student = make_loader(), Student()
        for batch in loader:  # epoch 0
            train_batch(loader, batch, student, [])
        it = iter(loader)
        for _ in range(len(loader)):
            train_batch(loader, next(it), student, [])
        assert loader.epoch == 1 and len(loader.history) == 1  # not yet: the last batch may still be observed
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if trigger == "iter":
                iter(loader)
            elif trigger == "len":
                assert len(loader) == loader.steps_per_epoch()[2]
            elif trigger == "set_epoch":
                loader.set_epoch(1)  # the same epoch: nothing changes
                assert loader.epoch == 1 and len(loader.history) == 1
                loader.set_epoch(2)
            else:
                state = loader.state_dict()
                assert (state["epoch"], state["position"]) == (1, loader.steps_per_epoch()[1])
                assert loader.epoch == 1 and len(loader.history) == 1
                iter(loader)
        assert loader.epoch == 2 and [h["epoch"] for h in loader.history] == [1, 2], trigger


# -- peeks and early breaks --------------------------------------------------------------------
def test_a_peek_does_not_shift_the_schedule(reference: tuple[list[Any], dict[str, Any]]) -> None:
    loader, student, log = make_loader(), Student(), []
    x, _, idx = next(iter(loader))  # e.g. to build the model: nothing observed
    assert loader.epoch == 0 and loader.state_dict()["position"] == 0
    for e in range(SCHED.epochs):
        if e == 3:
            next(iter(loader))  # a peek between epochs too
        for batch in loader:
            train_batch(loader, batch, student, log)
    assert torch.equal(idx, reference[0][0][1]) and torch.equal(x, reference[0][0][2])
    assert_same_log(log, reference[0])
    assert_same_state(final_state(loader), reference[1])


@pytest.mark.parametrize("how", ["iter", "set_epoch"])
def test_an_early_break_ends_its_epoch_with_a_warning(how: str) -> None:
    """A loop that leaves epoch 1 after 2 batches (observed): the next iterator (or
    set_epoch(2)) warns and moves to epoch 2, condensing with the observations so far;
    the two ways give the same state."""
    states = []
    for way in ("iter", "set_epoch"):
        loader, student = make_loader(), Student()
        for batch in loader:
            train_batch(loader, batch, student, [])
        for k, batch in enumerate(loader):
            train_batch(loader, batch, student, [])
            if k == 1:
                break
        with pytest.warns(UserWarning, match=r"epoch 1 .*2 of its 5 batches"):
            if way == "iter":
                it = iter(loader)
            else:
                loader.set_epoch(2)
                it = iter(loader)
        assert loader.epoch == 2 and [h["epoch"] for h in loader.history] == [1, 2]
        assert int(loader.bank.counts.sum()) == N + 2 * BS
        next(it)
        states.append(loader.state_dict())
    assert_same_state(states[0], states[1])


# -- set_epoch --------------------------------------------------------------------------------
def test_set_epoch_rules() -> None:
    loader, student = make_loader(), Student()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.set_epoch(0)  # the same epoch: nothing
        for batch in loader:
            train_batch(loader, batch, student, [])
        loader.set_epoch(1)  # in step after a for loop: nothing
    assert loader.epoch == 1
    with pytest.warns(UserWarning, match=r"set_epoch\(2\): epoch 1 has yielded 0 of its 5 batches"):
        loader.set_epoch(2)
    assert loader.epoch == 2 and [h["epoch"] for h in loader.history] == [1, 2]
    with pytest.warns(UserWarning, match=r"epoch 2 has yielded 0 .* jumps from epoch 2: epochs 3..4 are skipped"):
        loader.set_epoch(5)
    assert loader.epoch == 5 and [h["epoch"] for h in loader.history] == [1, 2, 4]
    with pytest.raises(ValueError, match=r"epoch must be in \[5, 6\].*got 4"):
        loader.set_epoch(4)
    with pytest.raises(ValueError, match=r"epoch must be in \[5, 6\].*got 7"):
        loader.sampler.set_epoch(7)
    with pytest.raises(TypeError, match="epoch must be an int, got float"):
        loader.set_epoch(5.0)


# -- mid-epoch resume -------------------------------------------------------------------------
def interrupted_run(make: Any, student: Student, stop_epoch: int, stop_batch: int) -> tuple[list[Any], KCDLoader]:
    """Trains until ``stop_batch`` batches of ``stop_epoch`` were observed, saves, builds a
    new loader over the ORIGINAL dataset (``make()``), loads, and trains to the end."""
    first, log = make(), []
    for _ in range(stop_epoch):
        for batch in first:
            train_batch(first, batch, student, log)
    it = iter(first)
    for _ in range(stop_batch):
        train_batch(first, next(it), student, log)
    state = first.state_dict()
    assert state["epoch"] == stop_epoch and state["position"] == stop_batch
    del first, it
    second = make()
    second.load_state_dict(state)
    assert second.epoch == stop_epoch and len(second) == second.steps_per_epoch()[stop_epoch]
    for e in range(stop_epoch, SCHED.epochs):
        got = 0
        for batch in second:
            train_batch(second, batch, student, log)
            got += 1
        assert got == second.steps_per_epoch()[e] - (stop_batch if e == stop_epoch else 0)
    return log, second


@pytest.mark.parametrize("workers", [0, 2, "persistent"])
def test_mid_epoch_resume_yields_exactly_the_remaining_batches(workers: int | str) -> None:
    """Saved after 3 batches of epoch 2 (after a condensation with summaries): the resumed
    loader yields batches 3.. of epoch 2 with the same indices and augmented images, and
    the run ends with the uninterrupted run's images, sets and bank (each observation once)."""
    ref = make_loader(workers, Jitter())
    ref_log = run_for_loops(ref, Student())
    log, resumed = interrupted_run(lambda: make_loader(workers, Jitter()), Student(), 2, 3)
    assert_same_log(log, ref_log)
    assert_same_state(final_state(resumed), final_state(ref))


def test_augmentations_do_not_depend_on_workers() -> None:
    logs = [run_for_loops(make_loader(w, Jitter()), Student()) for w in (0, 2)]
    assert_same_log(logs[0], logs[1])


@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # this test observes nothing
def test_mid_epoch_state_checks() -> None:
    loader, student = make_loader(), Student()
    it = iter(loader)
    train_batch(loader, next(it), student, [])
    state = loader.state_dict()
    assert state["position"] == 1 and state["world_size"] == 1
    for bad, match in ((8, r"position must be an int in \[0, 7\]"), (-1, "position must be"), (True, "position")):
        with pytest.raises(ValueError, match=match):
            make_loader().load_state_dict({**state, "position": bad})
    with pytest.raises(ValueError, match="taken mid-epoch .* on 2 rank"):
        make_loader().load_state_dict({**state, "world_size": 2})
    old = {k: v for k, v in state.items() if k not in ("position", "world_size")}  # a kcd_fast 0.1 state
    fresh = make_loader()
    fresh.load_state_dict(old)
    assert fresh.state_dict()["position"] == 0 and len(list(fresh)) == 7


@pytest.mark.needs_dali
def test_mid_epoch_resume_with_dali_augmentations() -> None:
    def make() -> KCDLoader:
        return make_loader(2, backend="dali", augment="cifar", dali_device=None)

    ref = make()
    ref_log = run_for_loops(ref, Student())
    log, resumed = interrupted_run(make, Student(), 2, 2)
    assert_same_log(log, ref_log)
    assert_same_state(final_state(resumed), final_state(ref))


# -- review cases -------------------------------------------------------------------------------
def test_a_stale_iterator_never_takes_a_batch_of_the_new_one() -> None:
    """With persistent workers the back end's iterator is shared: the stale generator must
    raise before pulling, and the new one's images stay those of its indices."""
    ds = ArrayDataset(*make_arrays(N))
    ds.labels.copy_(torch.arange(N))
    loader = KCDLoader(ds, SCHED, batch_size=BS, shuffle=True, seed=1, num_workers=1, persistent_workers=True)
    it1 = iter(loader)
    next(it1)
    it2 = iter(loader)
    with pytest.raises(RuntimeError, match="made for epoch 0"):
        next(it1)
    for _x, y, idx in it2:
        assert torch.equal(y, idx)
        loader.observe(idx, torch.randn(idx.shape[0], 3))


def one_ahead(loader: KCDLoader) -> Any:
    """A fetcher that reads one batch ahead, as Lightning's and accelerate's do."""
    it = iter(loader)
    nxt = next(it, None)
    while nxt is not None:
        cur, nxt = nxt, next(it, None)
        yield cur


def test_a_fetcher_reading_ahead_observes_the_last_batch_before_the_condensation(
    reference: tuple[list[Any], dict[str, Any]],
) -> None:
    loader, student, log = make_loader(), Student(), []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never observed" warning: the last batch is in
        for e in range(SCHED.epochs):
            loader.set_epoch(e)
            for batch in one_ahead(loader):
                train_batch(loader, batch, student, log)
    assert_same_log(log, reference[0])
    assert_same_state(final_state(loader), reference[1])


def test_a_peek_after_a_resume_restarts_at_the_resume_point() -> None:
    first, student = make_loader(), Student()
    it = iter(first)
    for _ in range(2):
        train_batch(first, next(it), student, [])
    state = first.state_dict()
    second = make_loader()
    second.load_state_dict(state)
    peek = next(iter(second))  # not observed
    assert second.state_dict()["position"] == 2  # a peek is not progress
    rest = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in second:
            train_batch(second, batch, student, [])
            rest.append(batch[2])
    assert len(rest) == 5 and torch.equal(rest[0], peek[2]) and second.epoch == 1


def test_a_peek_at_a_one_batch_epoch_does_not_complete_it() -> None:
    loader = make_loader(batch_size=128)  # every epoch is one batch
    next(iter(loader))
    assert len(loader) == 1 and loader.epoch == 0 and loader.history == []
    for batch in loader:
        train_batch(loader, batch, Student(), [])
    assert loader.epoch == 1 and len(loader.history) == 1


class Crashing(torch.utils.data.Dataset):
    """Point 17 kills its worker process while ``flag`` exists."""

    def __init__(self, flag: str):
        self.flag, self.inner = flag, ArrayDataset(*make_arrays(N))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        if i == 17 and os.path.exists(self.flag):
            os._exit(3)
        return self.inner[i]


@pytest.mark.timeout(120)
# torch's SIGCHLD handler may raise the worker's death inside whatever Python code runs when the
# signal lands (a weakref callback: "exception ignored"); the error this test expects is checked below
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_crashed_persistent_worker_is_replaced_on_the_next_iterator(tmp_path: Any) -> None:
    flag = tmp_path / "crash"
    flag.touch()
    loader = KCDLoader(
        Crashing(str(flag)),
        SCHED,
        batch_size=BS,
        shuffle=True,
        seed=1,
        num_workers=1,
        persistent_workers=True,
        vaks="off",
    )
    seen = []
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _x, _y, idx in loader:
            loader.observe(idx, torch.randn(idx.shape[0], 3))
            seen.append(idx)
    flag.unlink()  # "fixed"
    for _x, _y, idx in loader:  # the epoch continues at the batch that failed, with fresh workers
        loader.observe(idx, torch.randn(idx.shape[0], 3))
        seen.append(idx)
    assert loader.epoch == 1 and torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(N))
