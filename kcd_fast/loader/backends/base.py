"""What every back end shares: the protocol the loader core calls, the batch sampler the
core refills each epoch, and the images a summary applies to.

A back end only moves and transforms samples. The core plans each epoch as a list of
index batches and calls, in this order over a run:

- ``epoch_batches(batches, seed, start) -> iterator``: one collated batch per entry of
  ``batches[start:]`` (int64 ``[b]`` numpy arrays of dataset indices), in order; ``seed``
  keys any randomness the back end owns to the epoch, so that batch ``k`` is the same
  whether the epoch starts at 0 or resumes at ``start <= k`` (a mid-epoch resume);
- ``apply_summary(summary)``: a condensation summarised pairs ``(dst, src, eps)``;
  the back end's images (:class:`ArrayImages`, or the DALI folder overlay) take it, and
  the next epoch reads the summarised images. The one call that applies a summary;
- ``prepare_restore(applied, summaries, digest) -> commit``: a resume; validates and
  replays the state's summary log without changing anything, ``commit()`` then installs it;
- ``images_digest(summaries)``: the digest a state records (None where there is none);
- ``close()``: release workers / pipelines (the back end can iterate again afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from ..state import Summary, blend_rows, images_digest, is_prefix, prepare_array_replay, touched_rows

__all__ = [
    "ArrayImages",
    "BackendProtocol",
    "EpochBatchSampler",
    "KeyedBatch",
    "NoImages",
    "Restore",
    "StorageSummaries",
    "batch_seed",
    "check_prefix",
]

Restore = Callable[[], None]


class BackendProtocol(Protocol):
    name: str
    sampler: Sampler

    @property
    def images(self) -> torch.Tensor | None: ...

    def epoch_batches(self, batches: list[np.ndarray], seed: int, start: int = 0) -> Iterator[Any]: ...

    def apply_summary(self, summary: Summary) -> None: ...

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Restore: ...

    def images_digest(self, summaries: list[Summary]) -> str | None: ...

    def close(self) -> None: ...


class KeyedBatch(list):
    """One batch of dataset indices and ``seed``, the seed of its random numbers (a
    function of the epoch's seed and the batch's position in the epoch)."""

    seed: int = 0


_M64 = (1 << 64) - 1


def batch_seed(epoch_seed: int, k: int) -> int:
    """The seed of batch ``k`` of an epoch whose stream seed is ``epoch_seed``: a 32-bit
    splitmix64 hash of the pair (what ``np.random.seed`` takes; ~1 us, where a
    ``SeedSequence`` costs 20 us per batch)."""
    z = (epoch_seed + (k + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 32


class EpochBatchSampler(Sampler[list[int]]):
    """Yields the index batches the core planned for the current epoch (from ``start``),
    each a :class:`KeyedBatch`. ``set_epoch`` forwards to the loader that owns it.

    Each :meth:`set_batches` (the loader's ``iter()``) allows one iteration, by the back end
    during that epoch; the loader disallows it again when the epoch's iterator ends. Any
    other iteration (a DataLoader built around ``loader.batch_sampler``, as accelerate's
    ``skip_first_batches`` builds, after a resume or between epochs) raises: it would replay
    a stale plan, without indices. ``len()`` is the current epoch's batches (``length``,
    given by the loader) outside an iteration, like ``len(loader)``."""

    def __init__(self) -> None:
        self._batches: list[np.ndarray] = []
        self._seed = 0
        self._start = 0
        self._allowed = False
        self.on_set_epoch: Callable[[int], None] | None = None
        self.length: Callable[[], int] | None = None

    def set_batches(self, batches: list[np.ndarray], seed: int = 0, start: int = 0) -> None:
        self._batches, self._seed, self._start = batches, seed, start
        self._allowed = True

    def disallow(self) -> None:
        """The loader's iterator for the planned epoch ended: no further iteration."""
        self._allowed = False

    def __iter__(self) -> Iterator[list[int]]:
        if not self._allowed:
            raise RuntimeError(
                "a KCDLoader's batch sampler (loader.sampler / loader.batch_sampler) was iterated outside the "
                "loader (for example by accelerate's skip_first_batches, which builds a DataLoader around it): "
                "iterate the KCDLoader itself; after a resume it already skips the batches its state records as "
                "trained"
            )
        self._allowed = False
        batches = self._batches
        for k in range(self._start, len(batches)):
            b = KeyedBatch(batches[k].tolist())
            b.seed = batch_seed(self._seed, k)
            yield b

    def __len__(self) -> int:
        if self._allowed or self.length is None:
            return len(self._batches) - self._start
        return self.length()

    def set_epoch(self, epoch: int) -> None:
        if self.on_set_epoch is not None:
            self.on_set_epoch(epoch)


def check_prefix(applied: list[Summary], summaries: list[Summary]) -> None:
    """``ValueError`` unless the summaries applied so far start the state's log."""
    if not is_prefix(applied, summaries):
        raise ValueError(
            "this loader's images were already summarised along a different history than the state's; "
            "build a new KCDLoader over a freshly loaded ORIGINAL dataset and load the state into it"
        )


class ArrayImages:
    """Summaries of an in-memory uint8 ``[N, ...]`` store (``ArrayDataset.images`` or a
    torchvision-style ``.data`` view), blended in place with ``blend_``."""

    def __init__(self, storage: torch.Tensor):
        self.storage = storage

    def apply(self, summary: Summary) -> None:
        blend_rows(self.storage, summary)

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Callable[[], bool]:
        check_prefix(applied, summaries)
        return prepare_array_replay(self.storage, applied, summaries, digest)

    def digest(self, summaries: list[Summary]) -> str | None:
        if not summaries:
            return None
        rows = touched_rows(summaries)
        return images_digest(rows, self.storage[rows.to(self.storage.device)])


class StorageSummaries:
    """What a back end that reads its images straight from their storage does with summaries
    (indices, tensor): they blend into the storage (``self._targets``: :class:`ArrayImages`
    or :class:`NoImages`), with no workers to restart."""

    _targets: ArrayImages | NoImages

    @property
    def images(self) -> torch.Tensor | None:
        return self._targets.storage

    def apply_summary(self, summary: Summary) -> None:
        self._targets.apply(summary)

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Restore:
        commit_rows = self._targets.prepare_restore(applied, summaries, digest)
        return lambda: None if commit_rows() else None

    def images_digest(self, summaries: list[Summary]) -> str | None:
        return self._targets.digest(summaries)

    def close(self) -> None:
        pass


class NoImages:
    """A dataset without blendable images (``vaks="off"``): no summary can apply."""

    storage = None

    def apply(self, summary: Summary) -> None:
        raise RuntimeError("this loader's dataset has no image storage to summarise into")

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Callable[[], bool]:
        if summaries:
            raise ValueError("the state holds image summaries but this loader's dataset has no image storage")
        return lambda: False

    def digest(self, summaries: list[Summary]) -> str | None:
        return None
