"""The tensor back end: whole batches gathered from an ArrayDataset's storage and augmented
on the storage's device by one fused kernel (``ops.augment``): no per-item Python, no
worker processes.

Random numbers: batch ``k`` of an epoch draws its crop origins and flips from
``numpy.random.default_rng(batch_seed(epoch seed, k))`` on the host (a few hundred integers),
so a run, a resume at any batch and the same run on another device augment identically; a
callable recipe gets a ``torch.Generator`` seeded the same way.

Devices: CUDA storage -> everything on that GPU, no host synchronisation. CPU storage with
``tensor_device="cuda"`` -> each batch is written by the CPU kernel into pinned memory and
copied on a side stream while the previous batch trains (timm's PrefetchLoader pattern).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ... import ops
from .base import ArrayImages, EpochBatchSampler, NoImages, StorageSummaries, batch_seed
from .recipes import Recipe, parse_recipe

__all__ = ["Recipe", "TensorBackend", "tensor_backend"]


class TensorBackend(StorageSummaries):
    """Batches from uint8 ``[N, H, W, C]`` storage (an :class:`kcd_fast.ArrayDataset`).

    Args:
        images: the dataset's uint8 ``[N, H, W, C]`` storage (CPU or CUDA), blended in place
            by VAKS. labels: its int64 ``[N]`` labels (same device).
        augment: None, "cifar", "cifar_eval", a :class:`Recipe` or a callable (see
            :func:`parse_recipe`).
        device: where batches are produced: the storage's device, or "cuda" for CPU storage
            (pinned buffers, copied on a side stream one batch ahead).
        channels_last: output in NHWC memory order (the shape stays ``[B, C, H, W]``).
        dtype: torch.float32 or torch.bfloat16 output.
        pin_memory: pin CPU batches (CPU storage, CPU output).
        blend: whether summaries blend into ``images`` (False: ``vaks="off"``).
    """

    name = "tensor"

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augment: Any,
        device: torch.device,
        channels_last: bool,
        dtype: torch.dtype,
        pin_memory: bool,
        blend: bool,
    ):
        self.storage = images
        self.labels = labels
        self.sampler = EpochBatchSampler()
        self._targets = ArrayImages(images) if blend else NoImages()
        self.recipe, self.transform = parse_recipe(augment)
        _, h, w, c = images.shape
        oh, ow = self.recipe.out_size or (h, w)
        pad = self.recipe.pad
        if not (oh <= h + 2 * pad and ow <= w + 2 * pad):
            raise ValueError(f"augment crops {oh}x{ow} (pad {pad}) out of images of {h}x{w}: the crop does not fit")
        self._geometry = (h, w, oh, ow, pad)
        self.device = device
        self.channels_last = channels_last
        self.dtype = dtype
        self.pin = pin_memory or (images.device.type == "cpu" and device.type == "cuda")
        self._scale_shift = ops.normalization(self.recipe.mean, self.recipe.std, c)

    # -- batches ---------------------------------------------------------------------------
    def params(self, n: int, seed: int) -> np.ndarray:
        """int32 ``[n, 3]`` (y0, x0, flip) of a batch of n drawn from ``seed``."""
        h, w, oh, ow, pad = self._geometry
        r = self.recipe
        out = np.empty((n, 3), dtype=np.int32)
        if r.random_crop or r.flip:
            rng = np.random.default_rng(seed)
            out[:, 0] = rng.integers(0, h + 2 * pad - oh + 1, n) if r.random_crop else (h + 2 * pad - oh) // 2
            out[:, 1] = rng.integers(0, w + 2 * pad - ow + 1, n) if r.random_crop else (w + 2 * pad - ow) // 2
            out[:, 2] = rng.integers(0, 2, n) if r.flip else 0
        else:
            out[:] = ((h + 2 * pad - oh) // 2, (w + 2 * pad - ow) // 2, 0)
        return out

    def make_batch(self, indices: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``indices`` (int64 ``[b]``) with the random numbers of ``seed``:
        ``(images [b, C, oh, ow], labels [b])`` on the storage's device."""
        _, _, oh, ow, pad = self._geometry
        dev = self.storage.device
        idx = torch.from_numpy(indices)
        params = torch.from_numpy(self.params(len(indices), seed))
        if dev.type == "cuda":
            idx = idx.pin_memory().to(dev, non_blocking=True)
            params = params.pin_memory().to(dev, non_blocking=True)
        c = self.storage.shape[3]
        shape = (len(indices), oh, ow, c) if self.channels_last else (len(indices), c, oh, ow)
        out = torch.empty(shape, dtype=self.dtype, device=dev, pin_memory=self.pin and dev.type == "cpu")
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)
        scale, shift = self._scale_shift
        images = ops.augment(
            self.storage,
            idx,
            params,
            out_size=(oh, ow),
            pad=pad,
            mean=self.recipe.mean,
            std=self.recipe.std,
            fill=self.recipe.fill,
            dtype=self.dtype,
            channels_last=self.channels_last,
            check=False,  # indices from the planner, params drawn in range
            out=out,
        )
        labels = self.labels[idx]
        if self.transform is not None:
            g = torch.Generator(device=images.device)
            g.manual_seed(seed)
            images = _checked_output(self.transform(images, g), self.transform, len(indices), images.device)
        return images, labels

    def epoch_batches(self, batches: list[np.ndarray], seed: int, start: int = 0) -> Iterator[Any]:
        self.sampler.set_batches(batches, seed, start)
        gen = (self.make_batch(batches[k], batch_seed(seed, k)) for k in range(start, len(batches)))
        if self.storage.device.type == "cpu" and self.device.type == "cuda":
            return _prefetch_to(gen, self.device)
        return gen


def _prefetch_to(
    batches: Iterator[tuple[torch.Tensor, ...]], device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Copies each (pinned) CPU batch to ``device`` on a side stream while the caller trains
    on the previous one; the caller's stream waits for the copy before using it."""
    stream = torch.cuda.Stream(device)
    pending: tuple[torch.Tensor, ...] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            moved = tuple(t.to(device, non_blocking=True) for t in batch)
        if pending is not None:
            yield pending
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for t in moved:
            t.record_stream(current)  # allocated on the side stream, used on the caller's
        pending = moved
    if pending is not None:
        yield pending


def _device_option(want: Any) -> torch.device:
    """``tensor_device`` (not "auto") -> a torch.device this machine has, or ``ValueError`` naming it."""
    try:
        device = torch.device(want)
    except (TypeError, RuntimeError):
        raise ValueError(f"tensor_device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {want!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor_device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {want!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"tensor_device={want!r} but torch sees no CUDA device on this machine (torch.cuda.is_available() "
            "is False); pass tensor_device='auto' to make batches where the images live"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"tensor_device={want!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _checked_output(out: Any, fn: Any, b: int, device: torch.device) -> torch.Tensor:
    """The output of an ``augment`` callable, or ``TypeError`` / ``ValueError`` naming the option."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"augment={name} must return the batch as a float tensor [b, C, H, W] (augment(images, generator) -> "
            f"images), got {type(out).__name__}{'' if out is not None else ' (did it forget to return?)'}"
        )
    if out.dim() != 4 or out.shape[0] != b or out.device != device:
        raise ValueError(
            f"augment={name} must return a [b = {b}, C, H, W] tensor on {device}, "
            f"got {tuple(out.shape)} on {out.device}"
        )
    return out


def tensor_backend(dataset: Any, storage: torch.Tensor | None, config: Any, options: dict[str, Any]) -> TensorBackend:
    """The tensor back end over an :class:`kcd_fast.ArrayDataset` (checked here)."""
    from ...data.arrays import ArrayDataset

    if not isinstance(dataset, ArrayDataset):
        raise TypeError(
            f"backend='tensor' gathers batches from kcd_fast.ArrayDataset storage, got {type(dataset).__name__}; "
            "wrap your arrays in kcd_fast.ArrayDataset(images, labels), or use backend='torch'"
        )
    if dataset.transform is not None:
        raise ValueError(
            "backend='tensor' augments whole batches with its own recipes (augment='cifar', a Recipe or a callable); "
            "make the ArrayDataset without a per-item transform"
        )
    if config.num_workers:
        raise ValueError(
            "backend='tensor' runs no worker processes (its CPU kernel uses OpenMP threads: OMP_NUM_THREADS); "
            f"num_workers must be 0, got {config.num_workers}"
        )
    images = dataset.images
    if images.dim() == 3:
        images = images.unsqueeze(3)
    want = options["tensor_device"]
    device = images.device if want in ("auto", None) else _device_option(want)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if images.device.type == "cuda" and device != images.device:
        raise ValueError(
            f"the images live on {images.device}; tensor_device must be 'auto' or that device, got {want!r}"
        )
    dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        torch.float32: torch.float32,
        torch.bfloat16: torch.bfloat16,
    }.get(options["dtype"])
    if dtype is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {options['dtype']!r}")
    return TensorBackend(
        images,
        dataset.labels,
        augment=options["augment"],
        device=device,
        channels_last=bool(options["channels_last"]),
        dtype=dtype,
        pin_memory=config.pin_memory and torch.cuda.is_available(),
        blend=storage is not None,
    )
