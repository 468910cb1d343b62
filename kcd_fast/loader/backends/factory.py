"""Builds the back end a :class:`kcd_fast.KCDLoader` asked for, with its options.

The loader's own configuration (:class:`kcd_fast.loader.config.LoaderConfig`) is common
to every back end; options that only one back end understands are passed through
``KCDLoader(..., **backend_options)`` and checked here, before anything is built:

- torch: none (the dataset's ``transform`` augments);
- indices: none (it yields only each batch's indices: ``KCDBatchSampler``);
- dali: ``augment`` ("auto", None, a recipe name or a callable), ``dali_device``
  ("auto", None or a CUDA index) and ``dali_overlay_dir`` (image folders: a directory for
  the overlay files). The DataLoader-only arguments ``collate_fn``, ``worker_init_fn``,
  ``multiprocessing_context`` and ``timeout`` are refused; ``num_workers`` sets DALI's
  CPU threads and ``prefetch_factor`` its prefetch depth.
"""

from __future__ import annotations

from typing import Any

from ...data.arrays import has_images, require_image_storage
from ...data.folders import is_image_folder
from ..config import Backend, LoaderConfig
from .base import BackendProtocol
from .indices import IndexBackend
from .torch import TorchBackend

__all__ = ["DALI_OPTIONS", "auto_vaks", "check_options", "make_backend"]

DALI_OPTIONS = {"augment": "auto", "dali_device": "auto", "dali_overlay_dir": None}


def check_options(config: LoaderConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The back end's options with their defaults filled in; ``TypeError`` for a name no
    back end knows, ``ValueError`` for a DALI option given to the torch back end."""
    unknown = sorted(set(options) - set(DALI_OPTIONS))
    if unknown:
        raise TypeError(f"KCDLoader got unexpected keyword argument(s) {unknown}")
    if config.backend is Backend.DALI:
        from .dali import check_loader_args, require_dali

        require_dali()  # an ImportError naming the package; the torch path never imports DALI
        check_loader_args(
            collate_fn=config.collate_fn,
            worker_init_fn=config.worker_init_fn,
            multiprocessing_context=config.multiprocessing_context,
            timeout=config.timeout,
        )
        return {**DALI_OPTIONS, **options}
    if options:
        got = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ValueError(
            f"augment, dali_device and dali_overlay_dir apply to backend='dali' (got {got}); with the torch back "
            "end use the dataset's transform"
        )
    return {}


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
        )
    return TorchBackend(dataset, storage=storage, **config.dataloader_kwargs())
