"""KCDLoader and ArrayDataset on the CPU: per-epoch point sets, condensation and VAKS
against the numpy reference, bit-exact resume, bad input. Tiny synthetic data; the
"student" is a fixed random function of the (possibly summarised) images."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from datasets_for_tests import CifarLike

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader
from kcd_fast import _reference as R
from kcd_fast.data import image_storage
from kcd_fast.loader.plan import VAKS_STREAM, stream_seed

C = 7  # classes


def make_arrays(n: int, seed: int = 0, hw: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, hw, hw, 3] images and int64 [n] labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), rng.integers(0, C, n).astype(np.int64)


class Student:
    """Deterministic logits [B, C] from the batch's images [B, 3, H, W], so summarised
    images change the scores."""

    def __init__(self, hw: int = 8, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * hw * hw, C, generator=g) * 0.4  # logits of std ~ 1.6

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) - 0.5) @ self.w


class Generic(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 4, 4), float(i)), i % C


def as_chw(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The default ArrayDataset transform applied to rows idx of [N, H, W, C] uint8."""
    return images[idx].permute(0, 3, 1, 2).float() / 255.0


def snapshot(loader: KCDLoader) -> dict[str, Any]:
    st = loader.state_dict()
    st["images"] = None if loader.images is None else loader.images.clone()
    return st


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k == "bank":
            for kk in x:
                if isinstance(x[kk], torch.Tensor):
                    assert torch.equal(x[kk], y[kk]), kk
                else:
                    assert x[kk] == y[kk], kk
        elif k == "summaries":
            assert len(x) == len(y)
            for s, t in zip(x, y, strict=True):
                assert s["epoch"] == t["epoch"]
                assert all(torch.equal(s[f], t[f]) for f in ("dst", "src", "eps"))
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k
        else:
            assert x == y, k


SCHED = CondensationSchedule(epochs=6, period=2, rho=0.5)  # sizes of 97: [97, 77, 61, 61, 49, 49]


# -- per-epoch point sets ---------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("workers", [0, 2, "persistent"])
def test_each_epoch_trains_on_the_scheduled_active_set(workers: int | str, drop_last: bool) -> None:
    n, bs = 97, 16
    images, labels = make_arrays(n)
    ds = ArrayDataset(images, labels)
    persistent = workers == "persistent"
    loader = KCDLoader(
        ds,
        SCHED,
        batch_size=bs,
        shuffle=True,
        drop_last=drop_last,
        num_workers=2 if persistent else int(workers),
        persistent_workers=persistent,
        seed=3,
    )
    student = Student()
    sizes = SCHED.epoch_sizes(n)
    assert loader.steps_per_epoch() == [s // bs if drop_last else -(-s // bs) for s in sizes]
    assert loader.total_steps() == sum(loader.steps_per_epoch())
    for k in (1, 2, 3, 7, 1000):  # optimizer steps with accumulation: each epoch's partial last group steps
        assert loader.total_steps(k) == sum(len(range(0, s, k)) for s in loader.steps_per_epoch()), k
        for e in range(SCHED.epochs + 1):  # a run of the first e epochs
            assert loader.total_steps(k, epochs=e) == sum(len(range(0, s, k)) for s in loader.steps_per_epoch()[:e])
    for e in range(SCHED.epochs):
        assert loader.epoch == e and len(loader) == loader.steps_per_epoch()[e]
        active, order = loader.active_indices, loader.epoch_order()
        assert active.shape == (sizes[e],) and torch.equal(torch.sort(order).values, active)
        got = []
        for x, y, idx in loader:
            assert idx.dtype == torch.int64 and x.shape == (idx.shape[0], 3, 8, 8)
            # workers read the current (summarised) images and the right labels
            assert torch.equal(x, as_chw(ds.images, idx)) and torch.equal(y, ds.labels[idx])
            loader.observe(idx, student(x))
            got.append(idx)
        got_t = torch.cat(got)
        assert len(got) == loader.steps_per_epoch()[e]
        if drop_last:  # the documented rule: the last n mod B points of the order are left out
            assert torch.equal(got_t, order[: (sizes[e] // bs) * bs])
        else:
            assert torch.equal(got_t, order)
            assert torch.equal(torch.sort(got_t).values, active) and got_t.unique().numel() == sizes[e]
    assert loader.epoch == SCHED.epochs and len(loader) == 0
    assert [h["epoch"] for h in loader.history] == SCHED.condensation_epochs


def test_total_steps_rejects_a_bad_accumulate() -> None:
    loader = KCDLoader(ArrayDataset(*make_arrays(10)), SCHED, batch_size=4)
    with pytest.raises(ValueError, match=r"accumulate must be >= 1, got 0"):
        loader.total_steps(0)
    with pytest.raises(TypeError, match=r"accumulate must be an int, got float 2.0"):
        loader.total_steps(2.0)
    with pytest.raises(ValueError, match=r"epochs must be >= 0, got -1"):
        loader.total_steps(1, epochs=-1)


@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # this test observes nothing
def test_drop_last_epoch_smaller_than_a_batch_yields_nothing(caplog: pytest.LogCaptureFixture) -> None:
    sched = CondensationSchedule(epochs=3, period=3, rho=0.5)  # sizes [10, 5, 5]
    loader = KCDLoader(ArrayDataset(*make_arrays(10)), sched, batch_size=8, drop_last=True, shuffle=True, progress=True)
    assert loader.steps_per_epoch() == [1, 0, 0] and loader.total_steps() == 1
    with caplog.at_level("INFO", logger="kcd_fast.loader"):
        assert [len(b[2]) for b in loader] == [8]
    assert "KCD condensation before epoch 1: kept 5 of 10 points" in caplog.text
    assert loader.epoch == 1 and len(loader) == 0 and loader.active_indices.numel() == 5
    assert list(loader) == [] and loader.epoch == 2


def test_order_is_seeded_per_epoch_and_restarts_after_break() -> None:
    ds = ArrayDataset(*make_arrays(40))
    a = KCDLoader(ds, SCHED, batch_size=8, shuffle=True, seed=5)
    b = KCDLoader(ds, SCHED, batch_size=8, shuffle=True, seed=5)
    expect = a.active_indices[np.random.default_rng([5, 0]).permutation(40)]
    assert torch.equal(a.epoch_order(), expect) and torch.equal(b.epoch_order(), expect)
    first = next(iter(a))[2]
    # breaking out does not advance: a new iteration replays the same epoch
    assert a.epoch == 0 and torch.equal(next(iter(a))[2], first)
    plain = KCDLoader(ds, SCHED, batch_size=8, shuffle=False)
    assert torch.equal(plain.epoch_order(), torch.arange(40))


def test_global_rngs_untouched() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002 (the legacy global)
    ds = ArrayDataset(*make_arrays(30))
    for workers in (0, 2):
        loader = KCDLoader(
            ds,
            CondensationSchedule(epochs=2, period=2, rho=0.5),
            batch_size=8,
            shuffle=True,
            num_workers=workers,
            vaks="random",
            value="random",
        )
        for _ in range(2):
            for _x, _y, idx in loader:
                loader.observe(idx, torch.zeros(idx.shape[0], C))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))  # noqa: NPY002


@pytest.mark.parametrize("drop_last", [False, True])
def test_history_counts_schedule_passes_and_yielded_samples(drop_last: bool) -> None:
    ds = ArrayDataset(*make_arrays(97))
    loader = KCDLoader(ds, SCHED, batch_size=16, shuffle=True, drop_last=drop_last)
    held, checked = 0, 0
    for _ in range(SCHED.epochs):
        for _x, _y, idx in loader:
            held += idx.shape[0]
            loader.observe(idx, torch.zeros(idx.shape[0], C))
        if loader.history and loader.history[-1]["epoch"] == loader.epoch:
            rec = loader.history[-1]
            assert rec["passes"] == sum(SCHED.epoch_sizes(97)[: loader.epoch])
            yielded = sum(loader.samples_per_epoch()[: loader.epoch])
            assert yielded == held  # what the batches actually held
            assert (yielded < rec["passes"]) == drop_last
            checked += 1
    assert checked == len(SCHED.condensation_epochs)


def test_random_value_condensations_ignore_values_looked_at_in_between() -> None:
    def run(peek: bool) -> list[torch.Tensor]:
        ds = ArrayDataset(*make_arrays(97))
        loader = KCDLoader(ds, SCHED, batch_size=16, shuffle=True, seed=2, value="random")
        kept = []
        for _ in range(SCHED.epochs):
            for _x, _y, idx in loader:
                loader.observe(idx, torch.zeros(idx.shape[0], C))
                if peek:
                    loader.bank.values()  # a user inspecting the values
            kept.append(loader.active_indices.clone())
        return kept

    plain, peeked = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, peeked, strict=True))
    assert len(plain[-1]) < 97


# -- condensation and VAKS against the numpy reference ----------------------------------
@pytest.mark.parametrize("vaks", ["low", "high", "random", "off"])
def test_condensation_and_summary_match_reference(vaks: str) -> None:
    n, bs = 83, 10
    images, labels = make_arrays(n, seed=2)
    ds = ArrayDataset(images, labels)
    sched = CondensationSchedule(epochs=8, period=2, rho=0.4, warmup=1)
    loader = KCDLoader(ds, sched, batch_size=bs, shuffle=True, vaks=vaks, alpha=0.05, eps_m=0.6, seed=11)
    student = Student()
    ref_s, ref_c = np.zeros(n), np.zeros(n, np.int32)
    ref_images = images.copy()
    ref_active = np.arange(n)
    sizes = sched.epoch_sizes(n)
    for e in range(sched.epochs):
        steps = len(loader)
        for k, (x, _y, idx) in enumerate(loader):
            logits = student(x)
            loader.observe(idx, logits)
            R.observe(ref_s, ref_c, idx.numpy(), R.entropy(logits.numpy()))
            if k == steps - 1:
                values = loader.bank.values().numpy()  # what the coming condensation ranks
        np.testing.assert_allclose(values, R.values(ref_s, ref_c, sched.period, 0.05), rtol=1e-5)
        if e + 1 in sched.condensation_epochs:
            ref = R.condense(values, sizes[e + 1], len(ref_active), vaks, 0.6, seed=stream_seed(11, e + 1, VAKS_STREAM))
            ref_images = R.blend(ref_images, ref["dst"], ref["src"], ref["eps"])
            ref_active = ref["keep"]
            rec = loader.history[-1]
            assert rec["epoch"] == e + 1 and rec["kept"] == sizes[e + 1]
            assert rec["dropped"] == len(ref["dropped"]) and rec["pairs"] == len(ref["dst"])
            assert rec["cost"] == pytest.approx(sum(sizes[: e + 1]) / (n * (e + 1)))
        np.testing.assert_array_equal(loader.active_indices.numpy(), ref_active)
        np.testing.assert_array_equal(ds.images.numpy(), ref_images)
    assert len(loader.history) == len(sched.condensation_epochs)
    changed = not np.array_equal(ds.images.numpy(), images)
    assert changed == (vaks != "off")
    np.testing.assert_array_equal(ds.labels.numpy(), labels)  # labels stay those of the kept points


def test_torchvision_style_dataset_blends_into_data() -> None:
    n = 60
    images, labels = make_arrays(n, seed=4)
    ds = CifarLike(images, labels)
    assert not ds.data.flags.c_contiguous
    assert image_storage(ds) is not None
    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    loader = KCDLoader(ds, sched, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True, seed=2)
    student = Student()
    ref_images = images.copy()
    for _ in range(sched.epochs):
        for x, _y, idx in loader:
            # the persistent workers were restarted after each summary: they read the current .data
            assert torch.equal(x, torch.from_numpy(ds.data[idx.numpy()]).permute(0, 3, 1, 2).float() / 255.0)
            loader.observe(idx, student(x))
    for s in loader.state_dict()["summaries"]:
        ref_images = R.blend(ref_images, s["dst"].numpy(), s["src"].numpy(), s["eps"].numpy())
    assert len(loader.history) == 2 and loader.history[0]["pairs"] > 0
    np.testing.assert_array_equal(ds.data, ref_images)
    assert ds.targets == labels.tolist()


def test_generic_dataset_turns_vaks_off_by_default_and_refuses_an_explicit_mode() -> None:
    with pytest.raises(ValueError, match=r"Generic is not an ArrayDataset.*To enable VAKS, wrap the images"):
        KCDLoader(Generic(20), SCHED, batch_size=4, vaks="low")
    assert KCDLoader(Generic(20), SCHED, batch_size=4).vaks.value == "off"  # "auto": nothing to blend
    loader = KCDLoader(Generic(20), SCHED, batch_size=4, vaks="off", shuffle=True)
    assert loader.images is None
    for _ in range(SCHED.epochs):
        for x, y, idx in loader:
            assert torch.equal(x[:, 0, 0, 0].long(), idx) and torch.equal(y, idx % C)
            loader.observe(idx, torch.randn(idx.shape[0], C))
    assert loader.active_indices.numel() == SCHED.epoch_sizes(20)[-1]


# -- resume ---------------------------------------------------------------------------------
def run_epochs(loader: KCDLoader, student: Student, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Trains `epochs` epochs; per epoch returns (indices in visiting order, images seen)."""
    out = []
    for _ in range(epochs):
        idx_all, x_all = [], []
        for x, _y, idx in loader:
            loader.observe(idx, student(x))
            idx_all.append(idx)
            x_all.append(x)
        out.append((torch.cat(idx_all), torch.cat(x_all)))
    return out


@pytest.mark.parametrize(("vaks", "value", "workers"), [("low", "entropy", 0), ("random", "random", 2)])
def test_resume_is_bit_exact(vaks: str, value: str, workers: int) -> None:
    n, stop = 91, 3  # stop after epoch 2: two condensations (epochs 1 and 2) are behind
    images, labels = make_arrays(n, seed=6)
    sched = CondensationSchedule(epochs=6, period=2, rho=0.45)
    kw = dict(batch_size=12, shuffle=True, seed=9, vaks=vaks, value=value, num_workers=workers)
    student = Student(seed=3)

    full_ds = ArrayDataset(images, labels)
    full = KCDLoader(full_ds, sched, **kw)
    ref = run_epochs(full, student, sched.epochs)

    first = KCDLoader(ArrayDataset(images, labels), sched, **kw)
    run_epochs(first, student, stop)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh_ds = ArrayDataset(images, labels)  # a freshly loaded ORIGINAL dataset
    resumed = KCDLoader(fresh_ds, sched, **{**kw, "seed": 1234})  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.epoch == stop and resumed.seed == 9 and len(resumed) == full.steps_per_epoch()[stop]
    rest = run_epochs(resumed, student, sched.epochs - stop)
    for (i_ref, x_ref), (i, x) in zip(ref[stop:], rest, strict=True):
        assert torch.equal(i, i_ref) and torch.equal(x, x_ref)
    assert torch.equal(fresh_ds.images, full_ds.images)
    assert_same_state(resumed.state_dict(), full.state_dict())


def test_resume_guards_against_wrong_images() -> None:
    n = 50
    images, labels = make_arrays(n, seed=8)
    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    ds = ArrayDataset(images, labels)
    loader = KCDLoader(ds, sched, batch_size=8, shuffle=True)
    run_epochs(loader, Student(), 2)
    state = loader.state_dict()
    assert state["summaries"] and state["digest"]
    kept = {k: v.clone() for k, v in state["bank"].items() if isinstance(v, torch.Tensor)}
    loader.observe(torch.arange(4), torch.randn(4, C))  # a state_dict is a snapshot, not a view
    assert all(torch.equal(state["bank"][k], v) for k, v in kept.items())
    state = loader.state_dict()
    # the same loader: its own images already carry the summaries -> a no-op
    loader.load_state_dict(state)
    assert_same_state(snapshot(loader), {**state, "images": ds.images.clone()})
    # a new loader over the already summarised dataset would blend twice: refused, nothing changed
    other = KCDLoader(ds, sched, batch_size=8)
    before = snapshot(other)
    with pytest.raises(ValueError, match="not the ORIGINAL dataset"):
        other.load_state_dict(state)
    assert_same_state(snapshot(other), before)
    # an earlier state cannot be loaded into a loader that summarised further
    early = KCDLoader(ArrayDataset(images, labels), sched, batch_size=8).state_dict()
    with pytest.raises(ValueError, match="different history"):
        loader.load_state_dict(early)


# -- bad input: clear errors, nothing changed -------------------------------------------
def test_load_state_for_other_dataset_or_schedule_raises() -> None:
    images, labels = make_arrays(40)
    loader = KCDLoader(ArrayDataset(images, labels), SCHED, batch_size=8)
    run_epochs(loader, Student(), 2)
    state = loader.state_dict()
    other_schedule = CondensationSchedule(epochs=6, period=3, rho=0.5)
    target = KCDLoader(ArrayDataset(images, labels), other_schedule, batch_size=8)
    before = snapshot(target)
    with pytest.raises(ValueError, match="made for schedule"):
        target.load_state_dict(state)
    assert_same_state(snapshot(target), before)
    small = KCDLoader(ArrayDataset(*make_arrays(39)), SCHED, batch_size=8)
    before = snapshot(small)
    with pytest.raises(ValueError, match="dataset of 40 points, this loader's has 39"):
        small.load_state_dict(state)
    assert_same_state(snapshot(small), before)
    other_vaks = KCDLoader(ArrayDataset(images, labels), SCHED, batch_size=8, vaks="high")
    with pytest.raises(ValueError, match="vaks = 'low', this loader has 'high'"):
        other_vaks.load_state_dict(state)
    broken = {**state, "active": state["active"][:-1]}
    with pytest.raises(ValueError, match="state active must be an int64"):
        KCDLoader(ArrayDataset(images, labels), SCHED, batch_size=8).load_state_dict(broken)
    with pytest.raises(KeyError, match="missing"):
        loader.load_state_dict({"n": 40})


def test_bad_observations_raise_before_any_change() -> None:
    loader = KCDLoader(ArrayDataset(*make_arrays(20)), SCHED, batch_size=4)
    loader.observe(torch.arange(4), torch.randn(4, C))
    before = snapshot(loader)
    with pytest.raises(IndexError, match=r"indices\[1\] = 20 is outside \[0, 20\)"):
        loader.observe(torch.tensor([0, 20]), torch.randn(2, C))
    with pytest.raises(IndexError, match="outside"):
        loader.observe(torch.tensor([-1, 2]), torch.randn(2, C))
    bad = torch.randn(2, C)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        loader.observe(torch.tensor([0, 1]), bad)
    with pytest.raises(ValueError, match="indices has 3 entries but logits has 2 rows"):
        loader.observe(torch.tensor([0, 1, 2]), torch.randn(2, C))
    assert_same_state(snapshot(loader), before)


def test_duplicate_observation_is_accumulated_twice() -> None:
    loader = KCDLoader(ArrayDataset(*make_arrays(10)), SCHED, batch_size=4)
    idx, logits = torch.tensor([1, 2]), torch.randn(2, C)
    loader.observe(idx, logits)
    loader.observe(idx, logits)  # the documented rule: every observed row counts
    h = R.entropy(logits.numpy())
    assert loader.bank.counts[[1, 2]].tolist() == [2, 2]
    np.testing.assert_allclose(loader.bank.sums[[1, 2]].numpy(), 2 * h, rtol=1e-6)


def test_too_many_epochs_raises_and_changes_nothing() -> None:
    sched = CondensationSchedule(epochs=2, period=1, rho=0.5)
    loader = KCDLoader(ArrayDataset(*make_arrays(12)), sched, batch_size=5)
    run_epochs(loader, Student(), 2)
    before = snapshot(loader)
    with pytest.raises(RuntimeError, match="schedule's 2 epochs are done"):
        iter(loader)
    with pytest.raises(RuntimeError, match="epochs are done"):
        for _ in loader:
            pass
    assert_same_state(snapshot(loader), before)


@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # this test observes nothing
def test_set_epoch() -> None:
    ds = ArrayDataset(*make_arrays(30))
    loader = KCDLoader(ds, SCHED, batch_size=8, shuffle=True)
    loader.set_epoch(0)  # the usual per-epoch call is a no-op when in step
    it = iter(loader)
    next(it)
    with pytest.warns(UserWarning, match="epoch 0 has yielded 1 of its 4 batches.*epochs 1..2 are skipped"):
        loader.set_epoch(3)  # skips epochs 0-2: the condensations before epochs 1 and 2 happen now
    assert loader.epoch == 3 and [h["epoch"] for h in loader.history] == [1, 2]
    size = SCHED.epoch_sizes(30)[3]
    assert loader.active_indices.numel() == size and len(loader) == -(-size // 8)
    with pytest.raises(RuntimeError, match="made for epoch 0"):
        next(it)
    with pytest.raises(ValueError, match=r"epoch must be in \[3, 6\].*got 2"):
        loader.set_epoch(2)
    with pytest.raises(TypeError, match="epoch must be an int"):
        loader.set_epoch(3.0)
    with pytest.warns(UserWarning, match="jumps from epoch 3"):
        loader.set_epoch(6)
    assert len(loader) == 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int, got float 2.5"),
        ({"shuffle": "yes"}, TypeError, "shuffle must be a bool, got str 'yes'"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0, got -1"),
        ({"persistent_workers": True}, ValueError, "persistent_workers=True needs num_workers > 0"),
        ({"prefetch_factor": 2}, ValueError, "prefetch_factor=2 needs num_workers > 0"),
        ({"collate_fn": 3}, TypeError, "collate_fn must be callable or None, got int 3"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"vaks": "middle"}, ValueError, "vaks must be one of 'low', 'high', 'random', 'off', got 'middle'"),
        ({"value": "loss"}, ValueError, "value must be one of 'entropy', 'kl', 'random', got 'loss'"),
        ({"eps_m": 1.5}, ValueError, r"eps_m must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ({"device": "tpu"}, ValueError, "device must be None, 'cpu' or 'cuda"),
        ({"backend": "jax"}, ValueError, "backend must be one of 'torch', 'dali', 'indices', 'tensor', got 'jax'"),
    ],
)
def test_constructor_checks(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        KCDLoader(ArrayDataset(*make_arrays(10)), SCHED, **kwargs)


def test_dataset_checks() -> None:
    with pytest.raises(TypeError, match="schedule must be a kcd_fast.CondensationSchedule"):
        KCDLoader(ArrayDataset(*make_arrays(10)), {"epochs": 6})
    with pytest.raises(ValueError, match="dataset is empty"):
        KCDLoader(Generic(0), SCHED, vaks="off")
    with pytest.raises(TypeError, match="map-style dataset"):
        KCDLoader(iter(range(3)), SCHED)
    images, labels = make_arrays(5)
    with pytest.raises(TypeError, match="images must be uint8"):
        ArrayDataset(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N = 5"):
        ArrayDataset(images, labels[:4])
    with pytest.raises(ValueError, match="images must be 4-D"):
        ArrayDataset(images[0, 0], labels)


# -- ArrayDataset and odds and ends --------------------------------------------------------
def test_array_dataset() -> None:
    images, labels = make_arrays(12)
    keep = images.copy()
    ds = ArrayDataset(images, labels)
    assert ds.images.is_shared() and ds.images.shape == (12, 8, 8, 3) and ds.labels.dtype == torch.int64
    x, y = ds[3]
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(images[3]).permute(2, 0, 1) / 255.0)
    assert y == int(labels[3]) and isinstance(y, int)
    flip = ArrayDataset(images, labels, transform=lambda im: im.flip(-1))
    assert torch.equal(flip[0][0], torch.from_numpy(images[0]).permute(2, 0, 1).flip(-1))
    gray = ArrayDataset(images[..., 0], labels)
    assert gray[0][0].shape == (1, 8, 8)
    loader = KCDLoader(ds, CondensationSchedule(epochs=2, period=2, rho=0.5), batch_size=4)
    run_epochs(loader, Student(), 2)
    assert loader.history[0]["pairs"] > 0
    np.testing.assert_array_equal(images, keep)  # the caller's array is never blended into


def test_custom_collate_and_kl_value() -> None:
    ds = ArrayDataset(*make_arrays(16))

    def collate(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([b[0] for b in batch]), "y": torch.tensor([b[1] for b in batch])}

    sched = CondensationSchedule(epochs=2, period=2, rho=0.5)
    loader = KCDLoader(ds, sched, batch_size=5, collate_fn=collate, value="kl", device=None, temperature=2.0)
    assert loader.bank.device is None
    for batch, idx in loader:
        assert set(batch) == {"x", "y"}
        s = torch.randn(idx.shape[0], C)
        with pytest.raises(ValueError, match="needs teacher_logits"):
            loader.observe(idx, s)
        loader.observe(idx, s, s * 2)
    assert loader.bank.device == torch.device("cpu") and int(loader.bank.counts.sum()) == 16
    assert loader.active_indices.numel() == 8


@pytest.mark.needs_cuda
def test_cuda_storage_and_bank_match_cpu() -> None:
    images, labels = make_arrays(70, seed=12)
    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    student = Student()
    runs = []
    for dev in ("cpu", "cuda"):
        ds = ArrayDataset(images, labels, device=dev)
        loader = KCDLoader(ds, sched, batch_size=9, shuffle=True, seed=4)
        orders = []
        for _ in range(sched.epochs):
            for x, _y, idx in loader:
                loader.observe(idx, student(x.cpu()).to(dev))
                orders.append(idx)
        runs.append((torch.cat(orders), ds.images.cpu(), loader.active_indices))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))


@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # this test observes nothing
def test_reversed_numpy_data_works_with_vaks_off_and_explains_otherwise() -> None:
    class Reversed(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)[:, ::-1]
            self.targets = [0] * 6

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return torch.from_numpy(self.data[i].copy()), self.targets[i]

    sched = CondensationSchedule(epochs=2, period=1)
    loader = KCDLoader(Reversed(), sched, batch_size=3, vaks="off")
    assert len(list(loader)) == 2
    with pytest.raises(ValueError, match="negative strides"):
        KCDLoader(Reversed(), sched, batch_size=3)


@pytest.mark.parametrize("path", ["/data/imagenet/train", b"/data/x", __import__("pathlib").Path("/data/y")])
def test_a_path_is_not_a_dataset(path) -> None:
    """A str is a sequence of characters: without this check it "works" and yields letters."""
    with pytest.raises(
        TypeError, match=r"dataset must be a dataset object, got the path '/data/.*kcd_fast.ImageFolder"
    ):
        KCDLoader(path, CondensationSchedule(4, 2, rho=0.5), batch_size=4)
