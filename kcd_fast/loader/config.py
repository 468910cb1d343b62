"""The loader's configuration: one frozen dataclass, validated once.

Everything derived from the configuration reads it from here: the fields a saved state
must match (:meth:`LoaderConfig.state` / :meth:`LoaderConfig.check_state`), the fields
every DDP rank must share (:meth:`LoaderConfig.agreement`), and the keyword arguments
handed to ``torch.utils.data.DataLoader`` (:meth:`LoaderConfig.dataloader_kwargs`).
Back-end-specific options (DALI's ``augment``, ...) are not part of it: the back-end
factory (:mod:`kcd_fast.loader.backends.factory`) validates those.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import unique
from typing import Any, ClassVar

import torch

from .._checks import OptionEnum, check_bool, check_callable, check_device, check_int, check_number
from ..bank import Measure
from ..condense import Vaks

__all__ = ["Backend", "LoaderConfig"]


@unique
class Backend(OptionEnum):
    """Which back end moves and transforms samples."""

    TORCH = "torch"  # torch.utils.data.DataLoader worker processes
    DALI = "dali"  # NVIDIA DALI pipelines (kcd_fast.loader.backends.dali)
    INDICES = "indices"  # no samples, only each batch's indices (KCDBatchSampler)
    TENSOR = "tensor"  # whole batches from ArrayDataset storage, one fused kernel (backends/tensor.py)


def _check_batch_device(value: Any) -> torch.device | None:
    """``batch_device``: None, "cpu", "cuda" or "cuda:k" (a GPU torch can see)."""
    dev = check_device(value, "batch_device", optional=True)
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"batch_device={value!r} but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"batch_device={value!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


@dataclass(frozen=True)
class LoaderConfig:
    """What a :class:`kcd_fast.KCDLoader` was built with (see its docstring for each field)."""

    batch_size: int = 1
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    backend: Backend = Backend.TORCH
    value: Measure = Measure.ENTROPY
    vaks: Vaks = Vaks.LOW
    alpha: float = 0.03
    eps_m: float = 0.7
    temperature: float = 4.0
    device: torch.device | None = None
    batch_device: torch.device | None = None
    strict: bool = False
    progress: bool = False
    # torch.utils.data.DataLoader's own arguments
    num_workers: int = 0
    pin_memory: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    worker_init_fn: Callable[[int], None] | None = None
    timeout: float = 0.0
    multiprocessing_context: Any = None

    # A state_dict records these and load_state_dict refuses a state that differs in one.
    STATE_FIELDS: ClassVar[tuple[str, ...]] = ("value", "vaks", "eps_m", "alpha", "temperature")
    # Every DDP rank must share these (with the seed, the schedule, the epoch and the active set:
    # the run's seed is state, since load_state_dict continues the saved run's streams).
    AGREE_FIELDS: ClassVar[tuple[str, ...]] = ("shuffle", "drop_last", "batch_size", *STATE_FIELDS)
    DATALOADER_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_workers",
        "pin_memory",
        "collate_fn",
        "persistent_workers",
        "prefetch_factor",
        "worker_init_fn",
        "timeout",
        "multiprocessing_context",
    )

    @classmethod
    def create(cls, **kwargs: Any) -> LoaderConfig:
        """The validated configuration; ``TypeError`` / ``ValueError`` name the argument
        and the value. Unknown names raise ``TypeError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"KCDLoader got unexpected keyword argument(s) {unknown}")
        c = {**{f.name: f.default for f in fields(cls)}, **kwargs}
        num_workers = check_int(c["num_workers"], "num_workers", 0)
        persistent = check_bool(c["persistent_workers"], "persistent_workers")
        if persistent and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        prefetch = c["prefetch_factor"]
        if prefetch is not None:
            prefetch = check_int(prefetch, "prefetch_factor", 1)
            if num_workers == 0:
                raise ValueError(f"prefetch_factor={prefetch} needs num_workers > 0, got num_workers=0")
        return cls(
            batch_size=check_int(c["batch_size"], "batch_size", 1),
            shuffle=check_bool(c["shuffle"], "shuffle"),
            drop_last=check_bool(c["drop_last"], "drop_last"),
            seed=check_int(c["seed"], "seed", 0),
            backend=Backend.parse(c["backend"]),
            value=Measure.parse(c["value"]),
            vaks=Vaks.parse(c["vaks"]),
            alpha=check_number(c["alpha"], "alpha"),
            eps_m=check_number(c["eps_m"], "eps_m", 0.0, 1.0),
            temperature=check_number(c["temperature"], "temperature", 0.0, math.inf, lo_open=True),
            device=check_device(c["device"], optional=True),
            batch_device=_check_batch_device(c["batch_device"]),
            strict=check_bool(c["strict"], "strict"),
            progress=check_bool(c["progress"], "progress"),
            num_workers=num_workers,
            pin_memory=check_bool(c["pin_memory"], "pin_memory"),
            collate_fn=check_callable(c["collate_fn"], "collate_fn"),
            persistent_workers=persistent,
            prefetch_factor=prefetch,
            worker_init_fn=check_callable(c["worker_init_fn"], "worker_init_fn"),
            timeout=check_number(c["timeout"], "timeout", 0.0, math.inf),
            multiprocessing_context=c["multiprocessing_context"],
        )

    def _plain(self, name: str) -> Any:
        v = getattr(self, name)
        return v.value if isinstance(v, OptionEnum) else v

    def state(self) -> dict[str, Any]:
        """The fields a saved state records (plain Python values)."""
        return {k: self._plain(k) for k in self.STATE_FIELDS}

    def check_state(self, saved: dict[str, Any]) -> None:
        """Raises ``ValueError`` naming the first field where ``saved`` (a :meth:`state`)
        differs from this configuration."""
        for key, val in self.state().items():
            if saved.get(key) != val:
                raise ValueError(f"the state has {key} = {saved.get(key)!r}, this loader has {val!r}")

    def agreement(self) -> tuple[Any, ...]:
        """The fields every DDP rank must share, as plain values."""
        return tuple(self._plain(k) for k in self.AGREE_FIELDS)

    def dataloader_kwargs(self) -> dict[str, Any]:
        """The ``torch.utils.data.DataLoader`` arguments that were given (None left out)."""
        out = {k: getattr(self, k) for k in self.DATALOADER_FIELDS}
        return {k: v for k, v in out.items() if v is not None}
