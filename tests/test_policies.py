"""Issue 30's policies: InfoBatch's rule (InfoBatchSchedule) on the KCDLoader engine, the
class-wise VAKS pairing, and the policies benchmark's smoke run.

The oracle for InfoBatch is a plain re-statement of its released code's rule (scores start at
3.0, the latest loss per point, ``scores < scores.mean()``, ``floor(keep * count)`` of them
kept with weight ``1 / keep``, epochs ``e`` with ``e + 1 <= delta * epochs`` pruned) run next
to the loader on the same losses; the oracle for ``vaks_pairing="class"`` pairs each class's
dropped points with its kept points by a per-point loop over the ranking.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from kcd_fast import (
    ArrayDataset,
    CondensationSchedule,
    InfoBatchSchedule,
    KCDBatchSampler,
    KCDLoader,
    WithIndices,
    condense,
)
from kcd_fast.loader.plan import stream_seed
from kcd_fast.policies import INFOBATCH_STREAM

N = 53


def arrays(n: int = N, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), (np.arange(n) % classes).astype(np.int64)


def loss_of(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic per-sample loss of (point, epoch), independent of the batch."""
    i = idx.double()
    return (torch.sin(i * 1.7 + epoch * 0.9) + 1.0 + (i % 7) * 0.05).float()


class InfoBatchOracle:
    """InfoBatch's released rule, restated: one process, the latest loss per point."""

    def __init__(self, n: int, epochs: int, prune_ratio: float, delta: float, seed: int):
        self.scores = np.full(n, 3.0)
        self.keep = 1.0 - prune_ratio
        self.stop_prune = epochs * delta
        self.seed, self.n = seed, n

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        weights = np.ones(self.n)
        if epoch + 1 > self.stop_prune:  # InfoBatch counts iterations from 1
            return np.arange(self.n), weights
        mean = self.scores.mean()
        well = [i for i in range(self.n) if self.scores[i] < mean]
        rest = [i for i in range(self.n) if not self.scores[i] < mean]
        rng = np.random.default_rng(stream_seed(self.seed, epoch, INFOBATCH_STREAM))
        chosen = rng.choice(np.array(well, dtype=np.int64), int(self.keep * len(well)), replace=False) if well else []
        for i in chosen:
            weights[i] = 1.0 / self.keep
        return np.array(sorted(rest + [int(i) for i in chosen]), dtype=np.int64), weights

    def observe(self, idx: np.ndarray, loss: np.ndarray) -> None:
        for i, v in zip(idx, loss, strict=True):
            self.scores[i] = v


def train(loader: Any, epochs: int, record: list[Any] | None = None) -> None:
    for _ in range(epochs):
        e = loader.epoch
        for *_, idx in loader:
            if record is not None:
                record.append((e, idx.clone(), loader.weights(idx).clone()))
            loader.observe_scores(idx, loss_of(idx, e))


# -- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 10, "prune_ratio": 0.95}, "prune_ratio"),
        ({"epochs": 10, "prune_ratio": -0.1}, "prune_ratio"),
        ({"epochs": 10, "delta": 1.5}, "delta"),
        ({"epochs": 10, "delta": float("nan")}, "delta"),
        ({"epochs": 10, "initial_score": float("inf")}, "initial_score"),
    ],
)
def test_schedule_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InfoBatchSchedule(**kwargs)


@pytest.mark.parametrize(("epochs", "delta"), [(40, 0.875), (10, 0.875), (8, 0.875), (7, 0.5), (3, 0.0), (5, 1.0)])
def test_pruned_epochs_follow_infobatch_count(epochs: int, delta: float) -> None:
    s = InfoBatchSchedule(epochs, delta=delta)
    # InfoBatch's IBSampler: the e-th iter() (e from 0) runs with iterations = e + 1 and prunes
    # unless iterations > num_epochs * delta
    assert [s.prunes(e) for e in range(epochs)] == [not (e + 1 > epochs * delta) for e in range(epochs)]
    assert s.condensation_epochs == list(range(1, epochs))
    assert s.epoch_sizes(9) == [9] * epochs


def test_loader_refuses_other_schedules_by_name() -> None:
    with pytest.raises(TypeError, match="schedule must be a kcd_fast.CondensationSchedule or"):
        KCDLoader(ArrayDataset(*arrays()), {"epochs": 3}, batch_size=4)


# -- the rule, the weights, the seeds ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("seed", "prune_ratio", "delta", "bs"), [(0, 0.5, 0.875, 8), (3, 0.3, 0.6, 5), (11, 0.9, 1.0, 53)]
)
def test_active_sets_and_weights_match_the_oracle(seed: int, prune_ratio: float, delta: float, bs: int) -> None:
    epochs = 8
    sched = InfoBatchSchedule(epochs, prune_ratio=prune_ratio, delta=delta)
    loader = KCDLoader(ArrayDataset(*arrays()), sched, batch_size=bs, shuffle=True, seed=seed, vaks="off")
    oracle = InfoBatchOracle(N, epochs, prune_ratio, delta, seed)
    pruned_any = False
    for e in range(epochs):
        want, w = oracle.draw(e)
        assert loader.epoch == e
        np.testing.assert_array_equal(loader.active_indices.numpy(), want)
        assert len(loader) == math.ceil(want.shape[0] / bs)
        seen = []
        for *_, idx in loader:
            np.testing.assert_array_equal(loader.weights(idx).numpy(), w[idx.numpy()].astype(np.float32))
            loss = loss_of(idx, e)
            loader.observe_scores(idx, loss)
            oracle.observe(idx.numpy(), loss.double().numpy())
            seen.append(idx)
        np.testing.assert_array_equal(np.sort(torch.cat(seen).numpy()), want)  # each active point once
        pruned_any |= want.shape[0] < N
        if e >= sched.prune_epochs:
            assert want.shape[0] == N and (w == 1).all()
    assert pruned_any
    assert loader.steps_per_epoch()[:epochs] == [math.ceil(r["kept"] / bs) for r in [{"kept": N}] + loader.history]


def test_first_epoch_trains_every_point_and_seeds_decide_the_draw() -> None:
    def sets(seed: int) -> list[np.ndarray]:
        loader = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(6), batch_size=8, shuffle=True, seed=seed)
        out = []
        for _ in range(6):
            out.append(loader.active_indices.numpy())
            train(loader, 1)
        return out

    a, b, c = sets(1), sets(1), sets(2)
    assert a[0].shape[0] == N  # every score starts at 3.0: nothing is below the mean
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_no_global_rng_is_touched() -> None:
    np.random.seed(123)  # noqa: NPY002 (the test checks that the global RNG is left alone)
    torch.manual_seed(123)
    np_state = np.random.get_state()[1].copy()  # noqa: NPY002
    torch_state = torch.random.get_rng_state().clone()
    loader = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(5), batch_size=8, shuffle=True, seed=4)
    train(loader, 5)
    assert np.array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_observe_with_logits_and_bad_losses_raise_before_anything_changes() -> None:
    loader = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(4), batch_size=8, shuffle=True)
    *_, idx = next(iter(loader))
    with pytest.raises(TypeError, match="observe_scores"):
        loader.observe(idx, torch.randn(idx.shape[0], 4))
    before = loader.state_dict()
    bad = loss_of(idx, 0)
    bad[1] = float("nan")
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        loader.observe_scores(idx, bad)
    with pytest.raises(ValueError, match="indices must be in"):
        loader.observe_scores(idx + N, loss_of(idx, 0))
    with pytest.raises(ValueError, match="one length"):
        loader.observe_scores(idx, loss_of(idx, 0)[:-1])
    with pytest.raises(ValueError, match="indices must be in"):
        loader.weights(torch.tensor([N]))
    after = loader.state_dict()
    assert torch.equal(before["infobatch"]["seen"], after["infobatch"]["seen"])


def test_condensation_schedule_weights_are_one() -> None:
    loader = KCDLoader(ArrayDataset(*arrays()), CondensationSchedule(4, 2), batch_size=8)
    assert torch.equal(loader.weights(torch.arange(5)), torch.ones(5))


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_batches", [0, 3])
def test_resume_is_exact(stop_batches: int) -> None:
    epochs, stop_epoch = 7, 3
    full: list[Any] = []
    ref = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(epochs), batch_size=6, shuffle=True, seed=5)
    train(ref, epochs, full)

    part: list[Any] = []
    a = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(epochs), batch_size=6, shuffle=True, seed=5)
    train(a, stop_epoch, part)
    it = iter(a)
    for _ in range(stop_batches):
        *_, idx = next(it)
        part.append((a.epoch, idx.clone(), a.weights(idx).clone()))
        a.observe_scores(idx, loss_of(idx, a.epoch))
    state = a.state_dict()
    torch.save(state, "/dev/null")  # plain tensors and Python values
    b = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(epochs), batch_size=6, shuffle=True, seed=5)
    b.load_state_dict(state)
    assert b.resume_position == stop_batches
    train(b, epochs - stop_epoch, part)
    assert len(part) == len(full)
    for (e1, i1, w1), (e2, i2, w2) in zip(full, part, strict=True):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(w1, w2)
    assert ref.history == b.history


def test_state_of_another_policy_is_refused() -> None:
    a = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(4), batch_size=8)
    train(a, 2)
    state = a.state_dict()
    b = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(4, prune_ratio=0.3), batch_size=8)
    with pytest.raises(ValueError, match="schedule"):
        b.load_state_dict(state)
    c = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(4), batch_size=8)
    broken = dict(state, infobatch=dict(state["infobatch"], sizes=[N]))
    with pytest.raises(ValueError, match="sizes"):
        c.load_state_dict(broken)
    assert c.epoch == 0 and c.active_indices.shape[0] == N


# -- KCDBatchSampler ---------------------------------------------------------------------------------
def test_batch_sampler_in_a_dataloader_matches_the_loader() -> None:
    epochs = 5
    ref: list[Any] = []
    loader = KCDLoader(ArrayDataset(*arrays()), InfoBatchSchedule(epochs), batch_size=8, shuffle=True, seed=2)
    train(loader, epochs, ref)
    ds = ArrayDataset(*arrays())
    sampler = KCDBatchSampler(ds, InfoBatchSchedule(epochs), batch_size=8, shuffle=True, seed=2)
    dl = DataLoader(WithIndices(ds), batch_sampler=sampler, num_workers=0)
    got = []
    for e in range(epochs):
        for *_, idx in dl:
            got.append((e, idx.clone(), sampler.weights(idx).clone()))
            sampler.observe_scores(idx, loss_of(idx, e))
    assert len(got) == len(ref)
    for (e1, i1, w1), (e2, i2, w2) in zip(ref, got, strict=True):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(w1, w2)


# -- DDP: two gloo ranks, scores exchanged only at epoch boundaries -----------------------------------
DDP_EPOCHS, DDP_N, DDP_BS = 5, 60, 6


def _ib_rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from test_distributed import _init_group

    _init_group(rank, world, init_file)
    try:
        calls = {"all_reduce": 0}
        real = dist.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls["all_reduce"] += 1
            return real(*args, **kwargs)

        dist.all_reduce = counting  # counts this process's collectives (a test-only probe of torch)
        loader = KCDLoader(
            ArrayDataset(*arrays(DDP_N)), InfoBatchSchedule(DDP_EPOCHS), batch_size=DDP_BS, shuffle=True, seed=9
        )
        rec: list[Any] = []
        per_epoch = []
        for _ in range(DDP_EPOCHS):
            e, before = loader.epoch, calls["all_reduce"]
            for *_, idx in loader:
                rec.append((e, idx.clone(), loader.weights(idx).clone()))
                loader.observe_scores(idx, loss_of(idx, e))
                assert calls["all_reduce"] == before or e == 0 and calls["all_reduce"] <= before + 1
            per_epoch.append(calls["all_reduce"] - before)
        res = {"rec": rec, "history": loader.history, "per_epoch": per_epoch, "state": None}
        dist.all_reduce = real
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_draw_as_one_process(tmp_path: Path) -> None:
    from test_distributed import spawn_ranks

    ranks = spawn_ranks(2, tmp_path, main=_ib_rank_main, timeout=120.0)
    single: list[Any] = []
    one = KCDLoader(
        ArrayDataset(*arrays(DDP_N)), InfoBatchSchedule(DDP_EPOCHS), batch_size=DDP_BS, shuffle=True, seed=9
    )
    train(one, DDP_EPOCHS, single)
    assert ranks[0]["history"] == ranks[1]["history"] == one.history
    for e in range(DDP_EPOCHS):
        both = [torch.cat([i for (ep, i, _) in r["rec"] if ep == e]) for r in ranks]
        alone = torch.cat([i for (ep, i, _) in single if ep == e])
        # the ranks' shards cover the epoch's points (DDP_N even, every epoch size here even or padded)
        assert set(torch.cat(both).tolist()) == set(alone.tolist())
        w_one = {int(i): float(w) for (ep, idx, ws) in single if ep == e for i, w in zip(idx, ws, strict=True)}
        for r in ranks:
            for ep, idx, ws in r["rec"]:
                if ep == e:
                    assert all(w_one[int(i)] == float(w) for i, w in zip(idx, ws, strict=True))
    for r in ranks:
        # within an epoch no collective; at a boundary one all-reduce of the scores, plus the loader's
        # agreement check at the first iteration
        assert r["per_epoch"] == [2] + [1] * (DDP_EPOCHS - 2) + [0]


# -- VAKS pairing by class -------------------------------------------------------------------------
def class_pairs_oracle(values: np.ndarray, n_keep: int, n_prev: int, labels: np.ndarray, vaks: str, eps_m: float):
    """Per-point loop: rank all points (value desc, index asc); kept = first n_keep, dropped =
    the next n_prev - n_keep; per class, pair dropped (in rank) with kept (in rank) as "low"/"high"."""
    ranking = sorted(range(values.shape[0]), key=lambda i: (-values[i], i))
    kept, dropped = ranking[:n_keep], ranking[n_keep:n_prev]
    dst, src, eps = [], [], []
    for c in sorted(set(labels[dropped].tolist())):
        d_c = [i for i in dropped if labels[i] == c]
        k_c = [i for i in kept if labels[i] == c]
        p = min(len(d_c), len(k_c))
        targets = k_c[len(k_c) - p :] if vaks == "low" else k_c[:p]
        for j in range(p):
            dst.append(targets[j])
            src.append(d_c[j])
            eps.append(eps_m + (1 - eps_m) * (p - j) / p)
    return sorted(kept), np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64), np.array(eps)


@pytest.mark.parametrize("vaks", ["low", "high"])
@pytest.mark.parametrize(
    ("n", "n_keep", "n_prev", "classes"), [(1, 1, 1, 1), (7, 3, 7, 2), (40, 25, 33, 3), (200, 9, 150, 10)]
)
def test_class_pairing_matches_the_oracle(vaks: str, n: int, n_keep: int, n_prev: int, classes: int) -> None:
    for seed in range(5):
        rng = np.random.default_rng([seed, n])
        values = rng.integers(0, 6, n).astype(np.float64)  # many ties
        values[rng.random(n) < 0.1] = np.inf
        labels = rng.integers(0, classes, n)
        got = condense(torch.from_numpy(values), n_keep, n_prev, vaks, 0.7, pairing="class", labels=labels)
        keep, dst, src, eps = class_pairs_oracle(values, n_keep, n_prev, labels, vaks, 0.7)
        np.testing.assert_array_equal(got.keep.numpy(), keep)
        np.testing.assert_array_equal(got.dst.numpy(), dst)
        np.testing.assert_array_equal(got.src.numpy(), src)
        np.testing.assert_allclose(got.eps.numpy(), eps, rtol=0, atol=1e-15)
        assert (labels[got.dst.numpy()] == labels[got.src.numpy()]).all()


def test_class_pairing_random_stays_in_class_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    values, labels = rng.random(60), rng.integers(0, 4, 60)
    a = condense(torch.from_numpy(values), 30, 60, "random", 0.7, seed=3, pairing="class", labels=labels)
    b = condense(torch.from_numpy(values), 30, 60, "random", 0.7, seed=3, pairing="class", labels=labels)
    assert torch.equal(a.dst, b.dst) and (labels[a.dst.numpy()] == labels[a.src.numpy()]).all()
    assert len(set(a.dst.tolist())) == a.pairs and set(a.dst.tolist()) <= set(a.keep.tolist())
    assert (a.eps.numpy() == 0.7).all()


def test_class_pairing_argument_errors() -> None:
    v = torch.rand(10)
    with pytest.raises(ValueError, match="pairing must be one of"):
        condense(v, 5, pairing="nearest")
    with pytest.raises(ValueError, match="needs labels"):
        condense(v, 5, pairing="class")
    with pytest.raises(ValueError, match="labels must be"):
        condense(v, 5, pairing="class", labels=np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="vaks_pairing must be one of"):
        KCDLoader(ArrayDataset(*arrays()), CondensationSchedule(4, 2), vaks_pairing="x")


def test_loader_class_pairing_blends_only_within_a_class_and_saves_it() -> None:
    x, y = arrays(60, classes=3)
    ds = ArrayDataset(x, y)
    loader = KCDLoader(
        ds, CondensationSchedule(4, 2, rho=0.5), batch_size=8, shuffle=True, seed=1, vaks_pairing="class"
    )
    for _ in range(4):
        for *_, idx in loader:
            loader.observe(idx, torch.sin(idx.double()[:, None] * torch.arange(1.0, 4.0)).float())
    state = loader.state_dict()
    assert state["vaks_pairing"] == "class" and state["summaries"]
    for s in state["summaries"]:
        assert (y[s["dst"].numpy()] == y[s["src"].numpy()]).all()
    other = KCDLoader(ArrayDataset(x, y), CondensationSchedule(4, 2, rho=0.5), batch_size=8, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="vaks_pairing"):
        other.load_state_dict(state)
    same = KCDLoader(
        ArrayDataset(x, y),
        CondensationSchedule(4, 2, rho=0.5),
        batch_size=8,
        shuffle=True,
        seed=1,
        vaks_pairing="class",
    )
    same.load_state_dict(state)
    assert torch.equal(same.images, ds.images)


# -- the benchmark -------------------------------------------------------------------------------------
def test_policies_benchmark_quick(tmp_path: Path) -> None:
    from bench_modules import load_benchmark

    bench = load_benchmark("policies")
    out = bench.run(["--quick", "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "p.json")])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["methods"] == list(bench.METHODS)
    for m in bench.METHODS:
        s = out["summary"][m]
        assert 0 < s["trained_fraction"]["mean"] <= 1.0
        assert 0 <= s["accuracy"]["mean"] <= 100
    assert out["summary"]["vanilla"]["trained_fraction"]["mean"] == 1.0
    assert out["summary"]["random"]["trained_fraction"] == out["summary"]["kcd"]["trained_fraction"]
    # the order rotates per seed and kcd_at_ib follows infobatch
    for row in saved["per_seed"]:
        assert row["order"][row["order"].index("infobatch") + 1] == "kcd_at_ib"
    assert saved["per_seed"][0]["order"] != saved["per_seed"][1]["order"]


@pytest.mark.parametrize("policy", ["infobatch", "random"])
def test_throughput_policy_option(tmp_path: Path, policy: str) -> None:
    from bench_modules import load_benchmark

    bench = load_benchmark("throughput")
    args = ["--device", "cpu", "--n-train", "120", "--n-test", "60", "--image-size", "8", "--epochs", "4"]
    args += ["--period", "2", "--teacher", "mlp_s", "--student", "mlp_s", "--teacher-epochs", "1"]
    args += ["--batch-size", "40", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "t.json")]
    args += ["--plot", str(tmp_path / "t.png"), "--no-progress", "--repeats", "1", "--policy", policy]
    r = bench.run(args)
    samples = r["kcd"]["epoch_samples"]
    if policy == "random":
        assert samples == CondensationSchedule(4, 2, rho=0.7).epoch_sizes(120)
    else:  # InfoBatch: epoch 0 on every point, epochs 1 and 2 pruned, epoch 3 (past delta) every point
        assert samples[0] == samples[3] == 120 and max(samples[1:3]) < 120
    assert r["vanilla"]["epoch_samples"] == [120] * 4


# -- Lightning ---------------------------------------------------------------------------------------
def test_lightning_trains_infobatch_epochs_with_weights_and_resumes(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kcd_fast.integrations.lightning import KCDCallback

    epochs, n = 6, 60
    x, y = arrays(n, classes=5)

    class Student(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(16, 5)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                self.net.weight.copy_(torch.randn(5, 16, generator=g) * 0.1)
                self.net.bias.zero_()
            self.loader = KCDLoader(ArrayDataset(x, y), InfoBatchSchedule(epochs), batch_size=8, shuffle=True, seed=3)
            self.trained: list[tuple[int, list[int], list[float]]] = []

        def train_dataloader(self) -> KCDLoader:
            return self.loader

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            xb, yb, idx = batch
            per = torch.nn.functional.cross_entropy(self.net(xb.float().flatten(1) / 255), yb, reduction="none")
            w = self.loader.weights(idx)
            self.trained.append((self.current_epoch, idx.tolist(), w.tolist()))
            return {"loss": (per * w).mean(), "scores": per.detach()}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    def trainer(root: Path, callbacks: list[Any]) -> Any:
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[KCDCallback(), *callbacks],
            reload_dataloaders_every_n_epochs=1,  # InfoBatch's epochs change size: Lightning re-reads len()
        )

    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        pl.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, callbacks=[KCDCallback()]
        ).fit(Student())
    ref = Student()
    trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)]).fit(ref)
    sizes = [n] + [h["kept"] for h in ref.loader.history]
    per_epoch = [sorted(sum((i for e, i, _ in ref.trained if e == k), [])) for k in range(epochs)]
    assert [len(p) for p in per_epoch] == sizes and len(set(per_epoch[0])) == n
    assert min(sizes) < n and sizes[-1] == n  # pruned epochs, then every point after delta * epochs
    assert any(w == 2.0 for _, _, ws in ref.trained for w in ws)  # the kept well-learned points weigh 1 / 0.5
    mid = next(p for p in sorted((tmp_path / "ck").iterdir()) if p.name.startswith("epoch=2"))
    step = int(mid.stem.split("step=")[1])
    resumed = Student()
    trainer(tmp_path / "b", []).fit(resumed, ckpt_path=str(mid))
    assert resumed.trained == ref.trained[step:]
    assert resumed.loader.history == ref.loader.history


# -- Hugging Face Trainer ----------------------------------------------------------------------------
def test_hf_trainer_trains_infobatch_epochs_weighted_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from test_hf import _args, _classifier, _data
    from transformers import default_data_collator

    from kcd_fast.integrations.hf import KCDTrainer, per_sample_loss

    epochs = 6
    sched = InfoBatchSchedule(epochs)

    class Recording(KCDTrainer):
        seen: list[tuple[int, list[int]]]
        checked = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            idx = self._kcd_indices
            self.seen.append((self.kcd_loader.epoch, idx.tolist()))
            with torch.no_grad():  # the weighted mean of the model's per-sample cross-entropy
                per = per_sample_loss(outputs.logits, inputs["labels"])
                want = (per * self.kcd_loader.weights(idx)).mean()
            torch.testing.assert_close(loss.detach(), want)
            self.checked += 1
            return (loss, outputs) if return_outputs else loss

    def make(out: Path, **kw: Any) -> Recording:
        t = Recording(
            model=_classifier(),
            args=_args(out, num_train_epochs=epochs, gradient_accumulation_steps=1, **kw),
            train_dataset=_data(),
            data_collator=default_data_collator,
            kcd_schedule=sched,
            kcd_options={"seed": 1},
        )
        t.seen = []
        return t

    ref = make(tmp_path / "a", save_strategy="steps", save_steps=4)
    ref.train()
    n = 48
    sizes = [n] + [h["kept"] for h in ref.kcd_loader.history]
    assert [
        sorted(sum((i for e, i in ref.seen if e == k), [])) == sorted(set(sum((i for e, i in ref.seen if e == k), [])))
        for k in range(epochs)
    ] == [True] * epochs
    assert [len(sum((i for e, i in ref.seen if e == k), [])) for k in range(epochs)] == sizes
    assert min(sizes) < n and sizes[-1] == n
    assert ref.state.global_step == sum(math.ceil(s / 8) for s in sizes) == ref.checked
    assert ref.state.max_steps == epochs * math.ceil(n / 8)  # planned at the upper bound (see KCDTrainer)
    ckpt = tmp_path / "a" / "checkpoint-12"
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.seen == ref.seen[12:]
    assert resumed.kcd_loader.history == ref.kcd_loader.history
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_per_sample_lm_loss_matches_the_model_loss() -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from kcd_fast.integrations.hf import per_sample_loss

    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (4, 7), generator=g)
    labels = ids.clone()
    labels[0, 4:] = -100
    labels[2, :] = -100  # a sequence with no counted token: loss 0
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        per = per_sample_loss(out.logits, labels)
    counted = (labels[:, 1:] != -100).sum(1)
    assert per[2] == 0
    torch.testing.assert_close((per * counted).sum() / counted.sum(), out.loss)


def test_kd_loss_per_sample_averages_to_kd_loss() -> None:
    from kcd_fast.kd.trainer import kd_loss, kd_loss_per_sample

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    y = torch.randint(0, 5, (9,), generator=g)
    for teacher in (t, None):
        per = kd_loss_per_sample(s, teacher, y, temperature=4.0, gamma=0.1, alpha_kd=0.9)
        assert per.shape == (9,)
        torch.testing.assert_close(per.mean(), kd_loss(s, teacher, y, temperature=4.0, gamma=0.1, alpha_kd=0.9)[0])
