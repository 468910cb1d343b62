"""KCDLoader under torch.distributed and its checkpoints, on the CPU.

Two ranks are spawned once per session (gloo over a file store, bounded in time) and run:
a padded and a drop_last configuration (97 points: every epoch size is odd, so the shards
are padded), a 60-point configuration (every epoch size even) run uninterrupted, stopped
between two condensations and saved, and resumed from world-size-2 and world-size-1
checkpoints; plus the bank's all-reduce and the failure paths. The parent compares what
the ranks recorded with each other, with torch's DistributedSampler (the sharding
oracle) and with single-process runs that make the same observations. The "student" is
a deterministic, row-wise function of the index and the (summarised) stored image, so
every run sees the same logits for the same point whatever its batch. A second two-rank
session (needs DALI) runs the padded configuration with ``backend="dali"`` on the CPU and
checks it against the same oracle and against the torch back end's ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader, ValueBank
from kcd_fast import checkpoint as ckpt
from kcd_fast import distributed as D

WORLD = 2
C = 5  # classes
BS = 6  # batch size
SEED = 7
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.5)  # condensations before epochs 1, 2, 4
N_PAD = 97  # epoch sizes [97, 77, 61, 61, 49, 49]: all odd, every epoch is padded
N_EVEN = 60  # epoch sizes [60, 48, 38, 38, 30, 30]: no padding, so any world size observes the same
STOP = 3  # the interrupted run stops after epoch 2: condensations 1, 2 behind, 4 ahead
MID = 2  # the mid-epoch run stops after 2 batches of epoch STOP
SPAWN_TIMEOUT = 150.0  # seconds for the whole two-rank session
DALI_SPAWN_TIMEOUT = 90.0  # seconds for the two-rank DALI session


def make_data(n: int, hw: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, hw, hw, 3] images and int64 [n] labels."""
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), rng.integers(0, C, n).astype(np.int64)


class Model:
    """Logits [B, C] = table[idx] + (sum of the stored image's bytes) * w: element-wise per
    row (the byte sum is an exact integer), so a point's logits do not depend on its batch."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1000 + n)
        self.table = torch.randn(n, C, generator=g, dtype=torch.float64) * 1.5
        self.w = torch.randn(C, generator=g, dtype=torch.float64)

    def __call__(self, idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        s = images[idx].reshape(idx.shape[0], -1).sum(1, dtype=torch.int64).double()
        return (self.table[idx] + (s / 20000.0)[:, None] * self.w).float()


def loader_kwargs(drop_last: bool = False) -> dict[str, Any]:
    return {"batch_size": BS, "shuffle": True, "seed": SEED, "drop_last": drop_last}


def run(
    loader: KCDLoader, ds: ArrayDataset, model: Model, epochs: int, keep_batches: bool = False
) -> list[dict[str, Any]]:
    """Trains `epochs` epochs; records per epoch what the loader planned and yielded (with
    `keep_batches`, also the yielded images and labels, the stored rows of the yielded
    indices at the time they were yielded, and the back end's read counts)."""
    out = []
    for _ in range(epochs):
        rec = {
            "epoch": loader.epoch,
            "active": loader.active_indices,
            "order": loader.epoch_order(),
            "rank": loader.rank_indices,
            "len": len(loader),
        }
        seen, xs, ys, rows = [], [], [], []
        for x, y, idx in loader:
            if keep_batches:  # x kept as yielded (no copy): it must stay valid after later batches
                xs.append(x)
                ys.append(y)
                rows.append(ds.images[idx].clone())
            loader.observe(idx, model(idx, ds.images))
            seen.append(idx)
        rec["seen"] = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)
        rec["batches"] = len(seen)
        if keep_batches:
            rec["x"], rec["y"], rec["rows"] = torch.cat(xs), torch.cat(ys), torch.cat(rows)
            rec["reads"] = dict(loader.backend.reads)
        out.append(rec)
    return out


def outcome(loader: KCDLoader, ds: ArrayDataset, epochs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epochs": epochs, "state": loader.state_dict(), "images": ds.images.clone()}


# -- the spawned ranks ----------------------------------------------------------------------
def _init_group(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, ckpt_w1: str) -> None:
    _init_group(rank, world, init_file)
    try:
        res: dict[str, Any] = {}
        # 1. padded and drop_last configurations, uninterrupted
        for name, drop_last in (("pad", False), ("drop", True)):
            ds = ArrayDataset(*make_data(N_PAD))
            loader = KCDLoader(ds, SCHED, **loader_kwargs(drop_last))
            res[name] = outcome(loader, ds, run(loader, ds, Model(N_PAD), SCHED.epochs))
            res[name]["dist"] = (loader.distributed, loader.rank, loader.world_size)
            res[name]["steps"] = loader.steps_per_epoch()
            res[name]["samples"] = loader.samples_per_epoch()
        # 2. no padding: uninterrupted; stopped between two condensations and saved; resumed
        model = Model(N_EVEN)
        ds = ArrayDataset(*make_data(N_EVEN))
        loader = KCDLoader(ds, SCHED, **loader_kwargs())
        res["full"] = outcome(loader, ds, run(loader, ds, model, SCHED.epochs))
        ds = ArrayDataset(*make_data(N_EVEN))
        loader = KCDLoader(ds, SCHED, **loader_kwargs())
        run(loader, ds, model, STOP)
        loader.save(os.path.join(out_dir, "ckpt_w2.pt"))
        del loader, ds  # the job "dies" here
        for name, path in (("from_w2", os.path.join(out_dir, "ckpt_w2.pt")), ("from_w1", ckpt_w1)):
            ds = ArrayDataset(*make_data(N_EVEN))  # a freshly loaded ORIGINAL dataset
            loader = KCDLoader.load(path, ds, SCHED, **loader_kwargs())
            res[name] = outcome(loader, ds, run(loader, ds, model, SCHED.epochs - STOP))
            res[name]["start"] = STOP
        # 2b. stopped mid-epoch (after MID batches of epoch STOP, observed), state taken on every
        #     rank, resumed on two ranks from a fresh ORIGINAL dataset: the remaining batches
        ds = ArrayDataset(*make_data(N_EVEN))
        loader = KCDLoader(ds, SCHED, **loader_kwargs())
        run(loader, ds, model, STOP)
        it = iter(loader)
        head = []
        for _ in range(MID):
            _x, _y, idx = next(it)
            loader.observe(idx, model(idx, ds.images))
            head.append(idx)
        state = loader.state_dict()  # a collective: the global state, position MID
        del loader, it, ds
        ds = ArrayDataset(*make_data(N_EVEN))
        loader = KCDLoader(ds, SCHED, **loader_kwargs())
        loader.load_state_dict(state)
        res["mid"] = outcome(loader, ds, run(loader, ds, model, SCHED.epochs - STOP))
        res["mid"]["head"] = torch.cat(head)
        res["mid"]["position"] = state["position"]
        # 3. the bank's all-reduce: each observation in the totals exactly once
        bank = ValueBank(10, period=2, local=True)
        idx = torch.tensor([rank, 5, 5, 9 - rank])
        bank.observe(idx, torch.arange(4 * C, dtype=torch.float32).reshape(4, C) / (rank + 1))
        snap = bank.state_dict()  # a collective: global, the bank unchanged
        res["bank"] = {"snap": snap, "local_after_snap": bank.local_counts.clone()}
        bank.all_reduce_()
        res["bank"]["once"] = (bank.sums.clone(), bank.counts.clone(), bank.local_counts.clone())
        bank.all_reduce_()  # nothing new observed: the totals stay
        res["bank"]["twice"] = (bank.sums.clone(), bank.counts.clone())
        # 4. failures raise on every rank instead of hanging
        mismatched = KCDLoader(ArrayDataset(*make_data(20)), SCHED, batch_size=4, shuffle=True, seed=rank)
        try:
            iter(mismatched)
            res["seed_error"] = None
        except RuntimeError as err:
            res["seed_error"] = str(err)
        loader = KCDLoader(ArrayDataset(*make_data(20)), SCHED, batch_size=4)
        try:
            loader.save(os.path.join(out_dir, "no-such-dir", "ckpt.pt"))
            res["save_error"] = None
        except (OSError, RuntimeError) as err:
            res["save_error"] = (type(err).__name__, str(err))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dali_rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The padded configuration (N_PAD points) with the DALI back end on the CPU."""
    _init_group(rank, world, init_file)
    try:
        ds = ArrayDataset(*make_data(N_PAD))
        loader = KCDLoader(ds, SCHED, backend="dali", dali_device=None, augment=None, num_workers=1, **loader_kwargs())
        res = outcome(loader, ds, run(loader, ds, Model(N_PAD), SCHED.epochs, keep_batches=True))
        res["dist"] = (loader.distributed, loader.rank, loader.world_size, loader.backend.name)
        res["labels"] = ds.labels.clone()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _tensor_rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The padded configuration (N_PAD points) with the tensor back end."""
    _init_group(rank, world, init_file)
    try:
        ds = ArrayDataset(*make_data(N_PAD))
        loader = KCDLoader(ds, SCHED, backend="tensor", **loader_kwargs())
        res = outcome(loader, ds, run(loader, ds, Model(N_PAD), SCHED.epochs))
        res["dist"] = (loader.distributed, loader.rank, loader.world_size, loader.backend.name)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_ranks(
    world: int, out_dir: Path, *args: Any, main: Any = _rank_main, timeout: float = SPAWN_TIMEOUT
) -> list[dict[str, Any]]:
    """Runs `main(rank, world, init_file, out_dir, *args)` on `world` spawned processes (each
    saves `out_dir/rank{r}.pt`); kills them after `timeout` seconds."""
    ctx = mp.start_processes(
        main,
        args=(world, str(out_dir / "init"), str(out_dir), *map(str, args)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    # a world-size-1 checkpoint (this process, no process group) for the ranks to resume
    ds = ArrayDataset(*make_data(N_EVEN))
    single = KCDLoader(ds, SCHED, **loader_kwargs())
    assert not single.distributed and single.world_size == 1
    run(single, ds, Model(N_EVEN), STOP)
    single.save(out / "ckpt_w1.pt")
    t0 = time.monotonic()
    ranks = spawn_ranks(WORLD, out, out / "ckpt_w1.pt")
    return {"ranks": ranks, "dir": out, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def ddp_dali(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp_dali")
    t0 = time.monotonic()
    ranks = spawn_ranks(WORLD, out, main=_dali_rank_main, timeout=DALI_SPAWN_TIMEOUT)
    return {"ranks": ranks, "seconds": time.monotonic() - t0}


def oracle_shard(order: torch.Tensor, rank: int, world: int, drop_last: bool) -> torch.Tensor:
    """torch's DistributedSampler (shuffle=False) applied to the epoch's global order."""
    sampler = DistributedSampler(
        range(order.numel()), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last
    )
    return order[torch.tensor(list(sampler), dtype=torch.int64)]


def assert_same_bank(a: dict[str, Any], b: dict[str, Any], exact: bool) -> None:
    assert torch.equal(a["counts"], b["counts"])
    if exact:
        assert torch.equal(a["sums"], b["sums"])
    else:  # the same observations, added in another grouping
        torch.testing.assert_close(a["sums"], b["sums"], rtol=1e-12, atol=0)


def assert_same_run(a: dict[str, Any], b: dict[str, Any], exact_bank: bool) -> None:
    """Same condensations, summaries, images and final state."""
    sa, sb = a["state"], b["state"]
    assert sa["epoch"] == sb["epoch"] and sa["history"] == sb["history"]
    assert torch.equal(sa["active"], sb["active"]) and sa["digest"] == sb["digest"]
    assert len(sa["summaries"]) == len(sb["summaries"])
    for s, t in zip(sa["summaries"], sb["summaries"], strict=True):
        assert s["epoch"] == t["epoch"] and all(torch.equal(s[k], t[k]) for k in ("dst", "src", "eps"))
    assert torch.equal(a["images"], b["images"])
    assert_same_bank(sa["bank"], sb["bank"], exact_bank)


# -- two ranks ---------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["pad", "drop"])
def test_ranks_agree_and_shard_each_epoch(ddp: dict[str, Any], name: str) -> None:
    r0, r1 = (r[name] for r in ddp["ranks"])
    drop_last = name == "drop"
    assert r0["dist"] == (True, 0, WORLD) and r1["dist"] == (True, 1, WORLD)
    sizes = SCHED.epoch_sizes(N_PAD)
    per_rank = [s // WORLD if drop_last else -(-s // WORLD) for s in sizes]
    steps = [m // BS if drop_last else -(-m // BS) for m in per_rank]
    assert r0["steps"] == r1["steps"] == steps
    held = [int(rec["seen"].numel()) for rec in r0["epochs"]]  # what rank 0's batches held
    assert r0["samples"] == r1["samples"] == held == [m // BS * BS if drop_last else m for m in per_rank]
    for e, (a, b) in enumerate(zip(r0["epochs"], r1["epochs"], strict=True)):
        assert a["epoch"] == b["epoch"] == e
        assert torch.equal(a["active"], b["active"]) and a["active"].numel() == sizes[e]  # the same set
        assert torch.equal(a["order"], b["order"])  # the same global order
        assert torch.equal(torch.sort(a["order"]).values, a["active"])
        for r, rec in enumerate((a, b)):  # DistributedSampler's rules, recomputed on this epoch's set
            assert torch.equal(rec["rank"], oracle_shard(a["order"], r, WORLD, drop_last))
            assert rec["rank"].numel() == per_rank[e] and rec["len"] == rec["batches"] == steps[e]
            assert torch.equal(rec["seen"], rec["rank"][: steps[e] * BS] if drop_last else rec["rank"])
        union = torch.cat([a["seen"], b["seen"]])
        if drop_last:
            assert union.unique().numel() == union.numel()  # nothing visited twice
        else:  # every point covered; the padding (wrapping the order) visits the first ones twice
            assert torch.equal(union.unique(), a["active"])
            assert union.numel() == WORLD * per_rank[e] == sizes[e] + 1
            assert torch.equal(torch.sort(union).values, torch.sort(torch.cat([a["order"], a["order"][:1]])).values)
    assert_same_run(r0, r1, exact_bank=True)  # identical condensations, images and (global) state
    assert len(r0["state"]["history"]) == 3 and r0["state"]["summaries"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["pad", "drop"])
def test_two_ranks_condense_as_one_process_making_the_same_observations(ddp: dict[str, Any], name: str) -> None:
    drop_last = name == "drop"
    ds = ArrayDataset(*make_data(N_PAD))
    model = Model(N_PAD)
    ref = KCDLoader(ds, SCHED, **loader_kwargs(drop_last))
    epochs = []
    for _ in range(SCHED.epochs):  # observe what the two ranks visit (padding included), then move on
        order = ref.epoch_order()
        epochs.append({"active": ref.active_indices})
        for r in range(WORLD):
            shard = oracle_shard(order, r, WORLD, drop_last)
            if drop_last:
                shard = shard[: (shard.numel() // BS) * BS]
            ref.observe(shard, model(shard, ds.images))
        with pytest.warns(UserWarning, match="ends here"):  # the reference is observed without iterating
            ref.set_epoch(ref.epoch + 1)
    mine = outcome(ref, ds, epochs)
    got = ddp["ranks"][0][name]
    for e, rec in enumerate(got["epochs"]):
        assert torch.equal(rec["active"], mine["epochs"][e]["active"]), e
    assert_same_run(got, mine, exact_bank=False)


@pytest.mark.timeout(180)
def test_resume_between_condensations_at_any_world_size(ddp: dict[str, Any]) -> None:
    ranks = ddp["ranks"]
    model = Model(N_EVEN)
    # uninterrupted, one process
    ds = ArrayDataset(*make_data(N_EVEN))
    single = KCDLoader(ds, SCHED, **loader_kwargs())
    single_run = outcome(single, ds, run(single, ds, model, SCHED.epochs))
    # the two-rank checkpoint resumed in one process
    ds = ArrayDataset(*make_data(N_EVEN))
    resumed = KCDLoader.load(ddp["dir"] / "ckpt_w2.pt", ds, SCHED, **loader_kwargs())
    assert resumed.epoch == STOP and resumed.world_size == 1
    w2_to_w1 = outcome(resumed, ds, run(resumed, ds, model, SCHED.epochs - STOP))

    full = ranks[0]["full"]
    assert_same_run(ranks[1]["full"], full, exact_bank=True)
    assert_same_run(single_run, full, exact_bank=False)  # 1 rank == 2 ranks without padding
    for name in ("from_w2", "from_w1"):  # resumed on two ranks from a 2- and a 1-rank checkpoint
        assert_same_run(ranks[0][name], ranks[1][name], exact_bank=True)
        assert_same_run(ranks[0][name], full, exact_bank=False)
        for e, rec in enumerate(ranks[0][name]["epochs"], start=STOP):
            assert rec["epoch"] == e and torch.equal(rec["active"], full["epochs"][e]["active"])
            assert torch.equal(rec["rank"], full["epochs"][e]["rank"])  # the same shards as uninterrupted
    assert_same_run(w2_to_w1, single_run, exact_bank=False)
    for e, rec in enumerate(w2_to_w1["epochs"], start=STOP):
        assert torch.equal(rec["seen"], single_run["epochs"][e]["seen"])


@pytest.mark.timeout(180)
def test_mid_epoch_resume_on_every_rank(ddp: dict[str, Any]) -> None:
    """Each rank resumes with exactly the remaining batches of its shard; the run ends as the
    uninterrupted one (bank totals up to float64 rounding: additions grouped differently)."""
    for r in range(WORLD):
        full, mid = ddp["ranks"][r]["full"], ddp["ranks"][r]["mid"]
        assert mid["position"] == MID
        seen = torch.cat([mid["head"], mid["epochs"][0]["seen"]])
        assert torch.equal(seen, full["epochs"][STOP]["seen"])  # the same batches, each once
        assert mid["epochs"][0]["batches"] == full["epochs"][STOP]["batches"] - MID
        for e, rec in enumerate(mid["epochs"][1:], start=STOP + 1):
            assert torch.equal(rec["seen"], full["epochs"][e]["seen"]), e
        assert torch.equal(mid["images"], full["images"])
        assert_same_bank(mid["state"]["bank"], full["state"]["bank"], exact=False)
        assert torch.equal(mid["state"]["bank"]["counts"], full["state"]["bank"]["counts"])


@pytest.mark.timeout(180)
def test_bank_all_reduce_counts_each_observation_once(ddp: dict[str, Any]) -> None:
    logits = torch.arange(4 * C, dtype=torch.float32).reshape(4, C)
    ref = ValueBank(10, period=2)  # one process observing what both ranks observed
    for r in range(WORLD):
        ref.observe(torch.tensor([r, 5, 5, 9 - r]), logits / (r + 1))
    want = ref.state_dict()
    for res in (r["bank"] for r in ddp["ranks"]):
        assert_same_bank(res["snap"], want, exact=False)
        assert int(res["local_after_snap"].sum()) == 4  # the snapshot changed nothing
        sums, counts, local = res["once"]
        assert_same_bank({"sums": sums, "counts": counts}, want, exact=False)
        assert int(local.sum()) == 0
        assert torch.equal(res["twice"][0], sums) and torch.equal(res["twice"][1], counts)
    assert torch.equal(ddp["ranks"][0]["bank"]["once"][0], ddp["ranks"][1]["bank"]["once"][0])


@pytest.mark.timeout(180)
def test_failures_raise_on_every_rank(ddp: dict[str, Any]) -> None:
    r0, r1 = ddp["ranks"]
    for r in (r0, r1):  # ranks seeded differently would visit overlapping shards: refused
        assert r["seed_error"] is not None and "ranks disagree" in r["seed_error"]
    assert r0["save_error"][0] == "FileNotFoundError"  # rank 0's own error
    assert r1["save_error"][0] == "RuntimeError" and "rank 0 could not write the checkpoint" in r1["save_error"][1]
    print(f"two-rank session: {ddp['seconds']:.1f} s")


# -- two ranks, DALI back end -------------------------------------------------------------------
@pytest.mark.needs_dali
@pytest.mark.timeout(120)
def test_dali_ranks_agree_and_read_only_their_shard(ddp_dali: dict[str, Any]) -> None:
    r0, r1 = ddp_dali["ranks"]
    assert r0["dist"] == (True, 0, WORLD, "dali") and r1["dist"] == (True, 1, WORLD, "dali")
    sizes = SCHED.epoch_sizes(N_PAD)
    per_rank = [-(-s // WORLD) for s in sizes]
    steps = [-(-m // BS) for m in per_rank]
    labels = r0["labels"]
    for e, (a, b) in enumerate(zip(r0["epochs"], r1["epochs"], strict=True)):
        assert a["epoch"] == b["epoch"] == e
        assert torch.equal(a["active"], b["active"]) and a["active"].numel() == sizes[e]  # the same set
        assert torch.equal(a["order"], b["order"])  # the same global order
        for r, rec in enumerate((a, b)):
            assert torch.equal(rec["rank"], oracle_shard(a["order"], r, WORLD, False))
            assert rec["len"] == rec["batches"] == steps[e]
            assert torch.equal(rec["seen"], rec["rank"]), (e, r)  # this rank's shard, in order
            # DALI was handed this rank's shard only: one array row per yielded point
            assert rec["reads"] == {"points": per_rank[e], "files": 0, "overlay": 0, "arrays": per_rank[e]}, (e, r)
            # the yielded images (augment=None: x / 255) are the stored rows of the yielded indices
            assert rec["x"].shape == (per_rank[e], 3, 6, 6) and rec["x"].dtype == torch.float32
            assert torch.equal(rec["x"], rec["rows"].permute(0, 3, 1, 2).float() / 255.0), (e, r)
            assert torch.equal(rec["y"], labels[rec["seen"]]), (e, r)
        assert a["seen"].numel() == b["seen"].numel() == per_rank[e]  # equal per-rank counts
        union = torch.cat([a["seen"], b["seen"]])
        assert torch.equal(union.unique(), a["active"])  # every point of the epoch covered
        assert union.numel() == sizes[e] + 1  # odd sizes: one padded point
    assert_same_run(r0, r1, exact_bank=True)  # identical condensations, summarised images and state
    assert len(r0["state"]["history"]) == 3 and r0["state"]["summaries"]
    assert not torch.equal(r0["images"], torch.from_numpy(make_data(N_PAD)[0]))  # the images were summarised
    print(f"two-rank DALI session: {ddp_dali['seconds']:.1f} s")


@pytest.mark.needs_dali
@pytest.mark.timeout(180)
def test_dali_ranks_match_torch_ranks(ddp: dict[str, Any], ddp_dali: dict[str, Any]) -> None:
    """Same seed, same observations: rank r of the DALI run visits what rank r of the torch
    run visits, and both runs condense and summarise identically."""
    for r in range(WORLD):
        got, want = ddp_dali["ranks"][r], ddp["ranks"][r]["pad"]
        for e, (a, b) in enumerate(zip(got["epochs"], want["epochs"], strict=True)):
            assert torch.equal(a["active"], b["active"]) and torch.equal(a["seen"], b["seen"]), (r, e)
        assert_same_run(got, want, exact_bank=True)


@pytest.mark.timeout(180)
def test_tensor_ranks_match_torch_ranks(ddp: dict[str, Any], tmp_path: Path) -> None:
    """backend="tensor" under DDP: rank r visits what rank r of the torch run visits, and both
    runs condense and summarise identically."""
    ranks = spawn_ranks(WORLD, tmp_path, main=_tensor_rank_main, timeout=DALI_SPAWN_TIMEOUT)
    for r in range(WORLD):
        got, want = ranks[r], ddp["ranks"][r]["pad"]
        assert got["dist"] == (True, r, WORLD, "tensor")
        for e, (a, b) in enumerate(zip(got["epochs"], want["epochs"], strict=True)):
            assert torch.equal(a["active"], b["active"]) and torch.equal(a["seen"], b["seen"]), (r, e)
        assert_same_run(got, want, exact_bank=True)


# -- sharding and arguments (no processes) -----------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_order_is_distributed_sampler(drop_last: bool) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 7, 16, 17):
        order = torch.from_numpy(rng.permutation(100)[:n].astype(np.int64))
        for world in (1, 2, 3, 4, 8):
            shards = [D.shard_order(order.numpy(), r, world, drop_last) for r in range(world)]
            for r, s in enumerate(shards):
                assert s.dtype == np.int64 and s.shape == (D.shard_size(n, world, drop_last),)
                assert torch.equal(torch.from_numpy(s), oracle_shard(order, r, world, drop_last)), (n, world, r)
            if not drop_last:
                assert set(np.concatenate(shards).tolist()) == set(order.tolist())


def test_resolve_rules() -> None:
    assert not dist.is_initialized()
    assert D.resolve(None) == D.DistInfo() and D.resolve(False) == D.DistInfo()
    assert D.resolve(True, rank=0, world_size=1) == D.DistInfo(True, 0, 1, None)
    with pytest.raises(TypeError, match="distributed must be None or a bool, got str 'yes'"):
        D.resolve("yes")
    with pytest.raises(TypeError, match="rank must be an int or None, got float 1.0"):
        D.resolve(True, rank=1.0, world_size=2)
    with pytest.raises(ValueError, match="distributed=False shards nothing, but got rank=0"):
        D.resolve(False, rank=0)
    with pytest.raises(ValueError, match="distributed=True needs an initialised process group"):
        D.resolve(True)
    with pytest.raises(ValueError, match="world_size=2 needs an initialised process group"):
        D.resolve(None, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\), got 1"):
        D.resolve(True, rank=1, world_size=1)
    with pytest.raises(ValueError, match="no process group is initialised"):
        D.resolve(True, group=object())
    with pytest.raises(ValueError, match="world_size=2 needs an initialised process group"):
        KCDLoader(ArrayDataset(*make_data(10)), SCHED, rank=0, world_size=2)
    with pytest.raises(ValueError, match="made with local=False"):
        ValueBank(4, period=2).all_reduce_()


def test_one_rank_is_a_plain_loader() -> None:
    model = Model(N_PAD)
    runs = []
    for kw in ({}, {"distributed": True, "rank": 0, "world_size": 1}):
        ds = ArrayDataset(*make_data(N_PAD))
        loader = KCDLoader(ds, SCHED, **loader_kwargs(), **kw)
        assert loader.distributed == bool(kw) and loader.rank == 0 and loader.world_size == 1
        assert torch.equal(loader.rank_indices, loader.epoch_order())
        runs.append(outcome(loader, ds, run(loader, ds, model, SCHED.epochs)))
    assert_same_run(runs[0], runs[1], exact_bank=True)
    assert all(torch.equal(a["seen"], b["seen"]) for a, b in zip(runs[0]["epochs"], runs[1]["epochs"], strict=True))


def test_destroyed_group_is_freed_and_a_new_one_gets_a_new_channel(tmp_path: Path) -> None:
    """The handshake channels must not keep a process group alive: a group kept past
    destroy_process_group() runs its gloo threads into interpreter exit, where one releasing a
    finished all-reduce's tensor aborted a rank ("terminate called without an active exception")."""
    import gc
    import weakref

    assert not dist.is_initialized()
    seqs = []
    for i in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'init{i}'}", rank=0, world_size=1)
        try:
            pg = dist.distributed_c10d._get_default_group()
            ch = D._channel(None)
            assert ch is not None and D._channel(None) is ch
            seqs.append(ch.seq)
            ch.seq += 5  # a used channel
            ref = weakref.ref(pg)
            del pg, ch
        finally:
            dist.destroy_process_group()
        gc.collect()
        assert ref() is None, "the channels keep a destroyed process group alive"
    assert seqs == [0, 0]


# -- checkpoints (one process) -----------------------------------------------------------------
def trained(stop: int = STOP) -> tuple[KCDLoader, ArrayDataset]:
    ds = ArrayDataset(*make_data(N_EVEN))
    loader = KCDLoader(ds, SCHED, **loader_kwargs())
    run(loader, ds, Model(N_EVEN), stop)
    return loader, ds


def test_save_load_round_trip(tmp_path: Path) -> None:
    loader, ds = trained()
    path = tmp_path / "kcd.ckpt"
    loader.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["kcd.ckpt"]  # no temporary file left behind
    fresh = ArrayDataset(*make_data(N_EVEN))
    back = KCDLoader.load(str(path), fresh, SCHED, **loader_kwargs())
    assert_same_run(outcome(back, fresh, []), outcome(loader, ds, []), exact_bank=True)
    payload = ckpt.load_checkpoint(path)
    assert payload["format"] == ckpt.CHECKPOINT_FORMAT and payload["world_size"] == 1
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int 3"):
        loader.save(3)


def _fail(*_args: Any, **_kwargs: Any) -> None:
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_interrupted_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / "kcd.ckpt"
    loader, _ = trained(2)
    loader.save(path)
    before = path.read_bytes()
    run(loader, loader.dataset, Model(N_EVEN), 1)  # epoch 3: a newer state
    with monkeypatch.context() as m:  # the temporary file is fully written, then the save dies
        m.setattr(os, where, _fail)
        with pytest.raises(OSError, match="simulated crash"):
            loader.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["kcd.ckpt"]
    back = KCDLoader.load(path, ArrayDataset(*make_data(N_EVEN)), SCHED, **loader_kwargs())
    assert back.epoch == 2


@pytest.mark.timeout(120)
def test_process_killed_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "kcd.ckpt"
    loader, _ = trained(2)
    loader.save(path)
    before = path.read_bytes()
    # a real process dies (os._exit, no cleanup) after writing and fsyncing the temporary file
    code = (
        "import os, sys; sys.path[:0] = sys.argv[2:]\n"
        "import test_distributed as T\n"
        "loader, _ = T.trained(3)\n"
        "os.replace = lambda *a: os._exit(17)\n"
        "loader.save(sys.argv[1])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(Path(__file__).parent), *sys.path],
        timeout=100,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 17, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "kcd.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".kcd.ckpt.") and leftovers[0].endswith(".tmp")
    assert path.read_bytes() == before
    assert KCDLoader.load(path, ArrayDataset(*make_data(N_EVEN)), SCHED, **loader_kwargs()).epoch == 2
    loader.save(path)  # a later save succeeds next to the stale temporary file
    assert ckpt.load_checkpoint(path)["loader"]["epoch"] == 2


def test_truncated_corrupt_or_foreign_checkpoints_raise(tmp_path: Path) -> None:
    loader, _ = trained()
    path = tmp_path / "kcd.ckpt"
    loader.save(path)
    data = path.read_bytes()
    kw = loader_kwargs()

    def load(p: Path) -> KCDLoader:
        return KCDLoader.load(p, ArrayDataset(*make_data(N_EVEN)), SCHED, **kw)

    for cut in (len(data) - 1, len(data) // 2, 30, 0):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"checkpoint '{bad}' is truncated"):
            load(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupt: its content does not match its blake2b digest"):
        load(tmp_path / "flip.ckpt")
    torch.save(loader.state_dict(), tmp_path / "plain.pt")  # a plain torch.save file
    with pytest.raises(ValueError, match="is not a kcd_fast checkpoint"):
        load(tmp_path / "plain.pt")
    ckpt.save_checkpoint({"format": "something/else"}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not a KCDLoader checkpoint .format 'something/else'"):
        load(tmp_path / "other.ckpt")
    with pytest.raises(
        ValueError, match=f"checkpoint '{path}' does not fit this loader: the state was made for schedule"
    ):
        KCDLoader.load(path, ArrayDataset(*make_data(N_EVEN)), CondensationSchedule(epochs=6, period=3, rho=0.5), **kw)
    with pytest.raises(ValueError, match="does not fit this loader: the state was made for a dataset of 60"):
        KCDLoader.load(path, ArrayDataset(*make_data(61)), SCHED, **kw)
    target = KCDLoader(ArrayDataset(*make_data(N_EVEN)), SCHED, **kw)
    with pytest.raises(ValueError, match="vaks = 'low', this loader has 'off'"):
        KCDLoader.load(path, ArrayDataset(*make_data(N_EVEN)), SCHED, **kw, vaks="off")
    with pytest.raises(FileNotFoundError):
        target.restore(tmp_path / "missing.ckpt")
    assert target.epoch == 0 and target.history == []
