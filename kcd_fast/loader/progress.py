"""Progress through the epoch in progress: :class:`EpochCursor`.

Three counts are kept apart, all in batches of the epoch ``cursor.epoch`` on this rank:

- ``yielded``: batches the loader has handed out (``position`` of the next one);
- ``trained``: batches the loop has observed. An observe names its batch by its INDICES,
  never by how many calls arrived: ``observe(idx[mask], logits[mask])`` (a partial
  observe), two observes of halves of one batch, or one observe of two batches merged,
  each count their batches once. ``trained`` is one past the last batch any observed row
  belongs to (a fetcher trains batches in order; a batch whose rows were all masked out
  counts as trained once a later one is), never more than ``yielded``;
- ``iter_start`` / ``resume_at``: where the current iterator started, and where the next
  one resumes (a mid-epoch state, a batch whose fetch failed).

Worked example (batch_size 4, epoch order [9 2 7 0 | 5 1 8 3 | 6 4]): after three batches
were yielded and ``observe([9, 7], ...)``, ``observe([1], ...)``, ``observe([8, 3], ...)``,
``yielded`` is 3 and ``trained`` is 2 (batches 0 and 1: the third was read ahead by a
fetcher and is yielded again after a resume from a state taken now).

Indices on a CUDA device are looked up there (a gather and a max, no host sync); the
result is read when ``trained`` is asked for (the end of an epoch's iterator, a
``state_dict()``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._arrays import as_torch

__all__ = ["EpochCursor"]


class EpochCursor:
    """Where the loop stands in epoch ``epoch`` (see the module docstring).

    ``after_advance`` is True while the epoch was entered from the previous one by the
    loader (not by a load) and none of its batches was yielded yet: an observe arriving
    then belongs to the previous epoch (a late observe). ``condensed`` says whether a
    condensation ran at that advance."""

    def __init__(self, n: int, epoch: int = 0) -> None:
        self.n = int(n)
        self.reset(epoch, 0)

    def reset(
        self, epoch: int, position: int, *, after_advance: bool = False, condensed: bool = False, loaded: bool = False
    ) -> None:
        """A new epoch (``after_advance``: entered from the previous one) or a ``loaded``
        state at ``position`` batches into ``epoch``."""
        self.epoch = int(epoch)
        self.yielded = self.iter_start = self.resume_at = int(position)
        self.iterated = False  # an iterator was made for this epoch
        self.after_advance = after_advance
        self.loaded = loaded  # a state was loaded and no batch was yielded since
        self.condensed = condensed
        self.late_warned = False
        self._start_iterator(None, int(position))

    def begin(self, batches: list[np.ndarray], start: int) -> None:
        """A new iterator over ``batches`` (this rank's planned batches of the epoch, index
        arrays) that starts at batch ``start``."""
        self.iterated = True
        self.yielded = self.iter_start = int(start)
        self._start_iterator(batches, int(start))

    def _start_iterator(self, batches: list[np.ndarray] | None, start: int) -> None:
        self._batch_of: np.ndarray | None = None  # [N] int32: the batch position of each point, -1 if none
        self._batch_of_dev: dict[torch.device, torch.Tensor] = {}
        self._max_host = start - 1  # the last batch position observed (host indices)
        self._max_dev: torch.Tensor | None = None  # the same from device indices, not yet read
        if batches:
            bo = np.full(self.n, -1, dtype=np.int32)
            sizes = [int(b.shape[0]) for b in batches]
            bo[np.concatenate(batches)] = np.repeat(np.arange(len(batches), dtype=np.int32), sizes)
            self._batch_of = bo

    # -- events --------------------------------------------------------------------------
    def yielded_batch(self, k: int) -> None:
        """Batch ``k - 1`` was handed out: ``k`` batches of the epoch are yielded."""
        self.yielded = int(k)
        self.after_advance = self.loaded = False

    def is_late(self) -> bool:
        """An observe now belongs to the previous epoch, whose condensation already ran."""
        return self.after_advance and self.condensed and self.yielded == 0

    def observed(self, indices: Any) -> None:
        """Records the batches ``indices`` (``[B]`` integers, any device, already validated
        by the value bank) belong to."""
        if self._batch_of is None:
            return
        idx, _ = as_torch(indices, "indices")
        if idx.numel() == 0:
            return
        if idx.device.type == "cpu":
            pos = self._batch_of.take(idx.numpy(), mode="clip")  # clipped like the CUDA path; 3x np.clip + index
            self._max_host = max(self._max_host, int(pos.max()))
            return
        table = self._batch_of_dev.get(idx.device)
        if table is None:
            table = self._batch_of_dev[idx.device] = torch.from_numpy(self._batch_of).to(idx.device)
        m = table[idx.clamp(0, self.n - 1)].max().to(torch.int64)  # no host sync
        self._max_dev = m if self._max_dev is None else torch.maximum(self._max_dev, m)

    # -- what was trained ----------------------------------------------------------------
    @property
    def trained(self) -> int:
        """Batches of the epoch trained: one past the last observed batch, at most
        ``yielded``; ``iter_start`` when the current iterator's batches were not observed."""
        if self._max_dev is not None:  # reads the device lookups (a host sync)
            self._max_host = max(self._max_host, int(self._max_dev))
            self._max_dev = None
        return max(self.iter_start, min(self._max_host + 1, self.yielded))

    def observed_any(self) -> bool:
        """Some batch of the current iterator was observed."""
        return self.trained > self.iter_start

    def lagging(self, reads_ahead: bool) -> bool:
        """Fewer batches were trained than yielded: a fetcher read ahead of the training
        step (once some batch of the epoch was trained, in this run or before a resume;
        from the start when the loader reads ahead, as behind a DataLoader's workers)."""
        trained = self.trained
        return trained < self.yielded and (trained > 0 or reads_ahead)

    def peeked(self, reads_ahead: bool) -> bool:
        """The current iterator yielded a single batch and none of it was observed (such as
        ``next(iter(loader))`` on an epoch of one batch)."""
        return self.yielded - self.iter_start == 1 and not reads_ahead and not self.observed_any()
