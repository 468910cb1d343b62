"""Epoch planning: which points an epoch visits, in which order, on which rank, in which
batches, and the seeds of its random streams. Pure functions of ``(seed, epoch)``, the
active set and the configuration, so every rank and every resume plans the same epoch.

Worked example: active = [0, 2, 3, 5, 8] (n = 5), batch_size = 2, one rank::

    shuffle=False: order = [0, 2, 3, 5, 8] -> batches [0 2] [3 5] [8]
    shuffle=True:  order = active[default_rng([seed, epoch]).permutation(5)]
    drop_last=True: the last n mod B = 1 point of the order is not visited this epoch

Under DDP each rank takes its shard of the global order first
(:func:`kcd_fast.distributed.shard_order`), then cuts it into batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import distributed as D

__all__ = ["UNOBSERVED_STREAM", "VAKS_STREAM", "WORKER_STREAM", "EpochPlan", "Planner", "stream_seed"]

# RNG streams, all derived from (seed, epoch): the epoch order uses default_rng([seed, epoch]).
WORKER_STREAM = 1
VAKS_STREAM = 2
UNOBSERVED_STREAM = 3  # the order among never-observed points, when they outnumber the points kept


def stream_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A 63-bit seed for one RNG stream of one epoch (of one rank, for rank > 0: under DDP
    each rank's workers draw their own augmentations; rank 0's equal a single process's)."""
    key = [seed, epoch, stream] if rank == 0 else [seed, epoch, stream, rank]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class EpochPlan:
    """One epoch on this rank: ``order`` ``[m]`` int64 (this rank's points in visiting
    order) and ``batches`` (int64 ``[b]`` views of it, the last partial one left out with
    ``drop_last``); ``worker_seed`` keys the back end's randomness to the epoch."""

    epoch: int
    order: np.ndarray
    batches: list[np.ndarray]
    worker_seed: int


@dataclass(frozen=True)
class Planner:
    """Plans epochs for one loader configuration on one rank."""

    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    dist: D.DistInfo

    def order(self, active: np.ndarray, epoch: int) -> np.ndarray:
        """``[n_e]`` int64: the global visiting order of ``active`` in ``epoch`` (a copy)."""
        if not self.shuffle:
            return active.copy()
        return active[np.random.default_rng([self.seed, epoch]).permutation(active.shape[0])]

    def rank_order(self, order: np.ndarray) -> np.ndarray:
        """This rank's shard of the global ``order`` (``order`` itself when not distributed)."""
        if not self.dist.enabled:
            return order
        return D.shard_order(order, self.dist.rank, self.dist.world_size, self.drop_last)

    def _rank_points(self, n: int) -> int:
        return D.shard_size(n, self.dist.world_size, self.drop_last) if self.dist.enabled else n

    def num_batches(self, n: int) -> int:
        """Batches this rank runs in an epoch of ``n`` (global) points."""
        m = self._rank_points(n)
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def samples(self, n: int) -> int:
        """Samples this rank's batches hold in an epoch of ``n`` (global) points: the
        ``drop_last`` cut and, under DDP, the shard (padded or cut) accounted for."""
        m = self._rank_points(n)
        return m - m % self.batch_size if self.drop_last else m

    def plan(self, active: np.ndarray, epoch: int) -> EpochPlan:
        """The plan of ``epoch`` over the (global, ascending) ``active`` set."""
        order = self.rank_order(self.order(active, epoch))
        n_batches, bs = self.num_batches(active.shape[0]), self.batch_size
        batches = [order[k * bs : (k + 1) * bs] for k in range(n_batches)]
        seed = stream_seed(self.seed, epoch, WORKER_STREAM, self.dist.rank)
        return EpochPlan(epoch, order, batches, seed)
