"""KCDLoader: a drop-in for ``torch.utils.data.DataLoader`` that condenses the training set
on the schedule of docs/algorithm.md section 2 and summarises dropped points per section 4.

Layout: :class:`KCDLoader` is the backend-agnostic core (schedule, value bank,
condensation, VAKS, active set, per-epoch order, state). Its configuration is one
:class:`kcd_fast.loader.config.LoaderConfig`; it plans each epoch with
:class:`kcd_fast.loader.plan.Planner` and hands the index batches to a back end
(:mod:`kcd_fast.loader.backends`: torch, DALI, tensor or indices, built by
``factory.make_backend``), which only fetches, transforms and collates samples, and takes
each condensation's summary through one call, ``apply_summary``. Options only one back end
understands (DALI's ``augment``, ``dali_device``, ``dali_overlay_dir``; the tensor back
end's ``augment``, ``tensor_device``, ``channels_last``, ``dtype``) pass through
``**backend_options``.

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
Epochs (docs/resume.md: "How epochs advance")
    Progress is one explicit cursor (:mod:`kcd_fast.loader.progress`): batches yielded,
    batches trained (observed: an observe names its batch by its indices, so partial,
    split or merged observes count a batch once) and the epoch they belong to. An epoch
    is complete once its last planned batch has been yielded; the condensation due
    before the next epoch then happens at the first of: the iterator's end
    (``StopIteration``, as in a ``for`` loop; unless some batch of the epoch was trained
    but not all yielded ones, as with a fetcher that reads one batch ahead), the next
    ``iter()``, ``len()`` or ``set_epoch``; ``state_dict()`` changes nothing. Not earlier,
    so that the last batch can still be observed; not later, so that loops pulling exactly
    ``len(loader)`` batches (Lightning, the HF Trainer) advance too. An observe that
    arrives after that condensation ran, before any batch of the next epoch was yielded,
    is late: a ``UserWarning`` once per epoch (it still counts toward the next
    condensation); ``strict=True`` raises instead. ``epoch`` and ``active_indices`` name the epoch in
    progress until then. A new ``iter()`` while the current epoch is incomplete restarts
    it where it started when none of its batches was observed (a peek such as
    ``next(iter(loader))``; a peek at an epoch of one batch does not complete it), and
    otherwise ends it with a ``UserWarning`` (a loop that broke out early: the epoch counts
    as trained on what was observed) and starts the next. ``set_epoch(e)`` follows
    ``DistributedSampler.set_epoch``: the current epoch changes nothing; the next one
    advances; a jump, or an advance over an incomplete epoch, warns and moves there;
    going back raises. ``loader.sampler.set_epoch`` (what Lightning calls) is the same.
    When the back end fails while producing a batch (an unreadable file, ...), the error
    propagates and the loader stays usable: the next ``iter()`` continues the epoch at the
    batch that failed, with fresh workers (fix or replace the file first; under DDP the other
    ranks do not wait for such a retry: restart the job from a checkpoint instead). Iterating once all
    ``schedule.epochs`` epochs are done raises ``RuntimeError``.
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
    twice: a point observed twice in one epoch is accumulated twice (``n_i += 2``; the
    authors' code overwrites one slot per point and epoch, docs/algorithm.md section 8).
    On CPU (or with ``strict=True``) indices outside ``[0, N)``, non-finite logits and
    length mismatches raise before anything changes; on CUDA the bad rows are skipped on
    the device and raised at the next condensation.
State and resume
    ``state_dict()`` holds the epoch, the value bank, the active set, the seed (all RNG
    streams are derived from ``(seed, epoch)``), the history and the summary log (the
    ``(dst, src, eps)`` of every condensation) with a digest of the summarised rows.
    ``load_state_dict`` on a new loader over the ORIGINAL dataset replays the log with
    ``blend_``, checks the digest, and continues bit-exactly: same active sets, images,
    order, batches. A state records its ``position``: the batches of the epoch trained
    (observed) so far: the loader that loads it yields exactly the remaining batches of
    that epoch, and its bank already holds the observations of the batches before (take
    the state after observing the last trained batch). A state taken after the epoch's last
    batch was trained records all of them; the condensation that ends the epoch runs after
    the load (at the next ``iter()`` or ``set_epoch``; ``len()`` still counts that epoch,
    as Lightning expects when it finishes the epoch after a validation-end checkpoint).
    A mid-epoch state resumes at the world size it was taken at (one with all of its
    epoch's batches trained, or none, at any world size). Random numbers of
    the torch back end are seeded per batch from ``(seed, epoch, rank, batch position)``
    (torch's, numpy's and Python's global RNGs, restored after each fetch), so augmentations
    do not depend on ``num_workers``, ``persistent_workers`` or a resume; the DALI back end
    seeds its pipeline from ``(seed, epoch)`` and replays the batches before a resume
    point to reach the same random state.
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
    rank. Each first agrees on what it is (an op tag and the epoch, posted in the process
    group's store: ``kcd_fast.distributed.handshake``), so a rank that calls one alone
    (``save()`` on rank 0 only) gets ``CollectiveError`` naming the rule on every rank
    instead of mismatched all-reduces, and a rank that does not come within
    ``collective_timeout`` seconds (default 300) is named by the ranks that wait.
    Totals agree with a single-process run that made the same observations up to
    float64 rounding (the additions are grouped differently). docs/distributed.md has
    the rules, DCP (``torch.distributed.checkpoint``) and the configuration checks.
Checkpoints
    ``loader.save(path)`` (every rank; rank 0 writes) stores the GLOBAL state atomically
    (temporary file, fsync, ``os.replace``, directory fsync), so a crash during a save
    leaves the previous checkpoint intact, and removes the temporary files that killed
    saves left beside it; ``KCDLoader.load(path, dataset, schedule, **kwargs)`` resumes
    it at any world size. A truncated, corrupt or mismatched checkpoint raises
    ``ValueError`` naming the path. A state records the options that decide an epoch's
    batches (``state["order"]``, :mod:`kcd_fast.loader.order`): in a state taken
    mid-epoch they must match this loader's; between epochs this loader's apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, Sampler

from .. import distributed as D
from .._checks import check_int, check_path, is_int
from ..bank import Measure, ValueBank
from ..checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ..condense import Pairing, Vaks, condense, dataset_labels
from ..policies import InfoBatchSchedule, LossScores
from ..schedule import CondensationSchedule
from . import dcp as DCP
from . import order as O
from . import state as S
from .accelerate_state import gradient_state
from .backends.base import BackendProtocol
from .backends.factory import auto_vaks, make_backend
from .config import Backend, LoaderConfig
from .plan import UNOBSERVED_STREAM, VAKS_STREAM, Planner, stream_seed
from .progress import EpochCursor
from .transfer import to_batch_device

__all__ = ["Backend", "KCDLoader"]

log = logging.getLogger(__name__)


class KCDLoader:
    """A DataLoader that trains each epoch on the points the KCD schedule keeps.

    Args:
        dataset: a map-style dataset (``__len__``, ``__getitem__``) of N >= 1 points:
            :class:`kcd_fast.ArrayDataset`, a torchvision-style dataset with a uint8
            ``.data`` and ``.targets`` (CIFAR-10/100, MNIST), or any dataset with
            ``vaks="off"``.
        schedule: the :class:`CondensationSchedule` (epochs, period, rho, decay, warmup), or an
            :class:`kcd_fast.InfoBatchSchedule` (InfoBatch's rule: score with
            ``observe_scores(indices, losses)``, weight losses with ``weights(indices)``).
        batch_size, shuffle, num_workers, pin_memory, drop_last, collate_fn,
        persistent_workers, prefetch_factor, worker_init_fn, timeout,
        multiprocessing_context: as for ``torch.utils.data.DataLoader``.
        seed: int >= 0; keys the epoch order (``default_rng([seed, epoch])``), worker
            seeds and ``vaks="random"`` draws. No global RNG is read or changed.
        backend: "torch" (default: DataLoader workers, per-item ``dataset[i]``), "dali"
            (:class:`kcd_fast.loader.backends.dali.DaliBackend`: ArrayDataset or image
            folders; ``num_workers`` = DALI CPU threads), "tensor"
            (:class:`kcd_fast.loader.backends.tensor.TensorBackend`: whole batches from an
            ArrayDataset's storage by one fused kernel; options ``augment`` (None, "cifar",
            "cifar_eval", a ``Recipe`` or a callable), ``tensor_device``, ``channels_last``,
            ``dtype``) or "indices" (only each batch's indices: ``KCDBatchSampler``).
        **backend_options: options of one back end, checked by
            :func:`kcd_fast.loader.backends.factory.check_options`; for "dali":
        augment: DALI back end only: "auto" (none for arrays, "imagenet" for folders),
            None, "cifar", "cifar_eval", "imagenet", "imagenet_eval" or a callable
            ``(images, device) -> DataNode`` adding DALI ops; seeded from (seed, epoch).
        dali_device: DALI back end only: "auto" (the current CUDA device when there is
            one, else CPU-only operators), None or "cpu" (CPU only), "cuda" (the current
            CUDA device), "cuda:K" or a CUDA device index K.
        dali_overlay_dir: DALI back end, image folders only: None (summarised images kept
            in memory, up to ``dali_overlay_budget`` bytes, then spilled to a private temporary
            directory) or a directory for them as files (ImageNet-scale runs): content-addressed
            by the summary log, reused by a resumed loader, split between DDP ranks that share
            the directory, removed by its last user.
        dali_overlay_device: DALI back end, image folders only: where VAKS pairs are
            summarised: "auto" (default: on DALI's GPU when it runs on one and torchcodec is
            installed, else "cpu"), "cpu" (the CPU threads; Pillow's pixels bit for bit) or
            "gpu" (DALI's GPU; an error without one or without torchcodec).
        value: how points are scored: "entropy" (default), "kl" (needs teacher logits
            in ``observe``) or "random".
        vaks: "auto" (default: "low" when the back end can blend the dataset's images, "off"
            for datasets without images such as token ids), "low", "high", "random" or
            "off" (docs/algorithm.md section 4).
        vaks_pairing: "paper" (default: dropped and kept points paired by rank over the whole
            set) or "class" (a dropped point only into a kept point of its own class, by rank
            within the class; needs the dataset's labels: docs/policies.md).
        alpha: the cost-aware weighting exponent (0.03). eps_m: the smallest weight a
            kept image keeps (0.7). temperature: the KL temperature for ``value="kl"``.
        device: where the value bank lives; None (default): the device of the first
            observed logits.
        batch_device: where the loader delivers each batch's tensors (not the value bank's
            ``device``): None (default: where the back end made them), "cpu", "cuda" or
            "cuda:k" (``accelerator.device`` under accelerate, whose ``prepare`` returns a
            KCDLoader as it is: it neither moves nor shards it). CPU tensors go to a GPU from
            pinned memory with ``non_blocking=True`` (with ``pin_memory=True`` the torch back
            end pins them in its pin thread; otherwise the loader pins them first), for every
            back end; the indices stay an int64 CPU tensor (``observe`` takes them anywhere).
        strict: validate every observed batch on the host (a sync on CUDA).
        progress: show a tqdm bar per epoch.
        distributed: None (default): shard across ranks when a ``torch.distributed``
            process group is initialised; True: shard (raise if impossible); False: never.
        rank, world_size: default: those of ``group``; given, they must match it.
        group: the (data-parallel) process group to shard over and all-reduce the value
            bank in; None: the default group. See "Distributed (DDP)" in the module
            docstring.
        collective_timeout: seconds each of the loader's collectives waits for the other
            ranks before it raises ``kcd_fast.distributed.CollectiveError`` naming the
            ranks that did not come (default 300; None: the process group's timeout).

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
        vaks: str | Vaks = "auto",
        alpha: float = 0.03,
        eps_m: float = 0.7,
        temperature: float = 4.0,
        device: str | torch.device | None = None,
        batch_device: str | torch.device | None = None,
        strict: bool = False,
        progress: bool = False,
        distributed: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        group: Any = None,
        collective_timeout: float | None = D.DEFAULT_COLLECTIVE_TIMEOUT,
        vaks_pairing: str | Pairing = "paper",
        **backend_options: Any,
    ):
        # -- arguments (all checked before any state is built) --------------------------
        if isinstance(dataset, (str, bytes, os.PathLike)):  # a str is a sequence: it would "work"
            raise TypeError(
                f"dataset must be a dataset object, got the path {os.fsdecode(dataset)!r}: for a folder of images "
                "(one subfolder per class) pass kcd_fast.ImageFolder(path)"
            )
        if isinstance(vaks, str) and vaks == "auto":
            vaks = auto_vaks(dataset, Backend.parse(backend))
        config = LoaderConfig.create(
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            backend=backend,
            value=value,
            vaks=vaks,
            alpha=alpha,
            eps_m=eps_m,
            temperature=temperature,
            device=device,
            batch_device=batch_device,
            strict=strict,
            progress=progress,
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=worker_init_fn,
            timeout=timeout,
            multiprocessing_context=multiprocessing_context,
        )
        map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        if isinstance(dataset, IterableDataset) or not map_style:
            raise TypeError(
                f"dataset must be a map-style dataset with __len__ and __getitem__, got {type(dataset).__name__}"
            )
        n = len(dataset)
        if n < 1:
            raise ValueError(f"dataset is empty (len(dataset) = {n}); KCD needs at least one point")
        if not isinstance(schedule, (CondensationSchedule, InfoBatchSchedule)):
            raise TypeError(
                "schedule must be a kcd_fast.CondensationSchedule or kcd_fast.InfoBatchSchedule, got "
                f"{type(schedule).__name__}"
            )
        pairing = Pairing.parse(vaks_pairing, "vaks_pairing")
        labels = None
        if pairing is Pairing.CLASS and config.vaks is not Vaks.OFF:
            labels = dataset_labels(dataset, n)  # raises naming vaks_pairing when the dataset has none
        dist_info = D.resolve(distributed, rank, world_size, group, collective_timeout)
        backend_obj = make_backend(dataset, config, backend_options)
        if hasattr(backend_obj, "set_distributed"):  # e.g. the DALI folder overlay splits its work
            backend_obj.set_distributed(dist_info)

        # -- state -------------------------------------------------------------------------
        self.dataset = dataset
        self.schedule = schedule
        self.config = config
        self.n = n
        self.seed = config.seed  # state: load_state_dict continues the saved run's seed
        self._dist = dist_info
        self._order = O.order_record(config, dist_info.world_size, backend_options)  # recorded in every state
        self._planner = Planner(config.batch_size, config.shuffle, config.drop_last, config.seed, dist_info)
        self._backend: BackendProtocol = backend_obj
        self._ranks_agree = False  # checked by the first iteration after construction or a load
        self.bank = ValueBank(
            n,
            period=schedule.period,
            alpha=config.alpha,
            measure=config.value,
            temperature=config.temperature,
            device=config.device,
            strict=config.strict,
            seed=config.seed,
            local=dist_info.communicates,
        )
        self._sizes = list(schedule.epoch_sizes(n))  # InfoBatchSchedule: upper bounds, set as epochs are drawn
        # policies beside KCD's condensation (issue 30): InfoBatch's loss scores, VAKS pairing by class
        self._pairing, self._labels = pairing, labels
        self._infobatch = LossScores(n, schedule) if isinstance(schedule, InfoBatchSchedule) else None
        if self._infobatch is not None:
            self._infobatch.sizes = [n]
        self._condense_at = set(schedule.condensation_epochs)
        self.epoch = 0
        self._active = np.arange(n, dtype=np.int64)
        self.history: list[dict[str, Any]] = []
        self._summaries: list[S.Summary] = []
        self._digest: str | None = None
        self._generation = 0
        self._iterators = 0  # iterators made (a made but never pulled one may follow a load)
        # the epoch in progress: batches yielded, batches trained (observed, named by their
        # indices), where the current iterator started and where the next one resumes
        self._cursor = EpochCursor(n)
        # set by KCDBatchSampler: a DataLoader reads the batches ahead of training, so an
        # unobserved batch is never a peek and an epoch ends once its batches are observed
        self._reads_ahead = False
        self._sampler_link()

    # -- configuration -------------------------------------------------------------------
    batch_size = property(lambda self: self.config.batch_size, doc="Points per batch.")
    shuffle = property(lambda self: self.config.shuffle, doc="Whether each epoch's order is shuffled.")
    drop_last = property(lambda self: self.config.drop_last, doc="Whether a last partial batch is left out.")
    num_workers = property(lambda self: self.config.num_workers, doc="Worker processes (DALI: CPU threads).")
    pin_memory = property(lambda self: self.config.pin_memory, doc="Whether CPU batches are pinned.")
    value = property(lambda self: self.config.value, doc="How points are scored (Measure).")
    vaks = property(lambda self: self.config.vaks, doc="The VAKS mode (Vaks).")
    alpha = property(lambda self: self.config.alpha, doc="The cost-aware weighting exponent.")
    eps_m = property(lambda self: self.config.eps_m, doc="The smallest weight a kept image keeps.")
    temperature = property(lambda self: self.config.temperature, doc="The KL temperature.")
    progress = property(lambda self: self.config.progress, doc="Whether a tqdm bar shows each epoch.")

    def _sampler_link(self) -> None:
        """``loader.sampler.set_epoch(e)`` (what Lightning calls) is ``loader.set_epoch(e)``."""
        ref = weakref.WeakMethod(self.set_epoch)

        def forward(epoch: int) -> None:
            method = ref()
            if method is not None:
                method(epoch)

        self._backend.sampler.on_set_epoch = forward
        me = weakref.ref(self)

        def length() -> int:  # len(loader.sampler): the current epoch's batches (no side effects)
            loader = me()
            return 0 if loader is None else loader._batches_in(loader.epoch)

        self._backend.sampler.length = length

    # -- DataLoader surface ------------------------------------------------------------
    @property
    def backend(self) -> Any:
        """The back-end object (``TorchBackend`` or ``DaliBackend``) that fetches samples."""
        return self._backend

    @property
    def sampler(self) -> Sampler:
        """The back end's batch sampler (it yields the core's planned batches); its
        ``set_epoch`` is the loader's."""
        return self._backend.sampler

    @property
    def prefetch_factor(self) -> int | None:
        """Batches each worker loads ahead, as ``DataLoader.prefetch_factor`` (None without workers)."""
        return self.config.prefetch_factor if self.config.num_workers > 0 else None

    @property
    def batch_sampler(self) -> Sampler:
        """The same batch sampler (``DataLoader`` names it so); its ``set_epoch`` is the loader's."""
        return self._backend.sampler

    @property
    def images(self) -> torch.Tensor | None:
        """The uint8 ``[N, ...]`` storage VAKS blends into (a view), or None."""
        return self._backend.images

    def __len__(self) -> int:
        """Batches of the current epoch on this rank, or of the next one once every batch of
        the current one was yielded (that epoch is completed first: see "Epochs"); 0 once
        the schedule is done."""
        self._settle()
        return self._batches_in(self.epoch)

    @property
    def resume_position(self) -> int:
        """Batches of the current epoch that the next iterator skips because they were
        trained before a resume (a mid-epoch state) or before a failed batch; 0 otherwise."""
        return self._cursor.resume_at

    def _batches_in(self, epoch: int) -> int:
        return self._planner.num_batches(self._sizes[epoch]) if epoch < self.schedule.epochs else 0

    def _batches_on(self, epoch: int, sizes: list[int] | None = None) -> Callable[[int], int]:
        """``world -> batches per rank of epoch`` on ``world`` ranks (a saved state's world size;
        epoch sizes ``sizes``, default this loader's)."""
        sizes = self._sizes if sizes is None else sizes

        def batches(world: int) -> int:
            if epoch >= self.schedule.epochs:
                return 0
            dist = D.DistInfo(enabled=world > 1, world_size=world)
            return dataclasses.replace(self._planner, dist=dist).num_batches(sizes[epoch])

        return batches

    def _batches_under(self, epoch: int, order: Any, sizes: list[int] | None = None) -> int | None:
        """Batches per rank of ``epoch`` under a saved state's ``order`` record (its batch
        size, drop_last and world size; epoch sizes ``sizes``, default this loader's); None
        when the record does not say."""
        try:
            batch_size, drop_last, world = int(order["batch_size"]), bool(order["drop_last"]), int(order["world_size"])
        except (TypeError, KeyError, ValueError):
            return None
        if epoch >= self.schedule.epochs or batch_size < 1 or world < 1:
            return None
        dist = D.DistInfo(enabled=world > 1, world_size=world)
        planner = dataclasses.replace(self._planner, batch_size=batch_size, drop_last=drop_last, dist=dist)
        return planner.num_batches((self._sizes if sizes is None else sizes)[epoch])

    def steps_per_epoch(self) -> list[int]:
        """Batches in each epoch of the whole schedule on this rank (``drop_last`` and, under
        DDP, the shard size accounted for; the same on every rank)."""
        return [self._planner.num_batches(s) for s in self._sizes]

    def samples_per_epoch(self) -> list[int]:
        """Samples this rank's batches hold in each epoch of the schedule: the schedule's
        sizes after the ``drop_last`` cut and, under DDP, sharding (padded or cut). The
        ``history`` records count the schedule's sizes (the paper's C); this is what ran."""
        return [self._planner.samples(s) for s in self._sizes]

    def total_steps(self, accumulate: int = 1, epochs: int | None = None) -> int:
        """Optimizer steps over the schedule on this rank, for LR schedulers such as
        OneCycleLR: the batches, or with gradients accumulated over ``accumulate`` batches
        ``sum(ceil(batches_e / accumulate))`` (an epoch's last, partial group steps too, as in
        Lightning's ``accumulate_grad_batches``, the HF Trainer's
        ``gradient_accumulation_steps`` and accelerate); over the first ``epochs`` epochs
        when given (a run shorter than the schedule)."""
        k = check_int(accumulate, "accumulate", 1)
        steps = self.steps_per_epoch()
        if epochs is not None:
            steps = steps[: check_int(epochs, "epochs", 0)]
        return sum(-(-s // k) for s in steps)

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
        return torch.from_numpy(self._planner.rank_order(self._planner.order(self._active, self.epoch)))

    def epoch_order(self) -> torch.Tensor:
        """``[n_e]`` int64: the order in which the current epoch visits its points (global:
        the same on every rank; each rank visits its shard of it, ``rank_indices``)."""
        return torch.from_numpy(self._planner.order(self._active, self.epoch))

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self._settle()
        self._check_not_done()
        cur = self._cursor
        if cur.resume_at:  # a state saved mid-epoch, or a batch that failed: the rest of the epoch
            start, cur.resume_at = cur.resume_at, 0
        elif cur.yielded > cur.iter_start and cur.observed_any():  # a loop left the epoch early
            n = self._batches_in(self.epoch)
            warnings.warn(
                f"KCDLoader: epoch {self.epoch} was left after {cur.yielded} of its {n} batches and a new "
                f"iterator was asked for: epoch {self.epoch} counts as trained on the batches observed so far, "
                f"and the loader moves on to epoch {self.epoch + 1} (a loop that breaks early ends its epoch; "
                "call set_epoch to say so explicitly)",
                stacklevel=2,
            )
            self._generation += 1
            self._advance()
            self._check_not_done()
            start = 0
        else:  # fresh, or a peek (nothing observed): from where the last iterator started
            start = cur.iter_start
        if self._dist.communicates and not self._ranks_agree:
            D.handshake(self._dist, "iter", self.epoch, f"iter() at epoch {self.epoch}")
            D.agree(self._agreement_digest(), self._dist.group, "loader's configuration and state", self.bank.device)
            self._ranks_agree = True
        self._generation += 1
        plan = self._planner.plan(self._active, self.epoch)
        order_t = torch.from_numpy(plan.order)
        if self.config.pin_memory and torch.cuda.is_available():
            order_t = order_t.pin_memory()
        # a state taken after the epoch's last batch was trained: nothing left, the epoch ends
        it: Iterator[Any] = iter(())
        if start < len(plan.batches):
            it = self._backend.epoch_batches(plan.batches, plan.worker_seed, start)
        self._cursor.begin(plan.batches, start)
        self._iterators += 1
        return self._epoch(self._generation, self.epoch, order_t, len(plan.batches), it, start, self._iterators)

    def _check_not_done(self) -> None:
        if self.epoch >= self.schedule.epochs:
            raise RuntimeError(
                f"the schedule's {self.schedule.epochs} epochs are done (epoch = {self.epoch}); "
                "KCDLoader does not run extra epochs: build a new loader or schedule to train longer (after a "
                "resume, loop over range(loader.epoch, schedule.epochs), not range(schedule.epochs))"
            )

    def _complete(self) -> bool:
        """Every planned batch of the current epoch was yielded (an epoch of no batches is
        complete as it is)."""
        return self.epoch < self.schedule.epochs and self._cursor.yielded == self._batches_in(self.epoch)

    def _lagging(self) -> bool:
        """Fewer batches were trained (observed) than yielded: a fetcher read ahead of the
        training step (once some batch of the epoch was trained; from the start when the
        loader reads ahead)."""
        return self._cursor.lagging(self._reads_ahead)

    def _peeked(self) -> bool:
        """The current iterator yielded a single batch and none of it was observed (such as
        ``next(iter(loader))`` on an epoch of one batch): it does not complete the epoch."""
        return self._cursor.peeked(self._reads_ahead)

    def _settle(self) -> None:
        """Completes the current epoch when its last batch was yielded: the condensation due
        before the next epoch happens now (under DDP a collective, on every rank)."""
        cur = self._cursor
        yielded = cur.yielded > cur.iter_start  # the current iterator yielded its last batch
        if cur.iterated and yielded and self._complete() and not self._peeked():
            self._generation += 1
            self._advance()

    def _agreement_digest(self) -> bytes:
        """What every rank must share: the configuration, seed, epoch, active set and history."""
        h = hashlib.blake2b(digest_size=16)
        h.update(
            repr(
                (
                    self.n,
                    self.seed,
                    self.epoch,
                    self.schedule.state(),
                    self.config.agreement(),
                    self.history,
                    len(self._summaries),
                )
            ).encode()
        )
        h.update(self._active.tobytes())
        h.update(self._pairing.value.encode())
        return h.digest()

    def _epoch(
        self,
        generation: int,
        epoch: int,
        order: torch.Tensor,
        n_batches: int,
        it: Iterator[Any],
        start: int,
        made: int,
    ) -> Iterator[tuple[Any, ...]]:
        bar = None
        if self.config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, initial=start, desc=f"KCD epoch {epoch}", leave=False)
        bs, k, pulled = self.config.batch_size, start, False
        accelerate = gradient_state()  # accelerate's accumulate() steps at an epoch's last batch
        self.end_of_dataloader, self.remainder = False, -1
        if accelerate is not None:
            accelerate._add_dataloader(self)
        try:
            while True:
                if generation != self._generation:  # checked before pulling: with persistent workers
                    if not pulled and made == self._iterators:
                        # made but never pulled, and no newer iterator since: the loader moved under it
                        # (a load_state_dict, set_epoch or close between iter() and next(), as Lightning's
                        # fit loop does when it resumes): it iterates the loader as it is now
                        yield from iter(self)
                        return
                    if k == n_batches:  # nothing was left to yield (completed by observing its last batch)
                        return
                    raise RuntimeError(  # a newer iterator shares the back end's iterator
                        f"this iterator was made for epoch {epoch}, but the loader has since moved "
                        "(set_epoch, load_state_dict, close or a newer iter()); iterate the loader again"
                    )
                try:
                    batch = next(it)
                except StopIteration:
                    break
                if self.config.batch_device is not None:  # a failed copy resumes at this batch, as a failed fetch
                    batch = to_batch_device(batch, self.config.batch_device)
                idx = order[k * bs : (k + 1) * bs]
                k += 1
                self._cursor.yielded_batch(k)  # the epoch is complete once k == n_batches
                self.end_of_dataloader = k == n_batches
                if self._dist.communicates:  # where this rank is, for a peer waiting at a mid-epoch save
                    D.heartbeat(self._dist, epoch, k)
                pulled = True
                yield (*batch, idx) if isinstance(batch, (tuple, list)) else (batch, idx)
                if bar is not None:
                    bar.update(1)
        except Exception:
            if generation == self._generation:  # the back end failed (an unreadable file, ...):
                self._cursor.resume_at = k  # the next iterator continues this epoch at the batch that failed
                self._backend.close()  # with fresh workers
            raise
        finally:
            if bar is not None:
                bar.close()
            if accelerate is not None:
                accelerate._remove_dataloader(self)
            if generation == self._generation:  # this epoch's plan is no longer to be iterated
                self._backend.sampler.disallow()
        if generation != self._generation:
            return
        if k != n_batches:
            raise RuntimeError(
                f"the {self._backend.name} back end yielded {k} batches in epoch {epoch}, expected {n_batches}"
            )
        if self._lagging():
            # the loop observes, but not yet the last batch(es): a fetcher that reads one batch
            # ahead (Lightning's, accelerate's) ends the iterator before the last training step.
            # The epoch is complete; it advances at the next iter(), len() or set_epoch.
            return
        self._advance()

    def set_epoch(self, epoch: int) -> None:
        """Says which epoch comes next, like ``DistributedSampler.set_epoch`` (frameworks call
        it at every epoch start; Lightning through ``loader.sampler`` / ``batch_sampler``).

        - ``epoch`` is the current one: nothing changes (also when all its batches were
          yielded: the advance then waits for the next iterator, ``len`` or ``state_dict``);
        - the next one, after every batch of the current one was yielded: the normal advance
          (the condensation due before it happens now);
        - the next one while the current epoch is incomplete, or a jump further ahead: the
          loader moves there with a ``UserWarning``; the rest of the current epoch and any
          skipped epoch count as trained without observations, and the condensations due in
          between happen now;
        - an earlier epoch, or one past ``schedule.epochs``: ``ValueError`` (a condensation
          cannot be undone; load a state_dict to go back).
        """
        epoch = check_int(epoch, "epoch")
        if not self.epoch <= epoch <= self.schedule.epochs:
            raise ValueError(
                f"epoch must be in [{self.epoch}, {self.schedule.epochs}] (the current epoch up to the "
                f"schedule's end; condensation cannot be undone, load a state_dict to go back), got {epoch}"
            )
        if epoch == self.epoch:
            return
        notes = []
        if not self._complete() and self.epoch < self.schedule.epochs:
            notes.append(
                f"epoch {self.epoch} has yielded {self._cursor.yielded} of its {self._batches_in(self.epoch)} batches: "
                f"epoch {self.epoch} ends here, trained on the batches observed so far"
            )
        if epoch > self.epoch + 1:
            notes.append(
                f"it jumps from epoch {self.epoch}: epochs {self.epoch + 1}..{epoch - 1} are skipped (counted as "
                "trained without observations; the condensations due before them happen now)"
            )
        if notes:
            warnings.warn(f"KCDLoader.set_epoch({epoch}): " + "; ".join(notes), stacklevel=2)
        self._generation += 1
        while self.epoch < epoch:
            self._advance()

    def _advance(self) -> None:
        nxt = self.epoch + 1
        condensed = nxt in self._condense_at
        if condensed:
            self._condense(nxt)
        self.epoch = nxt
        self._cursor.reset(nxt, 0, after_advance=True, condensed=condensed)

    def _rank_unobserved(self, values: torch.Tensor, epoch: int, n_keep: int, n_prev: int) -> torch.Tensor:
        """Points never observed have value +inf and rank first. Warns when active points
        were never observed (``strict``: raises, before anything changes). When the
        unobserved points outnumber the points to keep, they are ranked among themselves
        in a seeded random order (distinct finite values above every observed one) instead
        of by index, so that an unobserved, class-sorted dataset is not cut by class."""
        unobserved = self.bank.counts == 0  # [N] bool, on the bank's device
        in_set = torch.zeros_like(unobserved)
        in_set[torch.from_numpy(self._active).to(unobserved.device)] = True
        m_active = int((unobserved & in_set).sum())
        m_back = int((unobserved & ~in_set).sum())  # dropped earlier without an observation: +inf too
        if m_active == 0 and m_back == 0:
            return values
        # drop_last leaves the last points of each epoch's order (each rank's shard) out: that
        # many unobserved points are expected, and only logged
        cut = max(0, n_prev - self.world_size * self._planner.samples(n_prev))
        msg = (
            f"KCD condensation before epoch {epoch}: {m_active} of the {n_prev} active points were never observed"
            + (f", and {m_back} points dropped earlier were never observed either" if m_back else "")
            + " (value +inf: they rank first); call loader.observe(indices, logits) for every batch"
        )
        if m_active <= cut and not m_back:
            log.info("%s (drop_last leaves up to %d points of an epoch out)", msg, cut)
        elif self.config.strict:
            raise ValueError(msg + " (strict=True refuses to condense on them)")
        else:
            warnings.warn(msg, stacklevel=4)  # one event, one warning: the logger is for progress only
        idx = unobserved.nonzero().flatten()
        if idx.numel() <= n_keep:
            return values
        rank = np.random.default_rng([self.seed, epoch, UNOBSERVED_STREAM]).permutation(idx.numel())
        # the largest finite float64s, one ulp apart: above any observed value, in the drawn order
        top = np.int64(0x7FEFFFFFFFFFFFFF) - rank.astype(np.int64)
        values = values.clone()
        values[idx] = torch.from_numpy(top.view(np.float64)).to(values.device)
        return values

    def _condense(self, epoch: int) -> None:
        """The condensation before ``epoch``: values -> keep / dropped -> VAKS -> new set."""
        if self._infobatch is not None:
            self._infobatch_draw(epoch)
            return
        n_keep, n_prev = self._sizes[epoch], int(self._active.shape[0])
        if self._dist.communicates:  # the only per-stage communication: N * 12 bytes
            D.handshake(self._dist, "condense", epoch, f"the condensation before epoch {epoch}")
            self.bank.all_reduce_(self._dist.group)
        values = self.bank.values(draw=epoch)
        if self.config.value is not Measure.RANDOM:
            values = self._rank_unobserved(values, epoch, n_keep, n_prev)
        cond = condense(
            values,
            n_keep,
            n_prev,
            self.config.vaks,
            self.config.eps_m,
            seed=stream_seed(self.seed, epoch, VAKS_STREAM),
            pairing=self._pairing,
            labels=self._labels,
        )
        pairs = cond.pairs
        if self._dist.communicates:  # every rank must summarise identically: check before blending
            h = hashlib.blake2b(repr(epoch).encode(), digest_size=16)
            for t in (cond.keep, cond.dst, cond.src, cond.eps):
                h.update(t.cpu().contiguous().numpy().tobytes())
            D.agree(h.digest(), self._dist.group, f"condensation before epoch {epoch}", self.bank.device)
        if pairs and self.config.vaks is not Vaks.OFF:
            summary = {"epoch": epoch, "dst": cond.dst.cpu(), "src": cond.src.cpu(), "eps": cond.eps.cpu()}
            self._backend.apply_summary(summary)
            self._summaries.append(summary)
            self._digest = None  # computed when a state_dict asks for it
        self._active = cond.keep.cpu().numpy().astype(np.int64, copy=False)
        passes = sum(self._sizes[:epoch])
        record = {
            "epoch": epoch,
            "stage": self.schedule.stage_of(epoch),
            "kept": n_keep,
            "dropped": n_prev - n_keep,
            "pairs": pairs,
            "passes": passes,
            "cost": passes / (self.n * epoch),
        }
        self.history.append(record)
        log.info(
            "KCD condensation before epoch %d: kept %d of %d points, dropped %d, summarised %d pairs; C so far %.4f",
            epoch,
            n_keep,
            n_prev,
            n_prev - n_keep,
            pairs,
            record["cost"],
        )

    def _infobatch_draw(self, epoch: int) -> None:
        """InfoBatchSchedule: the epoch boundary before ``epoch``: this epoch's losses are merged
        into the scores (under DDP the only communication: one all-reduce of ``N * 16`` bytes),
        then ``epoch``'s points are drawn (:mod:`kcd_fast.policies`)."""
        ib = self._infobatch
        ib.merge(self._dist.group, self._dist.communicates)
        n_prev = int(self._active.shape[0])
        self._active = ib.select(epoch, self.seed)
        self._sizes[epoch] = int(self._active.shape[0])
        passes = sum(self._sizes[:epoch])
        self.history.append(
            {
                "epoch": epoch,
                "stage": epoch + 1,
                "kept": int(self._active.shape[0]),
                "dropped": self.n - int(self._active.shape[0]),
                "upweighted": int(ib.upweighted.shape[0]),
                "previous": n_prev,
                "pairs": 0,
                "passes": passes,
                "cost": passes / (self.n * epoch),
            }
        )

    # -- scoring -------------------------------------------------------------------------
    def observe(self, indices: Any, logits: Any, teacher_logits: Any = None, *, mask: Any = None) -> None:
        """Scores one training batch (``ValueBank.observe``; no host sync on CUDA).

        Args:
            indices: ``[B]`` int64, the ``indices`` the loader yielded (any device).
            logits: ``[B, C]`` student logits (float32/float16/bfloat16), any grad state;
                ``[B, L, V]`` token logits when ``mask`` is given.
            teacher_logits: ``[B, C]`` teacher logits, needed for ``value="kl"``.
            mask: ``[B, L]`` bool or 0/1 (an HF ``attention_mask``): a sequence's score is
                the mean entropy of its unmasked tokens, counted once per sequence.

        Every row counts (see the module docstring); bad input raises before anything
        changes (on CUDA without ``strict``: at the next condensation).
        """
        if self._infobatch is not None:
            raise TypeError(
                "an InfoBatchSchedule scores points by their per-sample loss: call "
                "loader.observe_scores(indices, losses) (losses [B], e.g. F.cross_entropy(..., reduction='none')), "
                "not observe(indices, logits)"
            )
        late = self._check_late()
        self.bank.observe(indices, logits, teacher_logits, mask=mask)
        self._observed(indices, late)

    def observe_scores(self, indices: Any, scores: Any) -> None:
        """Records a score per sample that you computed (``ValueBank.observe_scores``):
        ``indices`` ``[B]`` as yielded, ``scores`` ``[B]`` real numbers, higher = more
        valuable (a per-image detection loss, any measure). Same rules as :meth:`observe`.

        With an :class:`kcd_fast.InfoBatchSchedule`: ``scores`` are the per-sample losses
        (unweighted, any grad state); each point keeps its latest one (InfoBatch's score)."""
        if self._infobatch is not None:
            idx, loss = self._infobatch.check(indices, scores)
            late = self._check_late()
            self._infobatch.observe(idx, loss)
            self._observed(indices, late)
            return
        late = self._check_late()
        self.bank.observe_scores(indices, scores)
        self._observed(indices, late)

    def _check_late(self) -> bool:
        """Whether an observe now is late: it arrives after the condensation that ended its
        epoch ran (no batch of the new epoch was yielded yet). ``strict=True`` raises
        ``ValueError`` (before anything changes)."""
        late = self._cursor.is_late()
        if late and self.config.strict:
            raise ValueError(self._late_message())
        return late

    def _late_message(self) -> str:
        e = self.epoch
        return (
            f"KCDLoader.observe: an observation arrived after the condensation before epoch {e} ran, before any "
            f"batch of epoch {e} was yielded: it belongs to epoch {e - 1}, whose points were ranked without it "
            f"(it still counts toward the next condensation). Observe each batch before asking the loader for the "
            f"next epoch: iter(), len() and set_epoch() end an epoch whose last batch was yielded"
        )

    def _observed(self, indices: Any, late: bool) -> None:
        if late:
            if not self._cursor.late_warned:  # once per epoch
                self._cursor.late_warned = True
                warnings.warn(self._late_message(), stacklevel=3)  # one event, one warning (no logger copy)
            return
        self._cursor.observed(indices)

    def weights(self, indices: Any) -> torch.Tensor:
        """``[B]`` float32: the loss weight of each point of ``indices`` (``[B]``, as yielded) in the
        current epoch, on the device of ``indices``: ``1 / keep_ratio`` for the well-learned
        points an :class:`kcd_fast.InfoBatchSchedule` kept in a pruned epoch, 1 otherwise (always
        1 for a ``CondensationSchedule``). Use ``(losses * loader.weights(indices)).mean()``."""
        idx_t = torch.as_tensor(indices)
        if idx_t.dim() != 1 or idx_t.is_floating_point() or idx_t.dtype == torch.bool:
            raise ValueError(f"indices must be a [B] integer tensor, got {idx_t.dtype} {tuple(idx_t.shape)}")
        idx = idx_t.detach().to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            bad = int(idx[(idx < 0) | (idx >= self.n)][0])
            raise ValueError(f"indices must be in [0, {self.n}), got {bad}")
        if self._infobatch is None:
            return torch.ones(idx.shape[0], dtype=torch.float32, device=idx_t.device)
        return torch.from_numpy(self._infobatch.weight[idx]).to(idx_t.device)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during training, as Python values and CPU tensors
        (``torch.save`` / ``torch.load(weights_only=True)`` friendly; the schema is
        :mod:`kcd_fast.loader.state`). Under DDP a collective (call it on every rank): the
        state is GLOBAL, the same on every rank (the value bank's totals include every
        rank's observations so far), and resumes at any world size; taking it changes
        nothing. ``save(path)`` writes it atomically.

        It records the epoch's position: the batches trained (observed; named by their
        indices, :mod:`kcd_fast.loader.progress`), so the batches a fetcher read ahead
        (Lightning's, DataLoader workers behind a ``KCDBatchSampler``) and a peek are not
        progress. A loader that loads it yields exactly the remaining batches of that epoch
        (see "State and resume"). Taken after the last batch of an epoch was trained, it
        records all of the epoch's batches: the condensation due before the next epoch has
        not run, and runs in the loader that loads it (at its next ``iter()`` or
        ``set_epoch``). Taking a state never condenses.

        Called by ``torch.distributed.checkpoint`` (``dcp.save({"loader": loader})``), it
        returns the same state as one opaque entry that DCP can restore into a fresh loader
        (:mod:`kcd_fast.loader.dcp`)."""
        via = DCP.caller(sys._getframe(1))
        if via == "load":  # DCP's template: replaced by the saved entry, then load_state_dict
            return DCP.placeholder()
        if via == "save":
            return DCP.pack(self._state_dict())
        return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        # the batches trained: those observed (a fetcher's read-ahead is yielded again; a peek
        # is not progress; after a load, the loaded position until more is trained); all of
        # them once the epoch's last batch was observed: its condensation has not run yet
        return self._state_at(self._cursor.trained)

    def _state_at(self, position: int) -> dict[str, Any]:
        """The state as of ``position`` batches into the current epoch (0: its start)."""
        if not 0 < position <= self._batches_in(self.epoch):
            position = 0
        D.handshake(
            self._dist,
            "state_dict",
            self.epoch,
            f"state_dict() at epoch {self.epoch}",
            position=(self.epoch, self._cursor.yielded),
        )
        return {
            "format": S.STATE_FORMAT,
            "n": self.n,
            "schedule": self.schedule.state(),
            "config": self.config.state(),
            "seed": self.seed,
            "epoch": self.epoch,
            "position": position,
            "world_size": self.world_size,
            O.ORDER_KEY: {**self._order, "seed": self.seed},
            "active": torch.from_numpy(self._active.copy()),
            "bank": {
                k: v.clone() if isinstance(v, torch.Tensor) else v  # ValueBank's CPU state aliases
                for k, v in self.bank.state_dict(self._dist.group).items()
            },
            "history": [dict(r) for r in self.history],
            "summaries": [S.copy_summary(s) for s in self._summaries],
            "digest": self._images_digest(),
            **self._policy_state(),
        }

    def _policy_state(self) -> dict[str, Any]:
        """The state keys of the policies of issue 30 (absent: KCD with the paper's pairing)."""
        out: dict[str, Any] = {}
        if self._pairing is not Pairing.PAPER:
            out["vaks_pairing"] = self._pairing.value
        if self._infobatch is not None:
            out["infobatch"] = self._infobatch.state(self._dist.group, self._dist.communicates)
        return out

    def _images_digest(self) -> str | None:
        """Digest of the rows the summaries touched (cached until the next summary)."""
        if self._digest is None and self._summaries:
            self._digest = self._backend.images_digest(self._summaries)
        return self._digest

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict``. This loader's dataset must hold the ORIGINAL images
        (or exactly the images this loader summarised so far, when the state continues
        its own run): the summary log is replayed and checked against the state's digest.
        Everything is validated first; on any error nothing changes. Also takes the entry
        ``state_dict()`` hands to ``torch.distributed.checkpoint``."""
        state = DCP.unpack(state)
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from KCDLoader.state_dict(), got {type(state).__name__}")
        missing = [k for k in S.REQUIRED if k not in state]
        if missing:
            raise KeyError(f"KCDLoader state is missing {missing}")
        for key, typ in (("config", dict), ("bank", dict), ("history", list)):
            if not isinstance(state[key], typ):
                raise ValueError(f"state {key} must be a {typ.__name__}, got {type(state[key]).__name__}")
        if state["format"] != S.STATE_FORMAT:
            raise ValueError(f"state format is {state['format']!r}, this loader reads {S.STATE_FORMAT!r}")
        if state["n"] != self.n:
            raise ValueError(f"the state was made for a dataset of {state['n']} points, this loader's has {self.n}")
        if state["schedule"] != self.schedule.state():
            raise ValueError(
                f"the state was made for schedule {state['schedule']}, this loader's is {self.schedule.state()}"
            )
        self.config.check_state(state["config"])
        epoch = state["epoch"]
        if not is_int(epoch) or not 0 <= epoch <= self.schedule.epochs:
            raise ValueError(f"state epoch must be an int in [0, {self.schedule.epochs}], got {epoch!r}")
        seed = state["seed"]
        if not is_int(seed) or seed < 0:
            raise ValueError(f"state seed must be an int >= 0, got {seed!r}")
        pairing = state.get("vaks_pairing", Pairing.PAPER.value)
        if pairing != self._pairing.value:
            raise ValueError(f"the state has vaks_pairing = {pairing!r}, this loader has {self._pairing.value!r}")
        infobatch = None
        if self._infobatch is not None:
            if "infobatch" not in state:
                raise KeyError("KCDLoader state is missing ['infobatch'] (an InfoBatchSchedule's scores)")
            infobatch = self._infobatch.check_state(state["infobatch"], epoch)
            want = infobatch["sizes"][min(epoch, self.schedule.epochs - 1)]
        else:
            want = self._sizes[min(epoch, self.schedule.epochs - 1)]
        sizes = list(self._sizes)
        if infobatch is not None:
            sizes[: len(infobatch["sizes"])] = infobatch["sizes"]
            sizes[len(infobatch["sizes"]) :] = [self.n] * (self.schedule.epochs - len(infobatch["sizes"]))
        n_batches = self._planner.num_batches(sizes[epoch]) if epoch < self.schedule.epochs else 0
        saved_order, position = state.get(O.ORDER_KEY), state.get("position", 0)
        if is_int(position) and 0 < position == self._batches_under(epoch, saved_order, sizes):
            # every batch of the epoch was trained (its condensation not run yet): between epochs, where
            # the options that decide batches may change; complete here too, at this loader's batches
            state = {**state, "position": n_batches, "world_size": self.world_size}
            position = 0
        O.check_order(saved_order, self._order, position, epoch)  # before the position
        act = S.check_active(state["active"], self.n, want, epoch)
        position = S.check_position(state, n_batches, self.world_size, self._batches_on(epoch, sizes))
        bank = state["bank"]
        S.check_bank_state(
            bank,
            {"n": self.n, "measure": self.config.value.value, "period": self.bank.period, "alpha": self.bank.alpha},
        )
        if not all(isinstance(r, dict) for r in state["history"]):
            raise ValueError("state history must be a list of dicts (one record per condensation)")
        summaries = S.check_summaries(state["summaries"], self.n)
        commit_images = self._backend.prepare_restore(self._summaries, summaries, state["digest"])

        # -- commit (nothing below raises on validated input) ------------------------------
        self.bank.load_state_dict(bank)
        if infobatch is not None:
            self._infobatch.load(infobatch, self._dist.rank)
        self._sizes = sizes
        self._generation += 1
        self.bank.seed = seed  # ValueBank.load_state_dict keeps its own seed; the state's is the run's
        commit_images()
        self._summaries = summaries
        self._digest = state["digest"]
        self.seed = seed
        self._planner = dataclasses.replace(self._planner, seed=seed)
        self.epoch = epoch
        self._cursor.reset(epoch, position, loaded=True)
        self._active = act
        self.history = [dict(r) for r in state["history"]]
        self._ranks_agree = False  # under DDP, the next iteration checks that every rank loaded the same

    def close(self) -> None:
        """Releases the back end's workers; the loader can iterate again afterwards."""
        self._generation += 1
        self._backend.close()

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes ``state_dict()`` to ``path`` atomically: a temporary file in the same
        directory, flushed and fsynced, renamed over ``path``, the directory fsynced
        (:func:`kcd_fast.checkpoint.save_checkpoint`). A crash or error at any point
        leaves the previous file at ``path`` intact and loadable.

        Under DDP a collective: call it on every rank. Every rank takes the (global)
        state, rank 0 writes it, and the call returns on every rank once the file is in
        place; a failed write raises on rank 0 (its error) and ``RuntimeError`` on the
        others, instead of leaving them waiting. Save between epochs (see "State and
        resume"); resume with :meth:`load` or :meth:`restore`, at any world size."""
        check_path(path, "path")
        D.handshake(
            self._dist, "save", self.epoch, f"save() at epoch {self.epoch}", position=(self.epoch, self._cursor.yielded)
        )
        payload = {"format": CHECKPOINT_FORMAT, "world_size": self.world_size, "loader": self.state_dict()}
        error: Exception | None = None
        if self._dist.rank == 0:
            try:
                save_checkpoint(payload, path)
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
        check_path(path, "path")
        payload = load_checkpoint(path)
        if not (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT and "loader" in payload):
            got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} is not a KCDLoader checkpoint "
                f"(format {got!r}, expected {CHECKPOINT_FORMAT!r})"
            )
        try:
            self.load_state_dict(payload["loader"])
        except (KeyError, TypeError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ValueError(f"checkpoint {os.fspath(path)!r} does not fit this loader: {msg}") from err

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], dataset: Any, schedule: CondensationSchedule, **kwargs: Any
    ) -> KCDLoader:
        """``KCDLoader(dataset, schedule, **kwargs)`` restored from the checkpoint at ``path``
        (:meth:`restore`), at this process's world size, whatever the saving run's was.
        ``dataset`` must hold the ORIGINAL images: the summaries are replayed onto them."""
        loader = cls(dataset, schedule, **kwargs)
        loader.restore(path)
        return loader

    def __repr__(self) -> str:
        return (
            f"KCDLoader(n={self.n}, epoch={self.epoch}/{self.schedule.epochs}, "
            f"active={self._active.shape[0]}, batch_size={self.config.batch_size}, "
            f"backend={self._backend.name!r}, value={self.config.value.value!r}, "
            f"vaks={self.config.vaks.value!r})"
        )
