"""KCDBatchSampler: KCD for code that builds its own ``torch.utils.data.DataLoader``
(timm- or torchdistill-style training scripts): pass it as ``batch_sampler=``.

It is a :class:`kcd_fast.KCDLoader` on the indices back end: the same schedule, epoch
rules, condensation, VAKS (into the dataset's image storage), DDP sharding and state.
The one difference: a DataLoader with workers asks its batch sampler for batches ahead
of the training step (``prefetch_factor * num_workers`` of them), so the sampler cannot
know which batches were trained. It counts what was observed instead:

- the condensation at the end of an epoch happens once every yielded batch was observed
  (the last ``observe`` of the epoch), else at the next ``iter()`` (the DataLoader's next
  epoch), ``len()`` or ``set_epoch``;
- a mid-epoch ``state_dict()`` records the batches observed (named by their indices, see
  :mod:`kcd_fast.loader.progress`): a resume yields again the batches that had been
  fetched ahead but not trained.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ..condense import Vaks
from ..policies import InfoBatchSchedule
from ..schedule import CondensationSchedule
from .core import KCDLoader

__all__ = ["KCDBatchSampler"]


class KCDBatchSampler(Sampler[list[int]]):
    """Yields the KCD schedule's index batches (lists of ints) for a DataLoader.

    Args:
        dataset: the map-style dataset the DataLoader reads (its length is N; its uint8
            image storage, if any, receives the VAKS summaries; read-only for non-images).
        schedule, batch_size, shuffle, drop_last, seed, value, vaks, alpha, eps_m,
        temperature, device, strict, distributed, rank, world_size, group: as for
            :class:`kcd_fast.KCDLoader`.

    Use::

        sampler = KCDBatchSampler(train_set, schedule, batch_size=128, shuffle=True, seed=0)
        loader = DataLoader(kcd_fast.WithIndices(train_set), batch_sampler=sampler, num_workers=8)
        for epoch in range(schedule.epochs):
            for images, targets, indices in loader:
                logits = student(images)
                ...
                sampler.observe(indices, logits)

    ``kcd_fast.WithIndices(dataset)`` makes each sample ``(*sample, index)`` so that the
    batch carries its indices. With ``persistent_workers=True`` the workers must see the
    summarised images: use an :class:`kcd_fast.ArrayDataset` (shared memory) or
    ``vaks="off"``. A DataLoader with ``persistent_workers=True`` and workers over a dataset
    whose images VAKS blends into memory the workers do not share (a numpy ``.data``, a
    tensor not in shared memory) is detected when it first asks for a batch and warned
    about once (``UserWarning`` naming ``persistent_workers``): its workers hold copies
    made before the summaries and would yield stale images after the first condensation.
    It warns rather than refuses because the DataLoader is found from the call stack (its
    iterator asking for indices), which a wrapper around the sampler can hide.
    """

    def __init__(
        self,
        dataset: Any,
        schedule: CondensationSchedule | InfoBatchSchedule,
        batch_size: int = 1,
        shuffle: bool = False,
        *,
        drop_last: bool = False,
        seed: int = 0,
        **kcd_options: Any,
    ):
        for bad in (
            "backend",
            "num_workers",
            "collate_fn",
            "pin_memory",
            "persistent_workers",
            "prefetch_factor",
            "batch_device",
        ):
            if bad in kcd_options:
                raise TypeError(
                    f"KCDBatchSampler takes no {bad}={kcd_options[bad]!r}: it only yields indices; pass DataLoader "
                    "options to your DataLoader"
                )
        self.loader = KCDLoader(
            dataset,
            schedule,
            batch_size,
            shuffle,
            drop_last=drop_last,
            seed=seed,
            backend="indices",
            **kcd_options,
        )
        self.loader.sampler.on_set_epoch = None  # our own set_epoch is the loader's
        self.loader._reads_ahead = True
        self._warned_persistent = False

    # -- the Sampler surface ---------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        if not self._warned_persistent:
            self._check_persistent_workers(sys._getframe(1))
        for (idx,) in self.loader:
            yield idx.tolist()

    def _check_persistent_workers(self, frame: Any) -> None:
        """Warns once when the DataLoader iterating this sampler (found among the callers'
        frames: its iterator's ``_next_index``) keeps persistent workers over images that
        summaries blend into unshared memory."""
        images = self.loader.images
        if self.loader.config.vaks is Vaks.OFF or images is None or images.is_shared() or images.is_cuda:
            return
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        for _ in range(6):
            if frame is None:
                return
            it = frame.f_locals.get("self")
            if isinstance(it, _BaseDataLoaderIter):
                if getattr(it, "_persistent_workers", False) and getattr(it, "_num_workers", 0) > 0:
                    self._warned_persistent = True
                    warnings.warn(
                        "KCDBatchSampler: the DataLoader has persistent_workers=True, and VAKS blends summaries "
                        f"into {type(self.loader.dataset).__name__}'s images in this process's memory, which its "
                        "workers do not share: after the first condensation they would keep yielding the images "
                        "from before it. Pass persistent_workers=False, vaks='off', or keep the images in a "
                        "kcd_fast.ArrayDataset (shared memory)",
                        UserWarning,
                        stacklevel=2,
                    )
                return
            frame = frame.f_back

    def __len__(self) -> int:
        """Batches of the epoch the next ``iter()`` yields (see KCDLoader ``len``)."""
        if self.loader._lagging():
            return self.loader._batches_in(self.loader.epoch)  # the epoch in progress
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """``DistributedSampler.set_epoch`` semantics (``KCDLoader.set_epoch``)."""
        self.loader.set_epoch(epoch)

    # -- scoring ---------------------------------------------------------------------------
    def observe(self, indices: Any, logits: Any, teacher_logits: Any = None, *, mask: Any = None) -> None:
        """``KCDLoader.observe``: ``indices`` ``[B]`` as the batch carried them."""
        self.loader.observe(indices, logits, teacher_logits, mask=mask)
        self._settle_when_all_observed()

    def observe_scores(self, indices: Any, scores: Any) -> None:
        """``KCDLoader.observe_scores``."""
        self.loader.observe_scores(indices, scores)
        self._settle_when_all_observed()

    def weights(self, indices: Any) -> torch.Tensor:
        """``KCDLoader.weights``: each point's loss weight in the current epoch (InfoBatch)."""
        return self.loader.weights(indices)

    def _settle_when_all_observed(self) -> None:
        L = self.loader
        cur = L._cursor
        if cur.yielded == L._batches_in(L.epoch) and cur.trained >= cur.yielded:
            L._settle()  # the epoch's last yielded batch was observed: condense now

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``KCDLoader.state_dict``: mid-epoch, the position is the batches observed, not the
        batches the DataLoader fetched ahead (those are yielded again after a resume)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    # -- what KCDLoader exposes ------------------------------------------------------------
    epoch = property(lambda self: self.loader.epoch, doc="The epoch in progress.")
    schedule = property(lambda self: self.loader.schedule, doc="The condensation schedule.")
    history = property(lambda self: self.loader.history, doc="One record per condensation.")
    bank = property(lambda self: self.loader.bank, doc="The value bank.")
    batch_size = property(lambda self: self.loader.batch_size, doc="Points per batch.")
    drop_last = property(lambda self: self.loader.drop_last, doc="Whether a last partial batch is left out.")

    @property
    def active_indices(self) -> torch.Tensor:
        return self.loader.active_indices

    def total_steps(self, accumulate: int = 1, epochs: int | None = None) -> int:
        return self.loader.total_steps(accumulate, epochs)

    def steps_per_epoch(self) -> list[int]:
        return self.loader.steps_per_epoch()

    def save(self, path: Any) -> None:
        """``KCDLoader.save``: this sampler's state, atomically (every rank; rank 0 writes)."""
        self.loader.save(path)

    def restore(self, path: Any) -> None:
        self.loader.restore(path)

    def __repr__(self) -> str:
        return repr(self.loader).replace("KCDLoader", "KCDBatchSampler", 1)
