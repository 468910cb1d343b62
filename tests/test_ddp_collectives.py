"""The loader's collectives under DDP: each first agrees on what it is (an op tag and the
epoch, :func:`kcd_fast.distributed.handshake`) within ``collective_timeout``; and
torch.distributed.checkpoint (DCP) round trips.

One two-rank gloo session (tests/test_distributed.py's spawn helper, data and student) runs,
in order: a DCP save/load of a mid-epoch state and its continuation; ``save()`` called on
rank 0 alone; ``state_dict()`` called on rank 0 alone; a rank that raised and lives on; a
rank that died. Each failure case runs on its own process group (``new_group``), so one
case's failure does not touch the next. The parent checks what each rank reported, and how
long it took, against the bound."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from kcd_fast import ArrayDataset, KCDLoader
from kcd_fast import distributed as D
from kcd_fast.loader import dcp as DCP

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import (  # noqa: E402
    N_EVEN,
    SCHED,
    STOP,
    WORLD,
    Model,
    _init_group,
    assert_same_bank,
    loader_kwargs,
    make_data,
    outcome,
    run,
    spawn_ranks,
)

MID = 2
BOUND = 2.0  # collective_timeout of the failure cases, seconds
SLACK = 8.0  # what a loaded 2-core machine may add to the bound (process start-up is not timed)
LONG = 120.0  # collective_timeout where a failure must be found sooner, from the ranks' positions


def _failing(fn: Any) -> dict[str, Any]:
    """Runs ``fn``; returns its error's type and message and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:  # recorded for the parent to check
        return {"type": type(err).__name__, "msg": str(err), "seconds": time.monotonic() - t0}
    return {"type": None, "msg": "", "seconds": time.monotonic() - t0}


def _loader(group: Any = None, **kw: Any) -> tuple[KCDLoader, ArrayDataset]:
    ds = ArrayDataset(*make_data(N_EVEN))
    return KCDLoader(ds, SCHED, group=group, **loader_kwargs(), **kw), ds


def _wait_for(path: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init_group(rank, world, init_file)
    res: dict[str, Any] = {}
    model = Model(N_EVEN)
    try:
        # 1. DCP: a mid-epoch state saved with dcp.save, loaded with dcp.load into a fresh loader
        loader, ds = _loader()
        res["full"] = outcome(loader, ds, run(loader, ds, model, SCHED.epochs))
        loader, ds = _loader()
        run(loader, ds, model, STOP)
        it = iter(loader)
        head = []
        for _ in range(MID):
            _x, _y, idx = next(it)
            loader.observe(idx, model(idx, ds.images))
            head.append(idx)
        ckpt_dir = os.path.join(out_dir, "dcp")
        dcp.save({"loader": loader}, checkpoint_id=ckpt_dir)
        res["saved"] = loader.state_dict()
        del loader, it, ds
        loader, ds = _loader()
        dcp.load({"loader": loader}, checkpoint_id=ckpt_dir)
        res["loaded"] = loader.state_dict()
        res["resumed"] = outcome(loader, ds, run(loader, ds, model, SCHED.epochs - STOP))
        res["head"] = torch.cat(head)

        # 2. save() on rank 0 alone (rank 1 trains on); 3. state_dict() on rank 0 alone
        for name in ("save", "state_dict"):
            group = dist.new_group(list(range(world)))
            loader, ds = _loader(group, collective_timeout=BOUND)
            run(loader, ds, model, 1)
            path = os.path.join(out_dir, f"{name}.ckpt")
            if rank == 0:
                res[name] = _failing(lambda lo=loader, p=path, n=name: lo.save(p) if n == "save" else lo.state_dict())
            else:
                res[name] = _failing(lambda lo=loader, d=ds: run(lo, d, model, 1))
            res[name]["file"] = os.path.exists(path)

        # 4. rank 1 raises in a training step and lives on; rank 0 reaches the condensation
        group = dist.new_group(list(range(world)))
        loader, ds = _loader(group, collective_timeout=BOUND)
        flag = os.path.join(out_dir, "rank0_done")
        if rank == 0:
            res["alive"] = _failing(lambda: run(loader, ds, model, 1))
            res["alive_after"] = _failing(loader.state_dict)  # the ranks are out of step: at once
            open(flag, "w").close()
        else:
            try:
                for k, (_x, _y, idx) in enumerate(loader):
                    if k == 2:
                        raise ValueError("a training step failed")
                    loader.observe(idx, model(idx, ds.images))
            except ValueError:
                pass  # a notebook, a retry loop: the process lives on
            _wait_for(flag)
            res["alive_late"] = _failing(loader.state_dict)  # rank 0 gave up: refused, not a lone collective

        # 4b. a DDP model, rank 0 saves alone mid-epoch: rank 1 trains on and blocks in DDP's gradient
        # all-reduce, so it never reaches a loader collective; rank 0 learns it from rank 1's position
        group = dist.new_group(list(range(world)))
        loader, ds = _loader(group, collective_timeout=LONG)
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(108, 10), process_group=group)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def ddp_epoch(save_at: int | None) -> None:
            for k, (x, y, idx) in enumerate(loader):
                logits = net(x.float().flatten(1) / 255)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(logits, y).backward()  # DDP: an all-reduce per step
                opt.step()
                loader.observe(idx, logits.detach())
                if k == save_at:
                    res["ddp_save"] = _failing(lambda: loader.save(os.path.join(out_dir, "ddp.ckpt")))
                    res["ddp_save"]["file"] = os.path.exists(os.path.join(out_dir, "ddp.ckpt"))

        res["ddp_epoch"] = _failing(lambda: ddp_epoch(MID if rank == 0 else None))

        # 5. rank 1 dies in the middle of an epoch
        group = dist.new_group(list(range(world)))
        loader, ds = _loader(group, collective_timeout=BOUND)
        if rank == 1:
            torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
            for k, (_x, _y, idx) in enumerate(loader):
                if k == 2:
                    os._exit(0)  # no clean-up, no goodbye
                loader.observe(idx, model(idx, ds.images))
        res["died"] = _failing(lambda: run(loader, ds, model, 1))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if not (rank == 0 and "died" in res):  # the peer is gone: leave the group to the process's exit
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_collectives")
    t0 = time.monotonic()
    got = spawn_ranks(WORLD, out, main=_rank_main, timeout=150.0)
    print(f"two-rank collectives session: {time.monotonic() - t0:.1f} s")
    return got


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Equal bit for bit (tensors: dtype, shape and values)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.timeout(180)
def test_dcp_round_trips_a_mid_epoch_state_exactly_on_two_ranks(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        saved, loaded = res["saved"], res["loaded"]
        assert saved["position"] == MID and saved["epoch"] == STOP and saved["summaries"]
        assert_same_state(loaded, saved)  # the DCP round trip is exact
        assert_same_state(saved, ranks[1 - r]["saved"])  # and global: the same on both ranks
        full, resumed = res["full"], res["resumed"]
        seen = torch.cat([res["head"], resumed["epochs"][0]["seen"]])
        assert torch.equal(seen, full["epochs"][STOP]["seen"])  # the rest of that epoch, each batch once
        for e, rec in enumerate(resumed["epochs"][1:], start=STOP + 1):
            assert torch.equal(rec["seen"], full["epochs"][e]["seen"]), (r, e)
        assert torch.equal(resumed["images"], full["images"])
        sa, sb = resumed["state"], full["state"]
        assert sa["history"] == sb["history"] and torch.equal(sa["active"], sb["active"])
        assert_same_bank(sa["bank"], sb["bank"], exact=False)  # the all-reduces group the additions differently


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["save", "state_dict"])
def test_a_collective_on_rank_0_alone_fails_clearly_on_both_ranks(ranks: list[dict[str, Any]], name: str) -> None:
    """Before: save() on rank 0 alone paired rank 0's state all-reduce with rank 1's
    condensation (a file with rank 1's next epoch mixed in), state_dict() aborted both."""
    r0, r1 = ranks[0][name], ranks[1][name]
    for res in (r0, r1):
        assert res["type"] == "CollectiveError", res
        assert "the ranks called different collectives" in res["msg"]
        assert f"rank 0: {name}() at epoch 1" in res["msg"] and "rank 1: the condensation before epoch 2" in res["msg"]
        assert "call save() on every rank, and state_dict() too, not on rank 0 alone" in res["msg"]
        assert res["seconds"] < BOUND + SLACK, res
        assert not res["file"]  # nothing written
    print(f"{name}() on rank 0 alone: rank 0 raised after {r0['seconds']:.2f} s, rank 1 after {r1['seconds']:.2f} s")


@pytest.mark.timeout(180)
def test_a_mid_epoch_save_on_rank_0_alone_under_a_ddp_model_fails_in_seconds(ranks: list[dict[str, Any]]) -> None:
    """Rank 1 never reaches a loader collective (it blocks in DDP's all-reduce of the next step):
    rank 0 sees from rank 1's position that it went on, and raises well within collective_timeout;
    rank 0 then trains on, which frees rank 1, which meets rank 0's refusal at the epoch's end."""
    got = ranks[0]["ddp_save"]
    assert got["type"] == "CollectiveError", got
    assert (
        f"rank(s) [1] went on past save() at epoch 0 (rank 0 called it after batch {MID + 1} of epoch 0" in got["msg"]
    )
    assert "call save() on every rank" in got["msg"] and not got["file"]
    assert got["seconds"] < SLACK < LONG, got
    for r in (0, 1):  # the epoch's end: both ranks refuse to go on out of step
        end = ranks[r]["ddp_epoch"]
        assert end["type"] == "CollectiveError", (r, end)
    assert "gave up waiting for rank(s) [1] in save() at epoch 0" in ranks[1]["ddp_epoch"]["msg"]
    print(
        f"save() on rank 0 alone under DDP: rank 0 raised after {got['seconds']:.2f} s (collective_timeout {LONG:g} s)"
    )


@pytest.mark.timeout(180)
def test_a_rank_that_raised_and_lives_on_is_named_within_the_bound(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks
    got = r0["alive"]
    assert got["type"] == "CollectiveError", got
    assert got["msg"].startswith(
        f"KCDLoader: rank(s) [1] did not reach the condensation before epoch 1 within {BOUND:g} s (collective_timeout)"
    )
    assert BOUND <= got["seconds"] < BOUND + SLACK, got
    after = r0["alive_after"]  # the ranks are out of step: refused at once
    assert after["type"] == "CollectiveError" and "the ranks are out of step" in after["msg"]
    assert after["seconds"] < 1.0
    late = r1["alive_late"]  # rank 1 comes back: rank 0 has given up, so it raises instead of waiting alone
    assert late["type"] == "CollectiveError", late
    assert "rank 0: gave up waiting for rank(s) [1] in the condensation before epoch 1" in late["msg"]
    assert late["seconds"] < BOUND + SLACK
    print(f"rank 1 raised and lived on: rank 0 named it after {got['seconds']:.2f} s (bound {BOUND:g} s)")


@pytest.mark.timeout(180)
def test_a_rank_that_died_is_named_within_the_bound(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]["died"]
    assert got["type"] == "CollectiveError", got
    assert "rank(s) [1] did not reach the condensation before epoch 1" in got["msg"]
    assert got["seconds"] < BOUND + SLACK, got
    print(f"rank 1 died: rank 0 named it after {got['seconds']:.2f} s (bound {BOUND:g} s)")


# -- the store torchrun uses (TCP) -----------------------------------------------------------------
def _tcp_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 stays away (asleep) while rank 0 waits at a handshake; then rank 0, which
    hosts the TCP store, dies, and rank 1 comes to a handshake of another group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    other = dist.new_group(list(range(world)))
    info = D.resolve(None, collective_timeout=BOUND)
    D.handshake(info, "iter", 0, "iter() at epoch 0")
    dist.barrier()  # both ranks are through the first handshake
    if rank == 0:
        res = _failing(lambda: D.handshake(info, "condense", 1, "the condensation before epoch 1"))
        torch.save(res, os.path.join(out_dir, "tcp_rank0.pt"))
        os._exit(0)  # the store's host dies
    time.sleep(2 * BOUND + 1.0)
    mine = D.resolve(None, group=other, collective_timeout=BOUND)
    res = _failing(lambda: D.handshake(mine, "condense", 1, "the condensation before epoch 1"))
    torch.save(res, os.path.join(out_dir, "tcp_rank1.pt"))
    os._exit(0)


@pytest.mark.timeout(120)
def test_tcp_store_an_absent_rank_or_a_dead_store_host_is_reported(tmp_path: Path) -> None:
    """torchrun's TCP store: rank 0 names an absent rank 1 after the bound (the store's wait
    is event-driven: no polling delay); when rank 0, which hosts the store, has died, rank 1
    says so at once."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (WORLD, port, str(tmp_path))
    ctx = mp.start_processes(_tcp_main, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1.0):
        assert time.monotonic() < deadline, "the ranks did not finish in time"
    absent, host_died = (torch.load(tmp_path / f"tcp_rank{r}.pt") for r in range(WORLD))
    assert absent["type"] == "CollectiveError", absent
    assert absent["msg"].startswith("KCDLoader: rank(s) [1] did not reach the condensation before epoch 1")
    assert BOUND <= absent["seconds"] < BOUND + SLACK, absent
    assert host_died["type"] == "CollectiveError", host_died
    assert "the process group's store failed during the condensation before epoch 1" in host_died["msg"]
    assert "(rank 0 under torchrun) may have died" in host_died["msg"] and host_died["seconds"] < BOUND + SLACK
    print(f"tcp store: rank 0 named the absent rank 1 after {absent['seconds']:.2f} s; rank 1 reported the dead host")


# -- one process ---------------------------------------------------------------------------------
def test_dcp_round_trip_in_one_process(tmp_path: Path) -> None:
    model = Model(N_EVEN)
    loader, ds = _loader()
    run(loader, ds, model, STOP)
    it = iter(loader)
    _x, _y, idx = next(it)
    loader.observe(idx, model(idx, ds.images))
    assert isinstance(loader, Stateful)
    with pytest.warns(UserWarning, match="assuming the intent is to"):
        dcp.save({"loader": loader}, checkpoint_id=tmp_path / "ck", no_dist=True)
    fresh, _ = _loader()
    with pytest.warns(UserWarning, match="assuming the intent is to"):
        dcp.load({"loader": fresh}, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert fresh.resume_position == 1
    assert_same_state(fresh.state_dict(), loader.state_dict())
    entry = DCP.pack(loader.state_dict())  # the entry is accepted anywhere, and checked
    other, _ = _loader()
    other.load_state_dict(entry)
    assert_same_state(other.state_dict(), loader.state_dict())
    with pytest.raises(ValueError, match="must hold the saved state's bytes under 'state', got bytes of 0 bytes"):
        other.load_state_dict(DCP.placeholder())
    with pytest.raises(ValueError, match="could not be read by torch.load"):
        other.load_state_dict({**entry, "state": b"garbage"})


def test_dcp_round_trip_of_a_batch_sampler(tmp_path: Path) -> None:
    """KCDBatchSampler delegates its state to its KCDLoader: DCP sees through it."""
    from kcd_fast import KCDBatchSampler

    ds = ArrayDataset(*make_data(N_EVEN))
    sampler = KCDBatchSampler(ds, SCHED, **loader_kwargs())
    model = Model(N_EVEN)
    for batch in sampler:  # lists of indices, as a DataLoader takes them
        idx = torch.tensor(batch, dtype=torch.int64)
        sampler.loader.observe(idx, model(idx, ds.images))
    assert sampler.loader.epoch == 1
    with pytest.warns(UserWarning, match="assuming the intent is to"):
        dcp.save({"sampler": sampler}, checkpoint_id=tmp_path / "ck", no_dist=True)
    fresh = KCDBatchSampler(ArrayDataset(*make_data(N_EVEN)), SCHED, **loader_kwargs())
    with pytest.warns(UserWarning, match="assuming the intent is to"):
        dcp.load({"sampler": fresh}, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert fresh.loader.epoch == 1
    assert_same_state(fresh.state_dict(), sampler.state_dict())


def test_collective_timeout_is_checked() -> None:
    ds = ArrayDataset(*make_data(10))
    for bad in (0, -1.0, float("inf"), "5", True):
        with pytest.raises(ValueError, match=f"collective_timeout must be None .* got {type(bad).__name__}"):
            KCDLoader(ds, SCHED, collective_timeout=bad)
    assert D.resolve(True, rank=0, world_size=1, collective_timeout=None).timeout is None
    assert D.resolve(True, rank=0, world_size=1, collective_timeout=7).timeout == 7.0
    assert D.resolve(True, rank=0, world_size=1).timeout == D.DEFAULT_COLLECTIVE_TIMEOUT == 300.0
