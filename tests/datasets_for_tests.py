"""Small datasets shared by the loader and DALI tests."""

from __future__ import annotations

import numpy as np
import torch


class CifarLike(torch.utils.data.Dataset):
    """torchvision CIFAR-style: `.data` is a *transposed* (non-contiguous) uint8 numpy
    [N, H, W, C] array, `.targets` a list; __getitem__ reads `.data`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.data[i].transpose(2, 0, 1).astype(np.float32) / 255.0), self.targets[i]
