"""KCDLoader: a drop-in for ``torch.utils.data.DataLoader`` that condenses the training set
on the schedule of KCD_SPEC section 2 and summarises dropped points per section 4.

Layout: :class:`KCDLoader` is the backend-agnostic core (schedule, value bank,
condensation, VAKS, active set, per-epoch order, state). It plans each epoch as a list of
index batches and hands them to a back end, which only fetches, transforms and collates
samples. :class:`TorchBackend` is the torch back end; a back end is any object with

- ``epoch_batches(batches, seed) -> iterator``: yields, in order, one collated batch per
  entry of ``batches`` (a list of int64 ``[b]`` numpy arrays, dataset indices);
  ``seed`` keys any randomness the back end owns (worker seeds) to the epoch;
- ``images_changed()``: the stored images were summarised (a condensation with pairs);
- ``close()``: release workers / pipelines.

Typical use (three lines change in a KD loop)::

    schedule = CondensationSchedule(epochs=240, period=40, rho=0.7)
    loader = KCDLoader(train_set, schedule, batch_size=64, shuffle=True, num_workers=8, seed=0)
    for epoch in range(schedule.epochs):
        for images, targets, indices in loader:
            logits_s = student(images)
            ...
            loader.observe(indices, logits_s)      # or observe(indices, logits_s, logits_t)

Documented rules
----------------
Epochs
    Each full iteration over the loader is one epoch. When its iterator is exhausted the
    loader moves to the next epoch, and, if a condensation is due before it, condenses
    right then, so ``len(loader)`` and ``active_indices`` are already those of the next
    epoch. Breaking out of an epoch early does not advance it (a new ``iter`` restarts the
    same epoch with the same order); call ``set_epoch(epoch + 1)`` to move on. Iterating
    once all ``schedule.epochs`` epochs are done raises ``RuntimeError``.
Batches and ``drop_last``
    Epoch ``e`` visits ``epoch_order()``: its active points (``schedule.epoch_sizes(N)[e]``
    of them), shuffled with ``numpy.random.default_rng([seed, e])`` when ``shuffle=True``,
    ascending otherwise. Batch ``k`` holds ``order[k*B:(k+1)*B]``. With ``drop_last=False``
    the last batch may be smaller; with ``drop_last=True`` the last ``n_e mod B`` points of
    the order are not yielded this epoch (they stay active; with ``shuffle=True`` a
    different tail is left out each epoch), and an epoch with fewer than B points yields
    no batch at all.
Observations
    ``observe`` only scores (``ValueBank.observe``: no host sync on CUDA). Every observed
    row counts, including points outside the current active set and a batch observed
    twice: a point observed twice in one epoch is accumulated twice (``n_i += 2``), as in
    the authors' code. On CPU (or with ``strict=True``) indices outside ``[0, N)``,
    non-finite logits and length mismatches raise before anything changes; on CUDA the
    bad rows are skipped on the device and raised at the next condensation.
State and resume
    ``state_dict()`` holds the epoch, the value bank, the active set, the seed (all RNG
    streams are derived from ``(seed, epoch)``), the history and the summary log (the
    ``(dst, src, eps)`` of every condensation) with a digest of the summarised rows.
    ``load_state_dict`` on a new loader over the ORIGINAL dataset replays the log with
    ``blend_``, checks the digest, and continues bit-exactly: same active sets, images,
    order, batches. Save between epochs: a state saved mid-epoch resumes at the start of
    that epoch, and its bank already holds the observations made so far in it. Worker
    augmentation randomness is keyed to ``(seed, epoch)`` for ``num_workers > 0`` without
    ``persistent_workers``; with ``num_workers=0`` transforms draw from torch's global
    RNG, which the loader never touches.
Distributed (DDP)
    When a ``torch.distributed`` process group is initialised (or ``distributed=True``),
    each rank visits its shard of the epoch's global order by ``DistributedSampler``'s
    rules, recomputed every epoch: ``ceil(n_e / world)`` points per rank (``floor`` with
    ``drop_last``), the order wrapped around to pad, rank ``r`` taking
    ``padded[r::world]`` (``rank_indices``); then ``drop_last`` also applies to the
    rank's last batch. Every rank runs the same number of steps. ``epoch_order()`` and
    ``active_indices`` stay global (the same on every rank). A padded point is visited,
    and observed, twice in its epoch (every observed row counts). Each rank's
    observations accumulate locally, without communication; at a condensation the value
    bank is all-reduced (``N * 12`` bytes) so every rank ranks the same global totals,
    condenses identically (ties by index) and applies the same summary to its own copy
    of the images. The ranks check that they agree (one tiny collective at the start of
    iteration and per condensation) and raise ``RuntimeError`` where they do not.
    Collectives happen in ``__iter__`` (the first time), at condensations (the end of
    an epoch, ``set_epoch``), in ``state_dict()`` and ``save()``: call these on every
    rank. Totals agree with a single-process run that made the same observations up to
    float64 rounding (the additions are grouped differently).
Checkpoints
    ``loader.save(path)`` (every rank; rank 0 writes) stores the GLOBAL state atomically
    (temporary file, fsync, ``os.replace``, directory fsync), so a crash during a save
    leaves the previous checkpoint intact; ``KCDLoader.load(path, dataset, schedule,
    **kwargs)`` resumes it at any world size. A truncated, corrupt or mismatched
    checkpoint raises ``ValueError`` naming the path.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from enum import Enum, unique
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from . import _arrays as A
from . import distributed as D
from .bank import Measure, ValueBank
from .condense import Vaks, condense
from .datasets import require_image_storage
from .image_folder import is_image_folder
from .ops import blend_
from .schedule import CondensationSchedule

__all__ = ["Backend", "KCDLoader", "TorchBackend"]

log = logging.getLogger(__name__)

STATE_FORMAT = "kcd_fast.KCDLoader/1"

# RNG streams, all derived from (seed, epoch): the epoch order uses default_rng([seed, epoch]).
_WORKER_STREAM = 1
_VAKS_STREAM = 2


@unique
class Backend(str, Enum):
    """Which back end moves and transforms samples."""

    TORCH = "torch"  # torch.utils.data.DataLoader worker processes
    DALI = "dali"  # NVIDIA DALI pipelines (kcd_fast.dali_backend)

    @classmethod
    def parse(cls, value: Any) -> Backend:
        try:
            return cls(value.value if isinstance(value, Backend) else value)
        except ValueError:
            choices = ", ".join(repr(v.value) for v in cls)
            raise ValueError(f"backend must be one of {choices}, got {value!r}") from None


def _stream_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """A 63-bit seed for one RNG stream of one epoch (of one rank, for rank > 0: under DDP
    each rank's workers draw their own augmentations; rank 0's equal a single process's)."""
    key = [seed, epoch, stream] if rank == 0 else [seed, epoch, stream, rank]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_callable(value: Any, name: str) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return value


def _check_number(value: Any, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        and math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _blend_rows(storage: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, eps: torch.Tensor) -> None:
    """``blend_`` on ``storage`` ``[N, ...]`` uint8, which may be a strided view (such as
    torchvision's transposed CIFAR ``.data``): then the ``2P`` rows involved are gathered,
    blended and scattered back, with the same result bit for bit."""
    dev = storage.device
    d, s, e = dst.to(dev), src.to(dev), eps.to(dev, torch.float64)
    if storage.is_contiguous():
        blend_(storage, d, s, e, check=False)
        return
    p = d.shape[0]
    sub = storage[torch.cat([d, s])].contiguous()  # [2P, ...]
    pos = torch.arange(2 * p, device=dev)
    blend_(sub, pos[:p], pos[p:], e, check=False)
    storage[d] = sub[:p]


def _touched_rows(summaries: list[dict[str, Any]]) -> torch.Tensor:
    """``[U]`` int64, sorted: every point a summary wrote or read."""
    if not summaries:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.cat([t for s in summaries for t in (s["dst"], s["src"])]))


def _digest(rows: torch.Tensor, images: torch.Tensor) -> str:
    """blake2b of the row indices ``[U]`` and the images ``[U, ...]`` uint8."""
    h = hashlib.blake2b(digest_size=16)
    h.update(rows.cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(images.cpu().numpy()))
    return h.hexdigest()


class _EpochBatchSampler(Sampler[list[int]]):
    """Yields the index batches the core planned for the current epoch."""

    def __init__(self) -> None:
        self._batches: list[np.ndarray] = []

    def set_batches(self, batches: list[np.ndarray]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._batches)


class TorchBackend:
    """The torch back end: one ``torch.utils.data.DataLoader`` over a batch sampler that
    the core refills each epoch. With ``persistent_workers`` the workers live across
    epochs; they are restarted after a summary unless the images are a shared-memory
    torch tensor (``ArrayDataset``), so workers always read the summarised images. Worker
    base seeds come from a private generator reseeded every epoch (never the global RNG).
    """

    name = "torch"

    def __init__(self, dataset: Any, *, storage: torch.Tensor | None, **loader_kwargs: Any):
        self.dataset = dataset
        self.sampler = _EpochBatchSampler()
        self._generator = torch.Generator()
        self._kwargs = {k: v for k, v in loader_kwargs.items() if v is not None}
        persistent = bool(loader_kwargs.get("persistent_workers"))
        shared = storage is not None and storage.device.type == "cpu" and storage.is_shared()
        self._restart_on_change = persistent and not shared
        self._loader: DataLoader | None = None

    def epoch_batches(self, batches: list[np.ndarray], seed: int) -> Iterator[Any]:
        self.sampler.set_batches(batches)
        self._generator.manual_seed(seed)
        if self._loader is None:
            self._loader = DataLoader(self.dataset, batch_sampler=self.sampler, generator=self._generator,
                                      **self._kwargs)
        return iter(self._loader)

    def images_changed(self) -> None:
        if self._restart_on_change:
            self.close()

    def close(self) -> None:
        self._loader = None  # its iterator (and persistent workers) go with it


class KCDLoader:
    """A DataLoader that trains each epoch on the points the KCD schedule keeps.

    Args:
        dataset: a map-style dataset (``__len__``, ``__getitem__``) of N >= 1 points:
            :class:`kcd_fast.ArrayDataset`, a torchvision-style dataset with a uint8
            ``.data`` and ``.targets`` (CIFAR-10/100, MNIST), or any dataset with
            ``vaks="off"``.
        schedule: the :class:`CondensationSchedule` (epochs, period, rho, decay, warmup).
        batch_size, shuffle, num_workers, pin_memory, drop_last, collate_fn,
        persistent_workers, prefetch_factor, worker_init_fn, timeout,
        multiprocessing_context: as for ``torch.utils.data.DataLoader``.
        seed: int >= 0; keys the epoch order (``default_rng([seed, epoch])``), worker
            seeds and ``vaks="random"`` draws. No global RNG is read or changed.
        backend: "torch" (default) or "dali" (:class:`kcd_fast.dali_backend.DaliBackend`:
            ArrayDataset or image folders; ``num_workers`` = DALI CPU threads).
        augment: DALI back end only: "auto" (none for arrays, "imagenet" for folders),
            None, "cifar", "cifar_eval", "imagenet", "imagenet_eval" or a callable
            ``(images, device) -> DataNode`` adding DALI ops; seeded from (seed, epoch).
        dali_device: DALI back end only: "auto" (the current CUDA device when there is
            one, else CPU-only operators), a CUDA device index, or None (CPU only).
        dali_overlay_dir: DALI back end, image folders only: None (summarised images kept
            in memory) or a directory for them as files (ImageNet-scale runs).
        value: how points are scored: "entropy" (default), "kl" (needs teacher logits
            in ``observe``) or "random".
        vaks: "low" (default), "high", "random" or "off" (KCD_SPEC section 4).
        alpha: the cost-aware weighting exponent (0.03). eps_m: the smallest weight a
            kept image keeps (0.7). temperature: the KL temperature for ``value="kl"``.
        device: where the value bank lives; None (default): the device of the first
            observed logits.
        strict: validate every observed batch on the host (a sync on CUDA).
        progress: show a tqdm bar per epoch.
        distributed: None (default): shard across ranks when a ``torch.distributed``
            process group is initialised; True: shard (raise if impossible); False: never.
        rank, world_size: default: those of ``group``; given, they must match it.
        group: the (data-parallel) process group to shard over and all-reduce the value
            bank in; None: the default group. See "Distributed (DDP)" in the module
            docstring.

    Yields ``(inputs, targets, indices)``: the collated batch's fields followed by the
    int64 ``[b]`` CPU tensor of the batch's dataset indices (pinned with ``pin_memory``
    on a CUDA machine). See the module docstring for the rules on epochs, ``drop_last``,
    observations and resume.
    """

    def __init__(
        self,
        dataset: Any,
        schedule: CondensationSchedule,
        batch_size: int = 1,
        shuffle: bool = False,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        timeout: float = 0,
        multiprocessing_context: Any = None,
        seed: int = 0,
        backend: str | Backend = "torch",
        value: str | Measure = "entropy",
        vaks: str | Vaks = "low",
        alpha: float = 0.03,
        eps_m: float = 0.7,
        temperature: float = 4.0,
        device: str | torch.device | None = None,
        strict: bool = False,
        progress: bool = False,
        distributed: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        group: Any = None,
        augment: Any = "auto",
        dali_device: int | str | None = "auto",
        dali_overlay_dir: str | os.PathLike | None = None,
    ):
        # -- arguments (all checked before any state is built) --------------------------
        backend = Backend.parse(backend)
        if backend is Backend.DALI:  # ImportError naming the package without DALI; the torch path never imports it
            from .dali_backend import check_loader_args, require_dali

            require_dali()
            check_loader_args(collate_fn=collate_fn, worker_init_fn=worker_init_fn,
                              multiprocessing_context=multiprocessing_context, timeout=timeout)
        elif augment != "auto" or dali_device != "auto" or dali_overlay_dir is not None:
            raise ValueError(
                f"augment, dali_device and dali_overlay_dir apply to backend='dali' (got augment={augment!r}, "
                f"dali_device={dali_device!r}, dali_overlay_dir={dali_overlay_dir!r}); with the torch back end "
                "use the dataset's transform"
            )
        map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        if isinstance(dataset, IterableDataset) or not map_style:
            raise TypeError(f"dataset must be a map-style dataset with __len__ and __getitem__, "
                            f"got {type(dataset).__name__}")
        n = len(dataset)
        if n < 1:
            raise ValueError(f"dataset is empty (len(dataset) = {n}); KCD needs at least one point")
        if not isinstance(schedule, CondensationSchedule):
            raise TypeError(
                f"schedule must be a kcd_fast.CondensationSchedule, got {type(schedule).__name__}"
            )
        batch_size = _check_int(batch_size, "batch_size", 1)
        shuffle = _check_bool(shuffle, "shuffle")
        num_workers = _check_int(num_workers, "num_workers", 0)
        pin_memory = _check_bool(pin_memory, "pin_memory")
        drop_last = _check_bool(drop_last, "drop_last")
        _check_callable(collate_fn, "collate_fn")
        persistent_workers = _check_bool(persistent_workers, "persistent_workers")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        if prefetch_factor is not None:
            prefetch_factor = _check_int(prefetch_factor, "prefetch_factor", 1)
            if num_workers == 0:
                raise ValueError(
                    f"prefetch_factor={prefetch_factor} needs num_workers > 0, got num_workers=0"
                )
        _check_callable(worker_init_fn, "worker_init_fn")
        timeout = _check_number(timeout, "timeout", 0.0, math.inf)
        seed = _check_int(seed, "seed", 0)
        measure = Measure.parse(value)
        mode = Vaks.parse(vaks)
        alpha = _check_number(alpha, "alpha", -math.inf, math.inf)
        eps_m = _check_number(eps_m, "eps_m", 0.0, 1.0)
        temperature = _check_number(temperature, "temperature", 0.0, math.inf, lo_open=True)
        if device is not None:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must be None, 'cpu' or 'cuda[:k]', got {device!r}") from err
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be None, 'cpu' or 'cuda[:k]', got {device!r}")
            device = dev
        strict = _check_bool(strict, "strict")
        progress = _check_bool(progress, "progress")
        dist_info = D.resolve(distributed, rank, world_size, group)
        files = backend is Backend.DALI and is_image_folder(dataset)  # VAKS on files: the DALI overlay
        storage = None if files else require_image_storage(dataset, mode.value)
        if storage is not None and storage.device.type == "cuda" and pin_memory:
            raise ValueError(f"pin_memory=True pins CPU batches, but the dataset's images live on "
                             f"{storage.device}; pass pin_memory=False")
        if storage is not None and storage.device.type == "cuda" and num_workers > 0:
            raise ValueError(
                f"the dataset's images live on {storage.device}; worker processes cannot index them: "
                f"use num_workers=0, got num_workers={num_workers}"
            )

        # -- state -------------------------------------------------------------------------
        self.dataset = dataset
        self.schedule = schedule
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.value = measure
        self.vaks = mode
        self.alpha = alpha
        self.eps_m = eps_m
        self.temperature = temperature
        self.progress = progress
        self._device = device
        self._bank_placed = device is not None
        self._storage = storage
        self._files = files  # the back end materialises summaries (DALI image-folder overlay)
        self._dist = dist_info
        self._ranks_agree = False  # checked by the first iteration after construction or a load
        self.bank = ValueBank(
            n, period=schedule.period, alpha=alpha, measure=measure, temperature=temperature,
            device=device, strict=strict, seed=seed, local=dist_info.communicates,
        )
        self._sizes = schedule.epoch_sizes(n)
        self._condense_at = set(schedule.condensation_epochs)
        self.epoch = 0
        self._active = np.arange(n, dtype=np.int64)
        self.history: list[dict[str, Any]] = []
        self._summaries: list[dict[str, Any]] = []
        self._digest: str | None = None
        self._generation = 0
        if backend is Backend.DALI:
            from .dali_backend import DaliBackend

            self._backend: Any = DaliBackend(  # CPU threads = num_workers; the folder overlay follows the log
                dataset, storage=storage, batch_size=batch_size, num_threads=max(1, num_workers),
                prefetch_queue_depth=prefetch_factor or 2, pin_memory=pin_memory,
                summary_log=lambda: self._summaries, augment=augment, device_id=dali_device,
                overlay_dir=dali_overlay_dir,
            )
        else:
            self._backend = TorchBackend(
                dataset, storage=storage, num_workers=num_workers, pin_memory=pin_memory,
                collate_fn=collate_fn, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                worker_init_fn=worker_init_fn, timeout=timeout, multiprocessing_context=multiprocessing_context,
            )

    # -- DataLoader surface ------------------------------------------------------------
    @property
    def backend(self) -> Any:
        """The back-end object (``TorchBackend`` or ``DaliBackend``) that fetches samples."""
        return self._backend

    @property
    def sampler(self) -> Sampler:
        """The back end's batch sampler (it yields the core's planned batches)."""
        return self._backend.sampler

    @property
    def images(self) -> torch.Tensor | None:
        """The uint8 ``[N, ...]`` storage VAKS blends into (a view), or None."""
        return self._storage

    def __len__(self) -> int:
        """Batches of the coming (or current) epoch on this rank; 0 once the schedule is done."""
        return self._num_batches(self._sizes[self.epoch]) if self.epoch < self.schedule.epochs else 0

    def _yielded(self, n: int) -> int:
        """Samples this rank's batches hold in an epoch of ``n`` (global) points: the
        ``drop_last`` cut and, under DDP, the shard (padded or cut) accounted for."""
        if self._dist.enabled:
            n = D.shard_size(n, self._dist.world_size, self.drop_last)
        return n - n % self.batch_size if self.drop_last else n

    def _num_batches(self, n: int) -> int:
        """Batches this rank runs in an epoch of ``n`` (global) points."""
        if self._dist.enabled:
            n = D.shard_size(n, self._dist.world_size, self.drop_last)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def steps_per_epoch(self) -> list[int]:
        """Batches in each epoch of the whole schedule on this rank (``drop_last`` and, under
        DDP, the shard size accounted for; the same on every rank)."""
        return [self._num_batches(s) for s in self._sizes]

    def samples_per_epoch(self) -> list[int]:
        """Samples this rank's batches hold in each epoch of the schedule: the schedule's
        sizes after the ``drop_last`` cut and, under DDP, sharding (padded or cut). The
        ``history`` records count the schedule's sizes (the paper's C); this is what ran."""
        return [self._yielded(s) for s in self._sizes]

    def total_steps(self) -> int:
        """Batches over the whole schedule on this rank (for LR schedulers such as OneCycleLR)."""
        return sum(self.steps_per_epoch())

    @property
    def distributed(self) -> bool:
        """True when the loader shards its epochs across ranks."""
        return self._dist.enabled

    @property
    def rank(self) -> int:
        """This process's rank in the loader's group (0 when not distributed)."""
        return self._dist.rank

    @property
    def world_size(self) -> int:
        """Ranks the epochs are sharded over (1 when not distributed)."""
        return self._dist.world_size

    @property
    def active_indices(self) -> torch.Tensor:
        """``[n_e]`` int64, ascending: the points of the current epoch, over all ranks (a copy)."""
        return torch.from_numpy(self._active.copy())

    @property
    def rank_indices(self) -> torch.Tensor:
        """``[m]`` int64: the points this rank visits in the current epoch, in visiting
        order, ``m = ceil(n_e / world)`` (``floor`` with ``drop_last``), padded points
        included; the whole ``epoch_order()`` when not distributed. The rank's batches
        are ``rank_indices[k*B:(k+1)*B]`` (the last partial one left out with ``drop_last``)."""
        return torch.from_numpy(self._rank_order(self._order()))

    def epoch_order(self) -> torch.Tensor:
        """``[n_e]`` int64: the order in which the current epoch visits its points (global:
        the same on every rank; each rank visits its shard of it, ``rank_indices``)."""
        return torch.from_numpy(self._order())

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self._active.copy()
        return self._active[np.random.default_rng([self.seed, self.epoch]).permutation(self._active.shape[0])]

    def _rank_order(self, order: np.ndarray) -> np.ndarray:
        """This rank's shard of the global ``order`` ``[n_e]`` (``order`` itself when not distributed)."""
        if not self._dist.enabled:
            return order
        return D.shard_order(order, self._dist.rank, self._dist.world_size, self.drop_last)

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self.epoch >= self.schedule.epochs:
            raise RuntimeError(
                f"the schedule's {self.schedule.epochs} epochs are done (epoch = {self.epoch}); "
                "KCDLoader does not run extra epochs: build a new loader or schedule to train longer"
            )
        if self._dist.communicates and not self._ranks_agree:
            D.agree(self._agreement_digest(), self._dist.group, "loader's configuration and state", self.bank.device)
            self._ranks_agree = True
        self._generation += 1
        order = self._order()
        n_batches = self._num_batches(order.shape[0])
        order = self._rank_order(order)  # under DDP: this rank's shard
        bs = self.batch_size
        batches = [order[k * bs:(k + 1) * bs] for k in range(n_batches)]
        order_t = torch.from_numpy(order)
        if self.pin_memory and torch.cuda.is_available():
            order_t = order_t.pin_memory()
        worker_seed = _stream_seed(self.seed, self.epoch, _WORKER_STREAM, self._dist.rank)
        it = self._backend.epoch_batches(batches, worker_seed)
        return self._epoch(self._generation, self.epoch, order_t, n_batches, it)

    def _agreement_digest(self) -> bytes:
        """What every rank must share: the configuration, epoch, active set and history."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.n, self.seed, self.epoch, self.shuffle, self.drop_last, self.batch_size,
                       self.schedule.state(), self.value.value, self.vaks.value, self.eps_m, self.alpha,
                       self.temperature, self.history, len(self._summaries))).encode())
        h.update(self._active.tobytes())
        return h.digest()

    def _epoch(self, generation: int, epoch: int, order: torch.Tensor, n_batches: int,
               it: Iterator[Any]) -> Iterator[tuple[Any, ...]]:
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, desc=f"KCD epoch {epoch}", leave=False)
        bs, k = self.batch_size, 0
        try:
            for batch in it:
                if generation != self._generation:
                    raise RuntimeError(
                        f"this iterator was made for epoch {epoch}, but the loader has since moved "
                        "(set_epoch, load_state_dict, close or a newer iter()); iterate the loader again"
                    )
                idx = order[k * bs:(k + 1) * bs]
                k += 1
                yield (*batch, idx) if isinstance(batch, (tuple, list)) else (batch, idx)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if generation != self._generation:
            return
        if k != n_batches:
            raise RuntimeError(f"the {self._backend.name} back end yielded {k} batches in epoch {epoch}, "
                               f"expected {n_batches}")
        self._advance()

    def set_epoch(self, epoch: int) -> None:
        """Moves to ``epoch`` (>= the current one, <= schedule.epochs). Skipped epochs
        count as trained without observations: condensations due in between happen now.
        Going back is refused (a condensation cannot be undone; load a state_dict)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
        if not self.epoch <= epoch <= self.schedule.epochs:
            raise ValueError(
                f"epoch must be in [{self.epoch}, {self.schedule.epochs}] (the current epoch up to the "
                f"schedule's end; condensation cannot be undone, load a state_dict to go back), got {epoch}"
            )
        if epoch == self.epoch:
            return
        self._generation += 1
        while self.epoch < epoch:
            self._advance()

    def _advance(self) -> None:
        nxt = self.epoch + 1
        if nxt in self._condense_at:
            self._condense(nxt)
        self.epoch = nxt

    def _condense(self, epoch: int) -> None:
        """The condensation before ``epoch``: values -> keep / dropped -> VAKS -> new set."""
        n_keep, n_prev = self._sizes[epoch], int(self._active.shape[0])
        if self._dist.communicates:  # the only per-stage communication: N * 12 bytes
            self.bank.all_reduce_(self._dist.group)
        cond = condense(self.bank.values(draw=epoch), n_keep, n_prev, self.vaks, self.eps_m,
                        seed=_stream_seed(self.seed, epoch, _VAKS_STREAM))
        pairs = cond.pairs
        if self._dist.communicates:  # every rank must summarise identically: check before blending
            h = hashlib.blake2b(repr(epoch).encode(), digest_size=16)
            for t in (cond.keep, cond.dst, cond.src, cond.eps):
                h.update(t.cpu().contiguous().numpy().tobytes())
            D.agree(h.digest(), self._dist.group, f"condensation before epoch {epoch}", self.bank.device)
        if pairs and (self._storage is not None or self._files):
            dst, src, eps = cond.dst.cpu(), cond.src.cpu(), cond.eps.cpu()
            if self._storage is not None:
                _blend_rows(self._storage, dst, src, eps)
            self._summaries.append({"epoch": epoch, "dst": dst, "src": src, "eps": eps})
            self._digest = None  # computed when a state_dict asks for it
            self._backend.images_changed()
        self._active = cond.keep.cpu().numpy().astype(np.int64, copy=False)
        passes = sum(self._sizes[:epoch])
        record = {
            "epoch": epoch, "stage": self.schedule.stage_of(epoch), "kept": n_keep,
            "dropped": n_prev - n_keep, "pairs": pairs, "passes": passes, "cost": passes / (self.n * epoch),
        }
        self.history.append(record)
        log.info("KCD condensation before epoch %d: kept %d of %d points, dropped %d, summarised %d pairs; "
                 "C so far %.4f", epoch, n_keep, n_prev, n_prev - n_keep, pairs, record["cost"])

    # -- scoring -------------------------------------------------------------------------
    def observe(self, indices: Any, logits: Any, teacher_logits: Any = None) -> None:
        """Scores one training batch (``ValueBank.observe``; no host sync on CUDA).

        Args:
            indices: ``[B]`` int64, the ``indices`` the loader yielded (any device).
            logits: ``[B, C]`` student logits (float32/float16/bfloat16), any grad state.
            teacher_logits: ``[B, C]`` teacher logits, needed for ``value="kl"``.

        Every row counts (see the module docstring); bad input raises before anything
        changes (on CUDA without ``strict``: at the next condensation).
        """
        if not self._bank_placed:
            dev = A.as_torch(logits, "logits")[0].device
            if self.bank.device is not None and self.bank.device != dev:
                self.bank.to(dev)
        self.bank.observe(indices, logits, teacher_logits)
        self._bank_placed = True

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during training, as Python values and CPU tensors
        (``torch.save`` / ``torch.load(weights_only=True)`` friendly). Under DDP a
        collective (call it on every rank): the state is GLOBAL, the same on every rank
        (the value bank's totals include every rank's observations so far), and resumes at
        any world size; taking it changes nothing. ``save(path)`` writes it atomically."""
        return {
            "format": STATE_FORMAT,
            "n": self.n,
            "schedule": self.schedule.state(),
            "config": {"value": self.value.value, "vaks": self.vaks.value, "eps_m": self.eps_m,
                       "alpha": self.alpha, "temperature": self.temperature},
            "seed": self.seed,
            "epoch": self.epoch,
            "active": torch.from_numpy(self._active.copy()),
            "bank": {k: v.clone() if isinstance(v, torch.Tensor) else v  # ValueBank's CPU state aliases
                     for k, v in self.bank.state_dict(self._dist.group).items()},
            "history": [dict(r) for r in self.history],
            "summaries": [{"epoch": s["epoch"], "dst": s["dst"].clone(), "src": s["src"].clone(),
                           "eps": s["eps"].clone()} for s in self._summaries],
            "digest": self._images_digest(),
        }

    def _images_digest(self) -> str | None:
        """Digest of the rows the summaries touched (cached until the next summary)."""
        if self._digest is None and self._summaries and self._storage is not None:
            rows = _touched_rows(self._summaries)
            self._digest = _digest(rows, self._storage[rows.to(self._storage.device)])
        return self._digest

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict``. This loader's dataset must hold the ORIGINAL images
        (or exactly the images this loader summarised so far, when the state continues
        its own run): the summary log is replayed and checked against the state's digest.
        Everything is validated first; on any error nothing changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from KCDLoader.state_dict(), got {type(state).__name__}")
        required = ("format", "n", "schedule", "config", "seed", "epoch", "active", "bank", "history",
                    "summaries", "digest")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"KCDLoader state is missing {missing}")
        for key, typ in (("config", dict), ("bank", dict), ("history", list)):
            if not isinstance(state[key], typ):
                raise ValueError(f"state {key} must be a {typ.__name__}, got {type(state[key]).__name__}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state format is {state['format']!r}, this loader reads {STATE_FORMAT!r}")
        if state["n"] != self.n:
            raise ValueError(
                f"the state was made for a dataset of {state['n']} points, this loader's has {self.n}"
            )
        if state["schedule"] != self.schedule.state():
            raise ValueError(f"the state was made for schedule {state['schedule']}, this loader's is "
                             f"{self.schedule.state()}")
        mine = {"value": self.value.value, "vaks": self.vaks.value, "eps_m": self.eps_m, "alpha": self.alpha,
                "temperature": self.temperature}
        for key, val in mine.items():
            if state["config"].get(key) != val:
                got = state["config"].get(key)
                raise ValueError(f"the state has {key} = {got!r}, this loader has {val!r}")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= self.schedule.epochs:
            raise ValueError(f"state epoch must be an int in [0, {self.schedule.epochs}], got {epoch!r}")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"state seed must be an int >= 0, got {seed!r}")
        active = state["active"]
        want = self._sizes[min(epoch, self.schedule.epochs - 1)]
        if not (isinstance(active, torch.Tensor) and active.dtype == torch.int64 and active.shape == (want,)):
            is_t = isinstance(active, torch.Tensor)
            got = f"{active.dtype} {tuple(active.shape)}" if is_t else type(active).__name__
            raise ValueError(f"state active must be an int64 [{want}] tensor at epoch {epoch}, got {got}")
        act = active.cpu().numpy().astype(np.int64, copy=True)
        if act.size and (act[0] < 0 or act[-1] >= self.n or not (np.diff(act) > 0).all()):
            raise ValueError(f"state active must be ascending, unique points in [0, {self.n})")
        bank = state["bank"]
        missing = [k for k in ("n", "measure", "sums", "counts", "random_draws") if k not in bank]
        if missing:
            raise KeyError(f"KCDLoader state's bank is missing {missing}")
        sums, counts = bank["sums"], bank["counts"]
        if sums is not None and not (isinstance(sums, torch.Tensor) and sums.dtype == torch.float64
                                     and sums.shape == (self.n,) and isinstance(counts, torch.Tensor)
                                     and counts.dtype == torch.int32 and counts.shape == (self.n,)):
            raise ValueError(f"state bank must hold float64 [{self.n}] sums and int32 [{self.n}] counts")
        expect = {"n": self.n, "measure": self.value.value, "period": self.bank.period,
                  "alpha": self.bank.alpha}
        for key, val in expect.items():
            if key in bank and bank[key] != val:
                raise ValueError(f"state bank has {key} = {bank[key]!r}, this loader's has {val!r}")
        if not all(isinstance(r, dict) for r in state["history"]):
            raise ValueError("state history must be a list of dicts (one record per condensation)")
        summaries = self._check_summaries(state["summaries"])
        commit_images = self._prepare_replay(summaries, state["digest"])

        # -- commit (nothing below raises on validated input) ------------------------------
        self.bank.load_state_dict(bank)
        self._generation += 1
        self.bank.seed = seed  # ValueBank.load_state_dict keeps its own seed; the state's is the run's
        self._bank_placed = self._device is not None
        commit_images()
        self._summaries = summaries
        self._digest = state["digest"]
        self.seed = seed
        self.epoch = epoch
        self._active = act
        self.history = [dict(r) for r in state["history"]]
        self._ranks_agree = False  # under DDP, the next iteration checks that every rank loaded the same

    def _check_summaries(self, summaries: Any) -> list[dict[str, Any]]:
        if not isinstance(summaries, list):
            raise ValueError(f"state summaries must be a list, got {type(summaries).__name__}")
        out = []
        for j, s in enumerate(summaries):
            try:
                d, r, e = s["dst"], s["src"], s["eps"]
                ok = all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in (d, r, e)) \
                    and d.dtype == r.dtype == torch.int64 and e.dtype == torch.float64 \
                    and d.shape == r.shape == e.shape
                ok = ok and (d.numel() == 0 or (int(torch.minimum(d.min(), r.min())) >= 0
                                                and int(torch.maximum(d.max(), r.max())) < self.n))
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"state summaries[{j}] must hold int64 [P] dst / src in [0, {self.n}) and "
                                 "float64 [P] eps")
            out.append({"epoch": int(s["epoch"]), "dst": d.cpu().clone(), "src": r.cpu().clone(),
                        "eps": e.cpu().clone()})
        if out and self._storage is None and not self._files:
            raise ValueError("the state holds image summaries but this loader's dataset has no image storage")
        return out

    def _prepare_replay(self, summaries: list[dict[str, Any]], digest: Any) -> Callable[[], None]:
        """Replays the summaries this loader has not applied yet on a copy of the rows they
        touch, checks the digest, and returns the function that writes them back."""
        k = len(self._summaries)
        prefix = k <= len(summaries) and all(
            a["epoch"] == b["epoch"] and torch.equal(a["dst"], b["dst"]) and torch.equal(a["src"], b["src"])
            and torch.equal(a["eps"], b["eps"]) for a, b in zip(self._summaries, summaries[:k], strict=True)
        )
        if not prefix:
            raise ValueError(
                "this loader's images were already summarised along a different history than the state's; "
                "build a new KCDLoader over a freshly loaded ORIGINAL dataset and load the state into it"
            )
        if not summaries or self._storage is None:
            return lambda: None
        storage = self._storage
        rows = _touched_rows(summaries)
        rows_dev = rows.to(storage.device)
        sub = storage[rows_dev].contiguous()  # [U, ...] copy
        for s in summaries[k:]:
            pos_d = torch.searchsorted(rows, s["dst"]).to(storage.device)
            pos_s = torch.searchsorted(rows, s["src"]).to(storage.device)
            blend_(sub, pos_d, pos_s, s["eps"].to(storage.device), check=False)
        if digest is not None and _digest(rows, sub) != digest:
            raise ValueError(
                "after replaying the state's summaries, the images differ from those the state was saved "
                "with: this loader's dataset is not the ORIGINAL dataset (or it was already summarised by "
                "another loader); reload the original dataset and load the state into a new KCDLoader over it"
            )

        def commit() -> None:
            if len(summaries) > k:
                storage[rows_dev] = sub
                self._backend.images_changed()

        return commit

    def close(self) -> None:
        """Releases the back end's workers; the loader can iterate again afterwards."""
        self._generation += 1
        self._backend.close()

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes ``state_dict()`` to ``path`` atomically: a temporary file in the same
        directory, flushed and fsynced, renamed over ``path``, the directory fsynced
        (:func:`kcd_fast.distributed.save_checkpoint`). A crash or error at any point
        leaves the previous file at ``path`` intact and loadable.

        Under DDP a collective: call it on every rank. Every rank takes the (global)
        state, rank 0 writes it, and the call returns on every rank once the file is in
        place; a failed write raises on rank 0 (its error) and ``RuntimeError`` on the
        others, instead of leaving them waiting. Save between epochs (see "State and
        resume"); resume with :meth:`load` or :meth:`restore`, at any world size."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        payload = {"format": D.CHECKPOINT_FORMAT, "world_size": self.world_size, "loader": self.state_dict()}
        error: Exception | None = None
        if self._dist.rank == 0:
            try:
                D.save_checkpoint(payload, path)
            except Exception as err:  # re-raised below, after telling the other ranks
                error = err
        ok = D.all_ok(error is None, self._dist.group, self.bank.device) if self._dist.communicates else True
        if error is not None:
            raise error
        if not ok:
            raise RuntimeError(f"rank 0 could not write the checkpoint {os.fspath(path)!r}; see rank 0's error")

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Loads the checkpoint :meth:`save` wrote at ``path`` into this loader
        (``load_state_dict``: this loader's dataset must hold the ORIGINAL images). Under
        DDP call it on every rank; each rank reads the file (a file system every rank
        sees). Raises ``ValueError`` naming the path when the file is truncated, corrupt,
        not a KCDLoader checkpoint, or made for another dataset, schedule or configuration;
        nothing changes then."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        payload = D.load_checkpoint(path)
        if not (isinstance(payload, dict) and payload.get("format") == D.CHECKPOINT_FORMAT and "loader" in payload):
            got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"checkpoint {os.fspath(path)!r} is not a KCDLoader checkpoint "
                             f"(format {got!r}, expected {D.CHECKPOINT_FORMAT!r})")
        try:
            self.load_state_dict(payload["loader"])
        except (KeyError, TypeError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ValueError(f"checkpoint {os.fspath(path)!r} does not fit this loader: {msg}") from err

    @classmethod
    def load(cls, path: str | os.PathLike[str], dataset: Any, schedule: CondensationSchedule,
             **kwargs: Any) -> KCDLoader:
        """``KCDLoader(dataset, schedule, **kwargs)`` restored from the checkpoint at ``path``
        (:meth:`restore`), at this process's world size, whatever the saving run's was.
        ``dataset`` must hold the ORIGINAL images: the summaries are replayed onto them."""
        loader = cls(dataset, schedule, **kwargs)
        loader.restore(path)
        return loader

    def __repr__(self) -> str:
        return (f"KCDLoader(n={self.n}, epoch={self.epoch}/{self.schedule.epochs}, "
                f"active={self._active.shape[0]}, batch_size={self.batch_size}, "
                f"backend={self._backend.name!r}, value={self.value.value!r}, vaks={self.vaks.value!r})")
