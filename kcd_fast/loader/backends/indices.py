"""The indices back end: no samples at all, only each batch's dataset indices. It drives
:class:`kcd_fast.KCDBatchSampler`, whose user fetches the samples with their own
``torch.utils.data.DataLoader``; summaries blend into the dataset's image storage, which
that DataLoader reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .base import ArrayImages, EpochBatchSampler, NoImages, StorageSummaries

__all__ = ["IndexBackend"]


class IndexBackend(StorageSummaries):
    """Yields an empty tuple per planned batch (the core appends the batch's indices).

    Args:
        storage: the dataset's blendable uint8 ``[N, ...]`` images, or None (``vaks="off"``).
    """

    name = "indices"

    def __init__(self, *, storage: torch.Tensor | None):
        self.sampler = EpochBatchSampler()
        self._targets = ArrayImages(storage) if storage is not None else NoImages()

    def epoch_batches(self, batches: list[np.ndarray], seed: int, start: int = 0) -> Iterator[Any]:
        self.sampler.set_batches(batches, seed, start)
        return (() for _ in range(start, len(batches)))
