"""Times the handshake that precedes each of the loader's collectives
(``kcd_fast.distributed.handshake``: a post and a wait in the process group's store) next to
the tiny gloo all-reduce it guards (``kcd_fast.distributed.agree``), on local gloo processes
spawned for the purpose, with the store torchrun uses (TCP) and a file store.

    python benchmarks/handshake.py                  # 2 ranks, 200 repeats, tcp and file stores
    python benchmarks/handshake.py --world-size 2 --repeats 100 --stores tcp
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kcd_fast import distributed as D


def _worker(rank: int, world: int, init: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        info = D.resolve(None)
        shake, agree = [], []
        for k in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            D.handshake(info, "bench", k, f"repeat {k}")
            shake.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            D.agree(b"same on every rank")
            agree.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save({"handshake": shake, "agree": agree}, out)
    finally:
        dist.destroy_process_group()


def time_handshake(store: str = "tcp", world_size: int = 2, repeats: int = 200) -> dict[str, list[float]]:
    """Seconds per ``handshake`` and per ``agree`` on rank 0, ``repeats`` times each, on
    ``world_size`` local gloo processes whose store is ``store`` ("tcp" or "file")."""
    with tempfile.TemporaryDirectory() as d:
        if store == "tcp":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init = f"tcp://127.0.0.1:{port}"
        else:
            init = f"file://{os.path.join(d, 'init')}"
        out = os.path.join(d, "times.pt")
        mp.spawn(_worker, args=(world_size, init, repeats, out), nprocs=world_size)
        return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--stores", nargs="+", default=["tcp", "file"], choices=["tcp", "file"])
    args = p.parse_args()
    for store in args.stores:
        times = time_handshake(store, args.world_size, args.repeats)
        us = {k: sorted(1e6 * t for t in v) for k, v in times.items()}
        shake = us["handshake"]
        print(
            f"{store} store, {args.world_size} gloo ranks, {args.repeats} repeats: handshake median "
            f"{statistics.median(shake):.0f} us (p90 {shake[int(0.9 * len(shake))]:.0f}); "
            f"agree (a 16-byte all-reduce) median {statistics.median(us['agree']):.0f} us"
        )


if __name__ == "__main__":
    main()
