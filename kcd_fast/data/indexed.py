"""WithIndices: a dataset whose samples carry their own index, for loaders that batch
with a :class:`kcd_fast.KCDBatchSampler` (the batch then holds the indices to observe)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithIndices"]


class WithIndices(Dataset):
    """``dataset[i]`` followed by ``i``: a tuple sample ``(x, y)`` becomes ``(x, y, i)``,
    a dict sample gains ``key: i`` (``"index"`` by default), anything else ``(sample, i)``.
    Every other attribute (``.data``, ``.targets``, ...) is the wrapped dataset's."""

    def __init__(self, dataset: Any, key: str = "index"):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"dataset must be map-style (__len__, __getitem__), got {type(dataset).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, tuple):
            return (*sample, index)
        if isinstance(sample, dict):
            if self.key in sample:
                raise KeyError(f"the sample already has a key {self.key!r}; pass WithIndices(dataset, key=...)")
            return {**sample, self.key: index}
        return (sample, index)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "key"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
