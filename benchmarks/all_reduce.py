"""Times the value bank's per-condensation all-reduce (``ValueBank.all_reduce_``:
``N * (8 + 4)`` bytes) on local gloo processes (CPU), spawned for the purpose.

    python benchmarks/all_reduce.py                 # N = 1,281,167 (ImageNet-1k), 2 ranks, 7 repeats
    python benchmarks/all_reduce.py --n 50000 --world-size 2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kcd_fast import ValueBank


def _bench_worker(rank: int, world: int, init_file: str, n: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = ValueBank(n, period=40, local=True)
        times = []
        for _ in range(repeats):
            bank.local_sums.uniform_(0, 4, generator=torch.Generator().manual_seed(rank))
            bank.local_counts.fill_(1)
            dist.barrier()
            t0 = time.perf_counter()
            bank.all_reduce_()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def time_all_reduce(n: int = 1_281_167, world_size: int = 2, repeats: int = 7) -> list[float]:
    """Seconds ``ValueBank.all_reduce_`` takes on rank 0 (the communication of one
    condensation: ``n * (8 + 4)`` bytes), for ``repeats`` repeats, on ``world_size``
    local gloo processes (CPU) spawned for the purpose. Default ``n``: ImageNet-1k's
    training set. Example::

        python benchmarks/all_reduce.py [--n N] [--world-size W] [--repeats R]
    """
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.pt")
        mp.spawn(_bench_worker, args=(world_size, os.path.join(d, "init"), n, repeats, out), nprocs=world_size)
        return list(torch.load(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_281_167, help="points in the value bank (default: ImageNet-1k)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    times = time_all_reduce(args.n, args.world_size, args.repeats)
    ms = [1e3 * t for t in times]
    print(
        f"all_reduce_ of N = {args.n} ({args.n * 12 / 1e6:.1f} MB) on {args.world_size} gloo ranks: "
        f"median {statistics.median(ms):.2f} ms, min {min(ms):.2f} ms over {len(ms)} repeats"
    )


if __name__ == "__main__":
    main()
