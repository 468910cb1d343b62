"""Batches moved to the training device by the loader itself (``KCDLoader(batch_device=...)``).

A collated batch is a tensor or a tuple / list / dict of them (nested); every tensor not yet
on ``device`` is moved there, the rest (ints, strings, None) is left as it is. From the CPU to
a GPU the copy starts from pinned memory with ``non_blocking=True``: a batch the torch back end
already pinned (``pin_memory=True``, in its pin thread) is copied as it is, any other is pinned
first. The copy is queued on the current CUDA stream, so kernels the training step queues after
it see the data without a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["to_batch_device"]


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        src = t if t.is_pinned() else t.pin_memory()
        return src.to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def to_batch_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (tuples, lists and dicts rebuilt, nested)."""
    if isinstance(batch, torch.Tensor):
        return _move(batch, device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_batch_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_batch_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        moved = {k: to_batch_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # an HF BatchEncoding, an OrderedDict, ...
        except TypeError:
            return moved
    return batch
