"""Builds the back end a :class:`kcd_fast.KCDLoader` asked for, with its options.

The loader's own configuration (:class:`kcd_fast.loader.config.LoaderConfig`) is common
to every back end; options that only one back end understands are passed through
``KCDLoader(..., **backend_options)`` and checked here, before anything is built:

- torch: none (the dataset's ``transform`` augments);
- indices: none (it yields only each batch's indices: ``KCDBatchSampler``);
- tensor: ``augment`` (None, "cifar", "cifar_eval", a ``Recipe`` or a callable),
  ``tensor_device`` ("auto" or "cuda" for CPU storage), ``channels_last``, ``dtype``;
- dali: ``augment`` ("auto", None, a recipe name or a callable), ``dali_device``
  ("auto", None, "cpu", "cuda", "cuda:K" or a CUDA index), and for image folders
  ``dali_overlay_dir`` (a directory for the overlay files), ``dali_overlay_format`` ("jpeg"
  default, "pnm", "png"),
  ``dali_overlay_budget`` (bytes held in memory before summarised images go to files),
  ``dali_overlay_device`` ("auto": DALI's GPU when torchcodec is installed, else "cpu"). The
  DataLoader-only arguments ``collate_fn``, ``worker_init_fn``, ``multiprocessing_context``
  and ``timeout`` are refused; ``num_workers`` sets DALI's CPU threads and
  ``prefetch_factor`` its prefetch depth.
"""

from __future__ import annotations

from typing import Any

from ...data.arrays import has_images, require_image_storage
from ...data.folders import is_image_folder
from ..config import Backend, LoaderConfig
from .base import BackendProtocol
from .indices import IndexBackend
from .torch import TorchBackend

__all__ = [
    "DALI_OPTIONS",
    "OPTIONS",
    "TENSOR_OPTIONS",
    "auto_vaks",
    "check_loader_args",
    "check_options",
    "make_backend",
]

DALI_OPTIONS = {
    "augment": "auto",
    "dali_device": "auto",
    "dali_overlay_dir": None,
    "dali_overlay_format": "jpeg",
    "dali_overlay_budget": 1 << 30,
    "dali_overlay_device": "auto",
}
TENSOR_OPTIONS = {"augment": None, "tensor_device": "auto", "channels_last": False, "dtype": "float32"}
OPTIONS = {Backend.DALI: DALI_OPTIONS, Backend.TENSOR: TENSOR_OPTIONS}


def check_options(config: LoaderConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The back end's options with their defaults filled in; ``TypeError`` for a name no
    back end knows, ``ValueError`` for an option of another back end."""
    known = set().union(*(set(o) for o in OPTIONS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"KCDLoader got unexpected keyword argument(s) {unknown}")
    mine = OPTIONS.get(config.backend, {})
    foreign = {k: v for k, v in options.items() if k not in mine}
    if foreign:
        got = ", ".join(f"{k}={v!r}" for k, v in foreign.items())
        owners = sorted({b.value for b, o in OPTIONS.items() for k in foreign if k in o})
        raise ValueError(
            f"{got}: {'an option' if len(foreign) == 1 else 'options'} of backend="
            f"{' or '.join(repr(o) for o in owners)}, not of backend={config.backend.value!r}"
            + ("; with the torch back end use the dataset's transform" if config.backend is Backend.TORCH else "")
        )
    if config.backend is Backend.DALI:
        from .dali import require_dali

        require_dali()  # an ImportError naming the package; the torch path never imports DALI
    if config.backend in (Backend.DALI, Backend.TENSOR):
        check_loader_args(
            config.backend.value,
            collate_fn=config.collate_fn,
            worker_init_fn=config.worker_init_fn,
            multiprocessing_context=config.multiprocessing_context,
            timeout=config.timeout,
        )
    return {**mine, **options}


def check_loader_args(
    backend: str, *, collate_fn: Any, worker_init_fn: Any, multiprocessing_context: Any, timeout: Any
) -> None:
    """Refuses the DataLoader arguments that mean nothing to a back end without worker
    processes that collates batches itself (DALI, tensor)."""
    for name, value in (
        ("collate_fn", collate_fn),
        ("worker_init_fn", worker_init_fn),
        ("multiprocessing_context", multiprocessing_context),
    ):
        if value is not None:
            raise ValueError(
                f"backend={backend!r} runs no worker processes and collates whole batches itself; "
                f"{name} must be None, got {value!r}"
            )
    if timeout not in (0, 0.0):
        raise ValueError(f"backend={backend!r} has no worker timeout; timeout must be 0, got {timeout!r}")


def auto_vaks(dataset: Any, backend: Backend) -> str:
    """``vaks="auto"``: "low" (the paper's summary) for a dataset that holds images
    (``has_images``; image storage that cannot be blended then raises, saying why), "off"
    for token ids, tabular data and generic datasets, and for image folders on the torch
    back end (only the DALI back end summarises files)."""
    if is_image_folder(dataset):
        return "low" if backend is Backend.DALI else "off"
    return "low" if has_images(dataset) else "off"


def make_backend(dataset: Any, config: LoaderConfig, options: dict[str, Any]) -> BackendProtocol:
    """The back end over ``dataset``; every argument is checked before it is built."""
    options = check_options(config, options)
    files = config.backend is Backend.DALI and is_image_folder(dataset)  # VAKS on files: the DALI overlay
    storage = None if files else require_image_storage(dataset, config.vaks.value)
    if storage is not None and storage.device.type == "cuda" and config.pin_memory:
        raise ValueError(
            f"pin_memory=True pins CPU batches, but the dataset's images live on "
            f"{storage.device}; pass pin_memory=False"
        )
    if storage is not None and storage.device.type == "cuda" and config.num_workers > 0:
        raise ValueError(
            f"the dataset's images live on {storage.device}; worker processes cannot index them: "
            f"use num_workers=0, got num_workers={config.num_workers}"
        )
    if config.backend is Backend.INDICES:
        return IndexBackend(storage=storage)
    if config.backend is Backend.TENSOR:
        from .tensor import tensor_backend

        return tensor_backend(dataset, storage, config, options)
    if config.backend is Backend.DALI:
        from .dali import DaliBackend

        return DaliBackend(  # CPU threads = num_workers
            dataset,
            storage=storage,
            batch_size=config.batch_size,
            num_threads=max(1, config.num_workers),
            prefetch_queue_depth=config.prefetch_factor or 2,
            pin_memory=config.pin_memory,
            augment=options["augment"],
            device_id=options["dali_device"],
            overlay_dir=options["dali_overlay_dir"],
            overlay_format=options["dali_overlay_format"],
            overlay_budget=options["dali_overlay_budget"],
            overlay_device=options["dali_overlay_device"],
        )
    return TorchBackend(dataset, storage=storage, **config.dataloader_kwargs())
