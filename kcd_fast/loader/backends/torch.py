"""The torch back end: ``torch.utils.data.DataLoader`` worker processes, per-item
``dataset[i]`` and ``collate_fn``, exactly what a DataLoader user already runs.

Random numbers: each batch is fetched with torch's, numpy's and Python's global RNGs
seeded from ``(seed, epoch, rank, batch position)`` (:class:`BatchSeeded`), so a transform
that draws from them augments batch ``k`` the same way whatever the number of workers,
whether they persist, and whether the epoch started at its first batch or resumed at a
later one. In worker processes those RNGs are the loader's own (the DataLoader seeds them
at a worker's start); in the caller's process (``num_workers=0``) they are restored after
each fetch, so the caller's RNG states are untouched.

Bad samples: for a dataset of image files (``.samples``), each file is checked to be a
regular, readable file before the dataset opens it (a FIFO named ``x.jpg`` would block a
worker forever); an ``OSError`` while fetching sample ``i`` (a missing file, a special file,
bytes that do not decode) is raised as :class:`kcd_fast.UnreadableSampleError` naming the
file, the dataset index and the reason (a missing file: ``MissingSampleError``, which is a
``FileNotFoundError`` too).

Batches: the samples are collated by ``collate_fn`` (default: torch's ``default_collate``)
and the loader appends the indices. A batch that is a list of strings (``default_collate``
of string samples) is one field: a dataset of strings yields ``(list_of_str, indices)``."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ...data.errors import UnreadableSampleError, check_regular, sample_error
from ...data.folders import is_image_folder
from ..state import Summary
from .base import ArrayImages, EpochBatchSampler, NoImages, Restore

__all__ = ["BatchSeeded", "TorchBackend"]


def _seed_globals(seed: int) -> None:
    """Seeds torch's CPU generator, numpy's legacy global RNG and Python's ``random``."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global a transform may draw from)
    random.seed(seed)


class BatchSeeded:
    """A map-style dataset fetched a batch at a time with its RNGs seeded per batch.

    ``__getitems__(batch)`` (what ``DataLoader`` calls with a batch sampler) fetches the
    items of a :class:`KeyedBatch` with torch's, numpy's and Python's global RNGs seeded
    from ``batch.seed``; in the caller's own process (``num_workers=0``) the three states
    are restored afterwards. Every other attribute is the wrapped dataset's."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        # a dataset that says it draws no random numbers (ArrayDataset without a random
        # transform) is fetched without touching any RNG
        self.seeded = bool(getattr(dataset, "random_transform", True))
        # image files (.samples): each is checked to be a regular file before the dataset opens it
        self.files = is_image_folder(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: list[int]) -> list[Any]:
        seed = getattr(batch, "seed", None)
        if seed is None or not self.seeded:
            return self._fetch(list(batch))
        if torch.utils.data.get_worker_info() is not None:
            # a worker process: its global RNGs belong to the loader (DataLoader seeds them
            # itself at the worker's start), so they are seeded per batch and not restored
            _seed_globals(seed)
            return self._fetch(list(batch))
        # the caller's process (num_workers=0): seeded for the fetch, restored afterwards
        # (numpy's whole legacy state: its cached Gaussian lives outside the bit generator)
        torch_state, np_state, py_state = torch.default_generator.get_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
        try:
            _seed_globals(seed)
            return self._fetch(list(batch))
        finally:
            torch.default_generator.set_state(torch_state)
            np.random.set_state(np_state)  # noqa: NPY002
            random.setstate(py_state)

    def _fetch(self, batch: list[int]) -> list[Any]:
        if self.files:
            for i in batch:
                check_regular(self._path(i), index=i, where="backend='torch'")
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return getitems(batch)
        return [self._item(i) for i in batch]

    def _path(self, i: int) -> str:
        return os.fspath(self.dataset.samples[i][0])

    def _item(self, i: int) -> Any:
        """``dataset[i]``; an ``OSError`` becomes :class:`UnreadableSampleError` naming the index."""
        try:
            return self.dataset[i]
        except UnreadableSampleError as err:
            if err.index is not None:
                raise
            raise type(err)(
                f"{err} (dataset index {i}, backend='torch')", path=err.path, index=i, reason=err.reason
            ) from err
        except OSError as err:
            path = self._path(i) if self.files else getattr(err, "filename", None)
            reason = f"cannot be read: {type(err).__name__}: {err}"
            if path is None:
                raise UnreadableSampleError(
                    f"sample {i} of {type(self.dataset).__name__} {reason} (dataset index {i}, backend='torch')",
                    index=i,
                    reason=reason,
                ) from err
            missing = isinstance(err, FileNotFoundError)
            raise sample_error(os.fspath(path), reason, index=i, where="backend='torch'", missing=missing) from err

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TorchBackend:
    """One ``torch.utils.data.DataLoader`` over a batch sampler that the core refills each
    epoch. With ``persistent_workers`` the workers live across epochs; they are restarted
    after a summary unless the images are a shared-memory torch tensor (``ArrayDataset``),
    so workers always read the summarised images. Worker base seeds come from a private
    generator reseeded every epoch (never the global RNG).

    Args:
        dataset: the map-style dataset.
        storage: its blendable uint8 ``[N, ...]`` images, or None (``vaks="off"``).
        loader_kwargs: ``torch.utils.data.DataLoader`` arguments (``num_workers``, ...).
    """

    name = "torch"

    def __init__(self, dataset: Any, *, storage: torch.Tensor | None, **loader_kwargs: Any):
        self.dataset = dataset
        self.sampler = EpochBatchSampler()
        self._generator = torch.Generator()
        self._kwargs = {k: v for k, v in loader_kwargs.items() if v is not None}
        self._targets = ArrayImages(storage) if storage is not None else NoImages()
        persistent = bool(loader_kwargs.get("persistent_workers"))
        shared = storage is not None and storage.device.type == "cpu" and storage.is_shared()
        self._restart_on_change = persistent and not shared
        self._loader: DataLoader | None = None

    @property
    def images(self) -> torch.Tensor | None:
        return self._targets.storage

    def epoch_batches(self, batches: list[np.ndarray], seed: int, start: int = 0) -> Iterator[Any]:
        self.sampler.set_batches(batches, seed, start)
        self._generator.manual_seed(seed)
        if self._loader is None:
            self._loader = DataLoader(
                BatchSeeded(self.dataset), batch_sampler=self.sampler, generator=self._generator, **self._kwargs
            )
        return _one_field_strings(iter(self._loader))

    def _images_changed(self) -> None:
        if self._restart_on_change:
            self.close()

    def apply_summary(self, summary: Summary) -> None:
        self._targets.apply(summary)
        self._images_changed()

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Restore:
        commit_rows = self._targets.prepare_restore(applied, summaries, digest)

        def commit() -> None:
            if commit_rows():
                self._images_changed()

        return commit

    def images_digest(self, summaries: list[Summary]) -> str | None:
        return self._targets.digest(summaries)

    def close(self) -> None:
        self._loader = None  # its iterator (and persistent workers) go with it


def _one_field_strings(batches: Iterator[Any]) -> Iterator[Any]:
    """``default_collate`` of string samples is a list of str: one field (the core spreads a
    tuple or list into fields), so it is yielded as ``(list_of_str,)``."""
    for b in batches:
        yield (b,) if _is_strings(b) else b


def _is_strings(batch: Any) -> bool:
    return type(batch) is list and len(batch) > 0 and all(isinstance(s, (str, bytes)) for s in batch)
