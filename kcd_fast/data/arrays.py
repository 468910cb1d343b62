"""Datasets whose stored images KCD can summarise (docs/algorithm.md section 4).

VAKS blends dropped images into kept ones *in the stored images*, so the loader needs
write access to a uint8 ``[N, ...]`` array that ``dataset[i]`` reads from:

- :class:`ArrayDataset`: uint8 ``[N, H, W, C]`` images in shared memory (CPU) or on a GPU;
- torchvision-style datasets with a uint8 ``.data`` array (numpy ``[N, H, W, C]`` as in
  CIFAR-10/100, or a torch tensor as in MNIST) and ``.targets``: blended in place through
  a zero-copy torch view;
- any other map-style dataset works with ``vaks="off"`` only.

:func:`image_storage` finds that array; :func:`require_image_storage` raises a
``ValueError`` that says how to enable VAKS when there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_device
from .folders import is_image_folder

__all__ = ["ArrayDataset", "has_images", "image_storage", "require_image_storage"]


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":  # strings, objects, dates: no tensor, and not what is meant
            raise TypeError(
                f"{name} must be {'integers (class indices)' if name == 'labels' else 'numbers'}, got a numpy array of "
                f"dtype {x.dtype} (e.g. {x.flat[0]!r})"
                + (
                    "; map class names to indices first, e.g. np.unique(labels, return_inverse=True)[1]"
                    if name == "labels"
                    else ""
                )
            )
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor, numpy.ndarray or list, got {type(x).__name__}")


def _looks_channels_first(shape: tuple[int, ...]) -> bool:
    """``[N, C, H, W]`` with C in (1, 3, 4) and a last axis that is no channel count."""
    return len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4) and shape[2] > 4


class ArrayDataset(Dataset):
    """In-memory images and labels that VAKS can blend into.

    Args:
        images: uint8 ``[N, H, W, C]`` (or ``[N, H, W]``, one channel), torch tensor or
            numpy array. Channels-first arrays ``[N, C, H, W]`` are refused (the message
            shows the transpose). The data are **copied** into storage the dataset owns, so the
            caller's array is never modified by a summary.
        labels: ``[N]`` integer labels (tensor, array or list); stored as int64.
        transform: called as ``transform(image)`` with ``image`` a uint8 ``[C, H, W]``
            tensor (a read-only view of the storage: do not modify it in place; torchvision
            ``v2`` transforms work on it directly). ``None``: the image becomes float32
            ``[C, H, W]`` in ``[0, 1]`` (``image / 255``).
        device: ``"cpu"`` (default): the storage lives in shared memory
            (``share_memory_()``) so DataLoader worker processes see summarised images
            without being restarted. ``"cuda"`` / ``"cuda:k"``: the storage lives on that
            GPU and is blended there by the CUDA kernel (use ``num_workers=0``).

    Attributes:
        images: uint8 ``[N, H, W, C]`` storage (``[N, H, W]`` if given so).
        labels: int64 ``[N]`` on the same device.

    ``dataset[i]`` returns ``(transform(image_i), label_i)``; the label is a Python int
    for CPU storage (like torchvision) and a 0-d int64 tensor for GPU storage (no host
    synchronisation).
    """

    def __init__(
        self,
        images: Any,
        labels: Any,
        transform: Callable[[torch.Tensor], Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        img = _to_tensor(images, "images")
        lab = _to_tensor(labels, "labels")
        if img.dtype != torch.uint8:
            got = str(img.dtype).replace("torch.", "")
            raise TypeError(f"images must be uint8 [N, H, W, C], got dtype {got}")
        if img.dim() not in (3, 4):
            raise ValueError(f"images must be 4-D [N, H, W, C] (or 3-D [N, H, W]), got shape {tuple(img.shape)}")
        if _looks_channels_first(tuple(img.shape)):
            n, c, h, w = img.shape
            raise ValueError(
                f"images must be channels-last [N, H, W, C], got shape {tuple(img.shape)}, which looks channels-first "
                f"[N, C={c}, H={h}, W={w}]; pass images.transpose(0, 2, 3, 1) (numpy) or images.permute(0, 2, 3, 1) "
                "(torch)"
            )
        if img.shape[0] == 0:
            raise ValueError("images is empty (N = 0): a dataset needs at least one point")
        if lab.dim() != 1 or lab.shape[0] != img.shape[0]:
            raise ValueError(
                f"labels must be [N] with N = {img.shape[0]} (the number of images), got shape {tuple(lab.shape)}"
            )
        if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
            raise TypeError(
                f"labels must be integers (class indices), got dtype {str(lab.dtype).replace('torch.', '')}"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        dev = check_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device")

        if dev.type == "cpu":
            # Allocate the shared block first, then copy: the caller's array is never aliased.
            self.images = torch.empty(img.shape, dtype=torch.uint8).share_memory_()
            self.images.copy_(img)
            self.labels = lab.to(torch.int64).clone().share_memory_()
        else:
            self.images = img.to(dev, copy=True).contiguous()
            self.labels = lab.to(device=dev, dtype=torch.int64, copy=True)
        self.transform = transform

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def random_transform(self) -> bool:
        """Whether fetching may draw random numbers: False without a transform or with one
        marked ``deterministic = True`` (the loader then skips seeding RNGs per batch)."""
        return self.transform is not None and not getattr(self.transform, "deterministic", False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = self.images[index]  # [H, W, C] view
        img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)  # [C, H, W] view
        x = img.float().div_(255.0) if self.transform is None else self.transform(img)
        y = self.labels[index]
        return x, (int(y) if self.images.device.type == "cpu" else y)

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"device={self.images.device}, transform={self.transform!r})"
        )


def _storage_or_reason(dataset: Any) -> tuple[torch.Tensor | None, str]:
    """The blendable uint8 ``[N, ...]`` storage of ``dataset`` (a zero-copy torch view),
    or None and why not."""
    if isinstance(dataset, ArrayDataset):
        return dataset.images, ""
    name = type(dataset).__name__
    if not (hasattr(dataset, "data") and hasattr(dataset, "targets")):
        return None, (
            f"{name} is not an ArrayDataset and has no uint8 `.data` array with `.targets` (torchvision style)"
        )
    data = dataset.data
    try:
        n = len(dataset)
    except TypeError:
        return None, f"{name} has no len()"
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            return None, f"{name}.data has dtype {data.dtype}, not uint8"
        if not data.flags.writeable:
            return None, f"{name}.data is a read-only numpy array"
        if any(st < 0 for st in data.strides):
            return None, f"{name}.data has negative strides {data.strides} (a reversed view), which torch cannot share"
        t = torch.from_numpy(data)  # shares memory, keeps the strides
    elif isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            return None, f"{name}.data has dtype {str(data.dtype).replace('torch.', '')}, not uint8"
        t = data
    else:
        return None, f"{name}.data is a {type(data).__name__}, not a numpy array or torch tensor"
    if t.dim() < 2 or t.shape[0] != n:
        return None, f"{name}.data has shape {tuple(t.shape)}, not [N = {n}, ...] with one row per point"
    if not _image_shaped(tuple(t.shape)):
        # token ids, audio, tabular bytes: blending them as pixels would corrupt them
        return None, f"{name}.data has shape {tuple(t.shape)}, not images [N, H, W] or [N, H, W, C] with C in (1, 3, 4)"
    if t.device.type not in ("cpu", "cuda"):
        return None, f"{name}.data is on {t.device}; kcd_fast blends on cpu and cuda"
    return t, ""


def image_storage(dataset: Any) -> torch.Tensor | None:
    """The uint8 ``[N, ...]`` images VAKS blends into, as a torch view that shares memory
    with the dataset (``ArrayDataset.images``, or a torchvision-style ``.data``), or None
    for a generic dataset. The view may be non-contiguous (torchvision's CIFAR ``.data``
    is a transposed array); the loader blends such views row by row."""
    return _storage_or_reason(dataset)[0]


def _image_shaped(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))


def has_images(dataset: Any) -> bool:
    """Whether ``dataset`` holds images for VAKS: an :class:`ArrayDataset`, an image
    folder, or a uint8 image-shaped ``.data`` (``[N, H, W]`` / ``[N, H, W, C]``, C in
    1, 3, 4) with ``.targets``, blendable or not (:func:`require_image_storage` says why
    not). Token ids, tabular bytes and generic datasets hold none."""
    if isinstance(dataset, ArrayDataset) or is_image_folder(dataset):
        return True
    data = getattr(dataset, "data", None)
    if not hasattr(dataset, "targets") or not isinstance(data, (np.ndarray, torch.Tensor)):
        return False
    return data.dtype in (np.uint8, torch.uint8) and _image_shaped(tuple(data.shape))


def require_image_storage(dataset: Any, vaks: str) -> torch.Tensor | None:
    """``image_storage(dataset)``, or a ``ValueError`` saying how to enable VAKS when the
    dataset has none and ``vaks`` is not ``"off"``."""
    storage, reason = _storage_or_reason(dataset)
    if storage is None and vaks != "off":
        raise ValueError(
            f"vaks={vaks!r} blends dropped images into the stored images, but {reason}. "
            "To enable VAKS, wrap the images in kcd_fast.ArrayDataset(images, labels, transform), "
            "or give the dataset a writeable uint8 `.data` array [N, H, W, C] that __getitem__ reads from "
            "and `.targets` (like torchvision's CIFAR10); or pass vaks='off' to condense without a summary."
        )
    return storage
