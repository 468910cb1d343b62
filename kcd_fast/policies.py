"""Pruning policies besides KCD's schedule: InfoBatch's rule (Qin et al., ICLR 2024).

:class:`InfoBatchSchedule` goes wherever a :class:`kcd_fast.CondensationSchedule` goes
(``KCDLoader``, ``KCDBatchSampler``, the Lightning callback); the loader then keeps, per
point, its latest per-sample loss (``loader.observe_scores(indices, losses)``) and, before
every epoch, draws the epoch's points by InfoBatch's rule (:func:`infobatch_select`), and
gives each yielded point its loss weight (``loader.weights(indices)``).

The rule, before epoch ``e`` (0-based) of ``epochs``:

- ``e < floor(delta * epochs)`` (InfoBatch's ``iterations <= delta * num_epochs`` with its
  1-based count): the points whose score is below the mean of all N scores are "well
  learned"; of those, a seeded random ``floor(keep_ratio * count)`` are kept with weight
  ``1 / keep_ratio`` (``keep_ratio = 1 - prune_ratio``), the others are skipped this epoch;
  every other point is kept with weight 1.
- later epochs: every point, weight 1.

Every point starts with score 3.0 (InfoBatch's initial value), so epoch 0 trains on all
points. Worked example (N = 6, prune_ratio 0.5)::

    scores = [0.1, 2.0, 0.2, 5.0, 0.3, 3.0]  mean 1.7667
    well learned (below the mean): [0, 2, 4] -> keep floor(0.5 * 3) = 1 of them, drawn with
    default_rng(stream_seed(seed, epoch, 4)).choice([0, 2, 4], 1, replace=False), e.g. [2]
    active = [1, 2, 3, 5]; weights: 2.0 for point 2, 1.0 for the others

Differences from InfoBatch's released code are in docs/algorithm.md section 10.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _arrays as A
from ._checks import check_int, is_finite_number

__all__ = ["INFOBATCH_STREAM", "InfoBatchSchedule", "LossScores", "infobatch_select"]

INFOBATCH_STREAM = 4  # the RNG stream of InfoBatch's draw (kcd_fast.loader.plan.stream_seed's numbering)


class InfoBatchSchedule:
    """InfoBatch's pruning rule as a schedule for :class:`kcd_fast.KCDLoader`.

    Args:
        epochs: training epochs (InfoBatch's ``num_epochs``), >= 1.
        prune_ratio: the share of the well-learned points skipped in a pruned epoch, in
            ``[0, 0.9]`` (InfoBatch clamps its keep ratio to >= 0.1; this refuses instead).
        delta: the pruned share of the run, in ``[0, 1]``: epochs ``0 .. floor(delta *
            epochs) - 1`` are pruned, later epochs train on every point (0.875, InfoBatch's
            default).
        initial_score: every point's score before it is first observed (3.0, InfoBatch's).

    The epochs' sizes depend on the scores: ``epoch_sizes(n)`` gives the upper bound (n for
    every epoch); the loader's ``steps_per_epoch()`` gives the decided size for epochs up to
    the current one and that bound for later ones.
    """

    kind = "infobatch"
    period = 1  # the loader's value bank is not used; it needs a period

    def __init__(self, epochs: int, prune_ratio: float = 0.5, delta: float = 0.875, initial_score: float = 3.0):
        self.epochs = check_int(epochs, "epochs", 1)
        if not (is_finite_number(prune_ratio) and 0.0 <= prune_ratio <= 0.9):
            raise ValueError(f"prune_ratio must be a number in [0, 0.9], got {prune_ratio!r}")
        if not (is_finite_number(delta) and 0.0 <= delta <= 1.0):
            raise ValueError(f"delta must be a number in [0, 1], got {delta!r}")
        if not is_finite_number(initial_score):
            raise ValueError(f"initial_score must be a finite number, got {initial_score!r}")
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.initial_score = float(initial_score)

    @property
    def keep_ratio(self) -> float:
        """The share of the well-learned points kept in a pruned epoch: ``1 - prune_ratio``."""
        return 1.0 - self.prune_ratio

    @property
    def prune_epochs(self) -> int:
        """Epochs ``0 .. prune_epochs - 1`` are pruned: ``floor(delta * epochs)``, the same
        float product InfoBatch compares against."""
        return math.floor(self.delta * self.epochs)

    def prunes(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is drawn by the rule (else it trains on every point)."""
        self._check_epoch(epoch)
        return epoch < self.prune_epochs

    @property
    def condensation_epochs(self) -> list[int]:
        """Epochs that start with a new draw: every epoch after the first (the scores are
        merged at every epoch boundary; the draw after the pruned epochs is the full set)."""
        return list(range(1, self.epochs))

    def epoch_sizes(self, n: int) -> list[int]:
        """Upper bounds of the points per epoch (n each): the actual sizes depend on the scores."""
        n = check_int(n, "n", 1)
        return [n] * self.epochs

    def target_count(self, epoch: int, n: int) -> int:
        """The upper bound of the points of ``epoch`` (n)."""
        self._check_epoch(epoch)
        return check_int(n, "n", 1)

    def stage_of(self, epoch: int) -> int:
        """Each epoch is its own stage (1-based), for the loader's history records."""
        self._check_epoch(epoch)
        return epoch + 1

    def _check_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must be an int in [0, {self.epochs}), got {epoch!r}")

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "epochs": self.epochs,
            "prune_ratio": self.prune_ratio,
            "delta": self.delta,
            "initial_score": self.initial_score,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InfoBatchSchedule) and self.state() == other.state()

    def __hash__(self) -> int:
        return hash(tuple(self.state().items()))

    def __repr__(self) -> str:
        return (
            f"InfoBatchSchedule(epochs={self.epochs}, prune_ratio={self.prune_ratio}, delta={self.delta}, "
            f"initial_score={self.initial_score})"
        )


def infobatch_select(scores: np.ndarray, keep_ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """InfoBatch's draw: ``(active, upweighted)``, both int64 ascending.

    scores: ``[N]`` float64. The well-learned points (``scores < scores.mean()``) keep a
    random ``floor(keep_ratio * count)`` of themselves (``rng.choice(well, k,
    replace=False)``); ``upweighted`` are those (weight ``1 / keep_ratio``); ``active`` is
    them and every other point."""
    well = np.flatnonzero(scores < scores.mean())
    k = int(keep_ratio * well.shape[0])
    chosen = rng.choice(well, k, replace=False) if k else np.zeros(0, dtype=np.int64)
    keep = np.ones(scores.shape[0], dtype=bool)
    keep[well] = False
    keep[chosen] = True
    return np.flatnonzero(keep).astype(np.int64), np.sort(chosen).astype(np.int64)


class LossScores:
    """Each point's latest per-sample loss, for :class:`InfoBatchSchedule`.

    ``scores`` ``[N]`` float64 is global: the same on every rank, changed only at epoch
    boundaries (:meth:`merge`). In between, each rank records its own observations in
    ``fresh`` (the latest loss per point on this rank) and ``seen`` (observed this epoch);
    :meth:`merge` folds them in (under DDP one all-reduce of ``N * 16`` bytes: a point
    observed on several ranks in one epoch, a padded point, takes the mean of their
    latest losses; on one rank, its latest loss, as InfoBatch)."""

    def __init__(self, n: int, schedule: InfoBatchSchedule):
        self.n = n
        self.schedule = schedule
        self.scores = np.full(n, schedule.initial_score, dtype=np.float64)
        self.fresh = np.zeros(n, dtype=np.float64)
        self.seen = np.zeros(n, dtype=np.float64)  # counts (float64: one all-reduce dtype)
        self.upweighted = np.zeros(0, dtype=np.int64)
        self.weight = np.ones(n, dtype=np.float32)
        self.sizes: list[int] = []  # points of each epoch decided so far

    def check(self, indices: Any, losses: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, losses)`` as int64 / float64 numpy arrays; ``ValueError`` / ``TypeError``
        naming the argument for a bad shape, dtype, index or a non-finite loss."""
        idx_t, _ = A.as_torch(indices, "indices")
        loss_t, _ = A.as_torch(losses, "losses")
        if idx_t.dim() != 1 or loss_t.dim() != 1 or idx_t.shape[0] != loss_t.shape[0]:
            raise ValueError(
                f"indices and losses must be [B] tensors of one length, got {tuple(idx_t.shape)} and "
                f"{tuple(loss_t.shape)}"
            )
        if idx_t.is_floating_point() or idx_t.is_complex() or idx_t.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {A.dtype_name(idx_t)}")
        if not (loss_t.is_floating_point() or loss_t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"losses must be real numbers, got {A.dtype_name(loss_t)}")
        idx = idx_t.detach().to("cpu", torch.int64).numpy()
        loss = loss_t.detach().to("cpu", torch.float64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            bad = int(idx[(idx < 0) | (idx >= self.n)][0])
            raise ValueError(f"indices must be in [0, {self.n}), got {bad}")
        if not np.isfinite(loss).all():
            j = int(np.flatnonzero(~np.isfinite(loss))[0])
            raise ValueError(f"losses[{j}] is {loss[j]} (index {int(idx[j])}): losses must be finite")
        return idx, loss

    def observe(self, idx: np.ndarray, loss: np.ndarray) -> None:
        """Records checked losses (:meth:`check`): the latest per point wins on this rank."""
        self.fresh[idx] = loss
        self.seen[idx] = 1.0

    def merge(self, group: Any = None, communicates: bool = False) -> None:
        """Folds this epoch's observations into ``scores`` (a collective when ``communicates``)."""
        fresh, seen = self.fresh * (self.seen > 0), self.seen.copy()
        if communicates:
            from .distributed import all_reduce_sum_

            both = torch.from_numpy(np.stack([fresh, seen]))
            all_reduce_sum_([both], group)
            fresh, seen = both[0].numpy(), both[1].numpy()
        hit = seen > 0
        self.scores[hit] = fresh[hit] / seen[hit]
        self.fresh[:] = 0.0
        self.seen[:] = 0.0

    def select(self, epoch: int, seed: int) -> np.ndarray:
        """Draws the points of ``epoch`` (call after :meth:`merge`); returns them ascending
        and sets the weights."""
        from .loader.plan import stream_seed

        sch = self.schedule
        if sch.prunes(epoch):
            rng = np.random.default_rng(stream_seed(seed, epoch, INFOBATCH_STREAM))
            active, up = infobatch_select(self.scores, sch.keep_ratio, rng)
        else:
            active, up = np.arange(self.n, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.set_upweighted(up)
        del self.sizes[epoch:]
        self.sizes.extend([self.n] * (epoch - len(self.sizes)))  # epochs jumped over: trained on all
        self.sizes.append(int(active.shape[0]))
        return active

    def set_upweighted(self, up: np.ndarray) -> None:
        self.upweighted = up
        self.weight = np.ones(self.n, dtype=np.float32)
        self.weight[up] = np.float32(1.0 / self.schedule.keep_ratio)

    # -- state ------------------------------------------------------------------------------
    def state(self, group: Any = None, communicates: bool = False) -> dict[str, Any]:
        """The global state (a collective when ``communicates``: this epoch's observations of
        every rank, summed)."""
        fresh, seen = self.fresh * (self.seen > 0), self.seen.copy()
        if communicates:
            from .distributed import all_reduce_sum_

            both = torch.from_numpy(np.stack([fresh, seen]))
            all_reduce_sum_([both], group)
            fresh, seen = both[0].numpy().copy(), both[1].numpy().copy()
        return {
            "scores": torch.from_numpy(self.scores.copy()),
            "fresh": torch.from_numpy(fresh),
            "seen": torch.from_numpy(seen),
            "upweighted": torch.from_numpy(self.upweighted.copy()),
            "sizes": list(self.sizes),
        }

    def check_state(self, state: Any, epoch: int) -> dict[str, np.ndarray]:
        """Validated numpy copies of a :meth:`state`; ``ValueError`` naming the field."""
        if not isinstance(state, dict):
            raise ValueError(f"state infobatch must be a dict, got {type(state).__name__}")
        out: dict[str, Any] = {}
        for key, dtype in (("scores", torch.float64), ("fresh", torch.float64), ("seen", torch.float64)):
            t = state.get(key)
            if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == (self.n,)):
                raise ValueError(f"state infobatch {key} must be a float64 [{self.n}] tensor")
            a = t.cpu().numpy().copy()
            if not np.isfinite(a).all():
                raise ValueError(f"state infobatch {key} must be finite")
            out[key] = a
        up = state.get("upweighted")
        if not (isinstance(up, torch.Tensor) and up.dtype == torch.int64 and up.dim() == 1):
            raise ValueError("state infobatch upweighted must be an int64 [k] tensor")
        u = up.cpu().numpy().copy()
        if u.size and (u[0] < 0 or u[-1] >= self.n or not (np.diff(u) > 0).all()):
            raise ValueError(f"state infobatch upweighted must be ascending, unique points in [0, {self.n})")
        out["upweighted"] = u
        sizes = state.get("sizes")
        ok = isinstance(sizes, list) and all(isinstance(s, (int, np.integer)) and 1 <= s <= self.n for s in sizes)
        if not ok or len(sizes) != min(epoch + 1, self.schedule.epochs):
            raise ValueError(
                f"state infobatch sizes must be a list of {min(epoch + 1, self.schedule.epochs)} ints in [1, {self.n}]"
            )
        out["sizes"] = [int(s) for s in sizes]
        return out

    def load(self, checked: dict[str, Any], rank: int) -> None:
        """Commits :meth:`check_state`'s output; rank 0 holds the epoch's observations so far
        (the others start from zero, so that the next merge counts them once)."""
        self.scores = checked["scores"]
        self.fresh = checked["fresh"] if rank == 0 else np.zeros(self.n, dtype=np.float64)
        self.seen = checked["seen"] if rank == 0 else np.zeros(self.n, dtype=np.float64)
        # fresh holds sums over ranks: keep it a per-point value with seen as its count
        hit = self.seen > 0
        self.fresh[hit] = self.fresh[hit] / self.seen[hit]
        self.seen[hit] = 1.0
        self.set_upweighted(checked["upweighted"])
        self.sizes = list(checked["sizes"])
