"""KCD in torchdistill (1.1.x), from its YAML configuration: importing this module registers,
in torchdistill's own registries, everything a YAML names to run KCD.

===========================  ========================  ==========================================
YAML entry                   key                        what it is
===========================  ========================  ==========================================
``train_data_loader:``       ``kcd_dataset_wrapper``    :class:`KCDIndexWrapper`: each sample's
``dataset_wrapper: key:``                               ``supp_dict`` carries its index
                                                        (``supp_dict["kcd_index"]``)
``train_data_loader:``       ``kcd_batch_sampler``      :class:`TorchdistillKCDBatchSampler`, built
``batch_sampler: key:``                                 from the sampler torchdistill hands it
                                                        (kwargs: ``batch_size``, ``schedule`` and
                                                        any KCDLoader option)
``student: forward_proc:``   ``kcd_forward``            :func:`kcd_forward`: ``model(sample_batch)``
(``teacher:`` for ``kl``)                               that also records the logits with the
                                                        batch's indices
``post_forward_process:``    ``kcd_post_forward``       :func:`kcd_post_forward`: torchdistill's
                                                        default step (backward, optimizer, LR),
                                                        then ``observe`` of the recorded logits
===========================  ========================  ==========================================

The user's change: these YAML lines plus ``import kcd_fast.integrations.torchdistill`` before
the distillation box is built (see docs/integrations.md and examples/torchdistill_kd.yaml)::

    train:
      num_epochs: 6                       # = the schedule's epochs
      train_data_loader:
        dataset_id: digits/train
        dataset_wrapper: {key: kcd_dataset_wrapper}
        sampler: {class_or_func: !import_get {key: torch.utils.data.RandomSampler}, kwargs: {}}
        batch_sampler:
          key: kcd_batch_sampler
          kwargs: {batch_size: 64, schedule: {epochs: 6, period: 2, rho: 0.7}, seed: 0}
        kwargs: {num_workers: 2}
      student: {forward_proc: kcd_forward, ...}
      post_forward_process: kcd_post_forward

How it meets torchdistill's loop:

- the batch sampler reads ``shuffle`` (and a ``DistributedSampler``'s ``seed``) from the sampler
  torchdistill builds (``RandomSampler``: shuffled, ``SequentialSampler``: in order, under DDP a
  ``DistributedSampler``) and unwraps the dataset wrappers to reach the dataset whose images VAKS
  summarises. Under DDP it shards each epoch itself (:class:`kcd_fast.KCDBatchSampler` rules);
  ``batch_sampler.sampler`` is a :class:`KCDEpochSampler` (a ``DistributedSampler`` under DDP),
  whose ``set_epoch`` (what torchdistill's pre-epoch step calls) is the loader's;
- the epochs advance by themselves: an epoch ends once its last batch was observed (the
  condensation due then happens); ``num_epochs`` must equal the schedule's ``epochs``;
- :func:`kcd_post_forward` observes the student's logits of the step (recorded by
  :func:`kcd_forward`; with ``value: kl`` the teacher's too, when the teacher's forward_proc is
  ``kcd_forward`` as well), so no user code reads logits;
- resume: :func:`save_kcd_state` next to torchdistill's ``save_ckpt`` (every rank: a collective
  under DDP; rank 0 writes ``<ckpt>.kcd``) and :func:`load_kcd_state` next to its ``load_ckpt``
  (returns the epoch to continue from).

Not supported: torchdistill's ``accelerator`` path (accelerate would re-wrap the DataLoader's
batch sampler: :func:`kcd_batch_sampler` raises ``TypeError``) and a multi-stage box whose stages
build new train loaders (each would start a new KCD schedule).

torchdistill 1.1.5 does not import beside torchvision 0.29 unless ``torchvision.datasets`` is
imported first (``KeyError: 'torchvision.datasets'``); this module imports it first.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

try:
    import torchvision.datasets  # noqa: F401  (first: torchdistill's registry reads it from sys.modules)
except ImportError:  # torchdistill needs torchvision; its own import below says so
    pass

try:
    from torchdistill.core.interfaces.post_forward_proc import default_post_forward_process
    from torchdistill.core.interfaces.registry import register_forward_proc_func, register_post_forward_proc_func
    from torchdistill.datasets.registry import register_batch_sampler, register_dataset_wrapper
    from torchdistill.datasets.wrapper import BaseDatasetWrapper
except ImportError as err:  # a ModuleNotFoundError naming torchdistill when it is missing
    raise ModuleNotFoundError(
        "kcd_fast.integrations.torchdistill needs torchdistill: pip install torchdistill (in the kcd_fast "
        'checkout: pip install -e ".[torchdistill]")',
        name=err.name if isinstance(err, ModuleNotFoundError) else None,
    ) from err

from ..loader import KCDBatchSampler
from ..schedule import CondensationSchedule
from .outputs import logits_of

__all__ = [
    "BATCH_SAMPLER_KEY",
    "DATASET_WRAPPER_KEY",
    "FORWARD_KEY",
    "INDEX_KEY",
    "POST_FORWARD_KEY",
    "KCDDistributedEpochSampler",
    "KCDEpochSampler",
    "KCDIndexWrapper",
    "TorchdistillKCDBatchSampler",
    "kcd_batch_sampler",
    "kcd_checkpoint_path",
    "kcd_forward",
    "kcd_post_forward",
    "load_kcd_state",
    "save_kcd_state",
]

BATCH_SAMPLER_KEY = "kcd_batch_sampler"
DATASET_WRAPPER_KEY = "kcd_dataset_wrapper"
FORWARD_KEY = "kcd_forward"
POST_FORWARD_KEY = "kcd_post_forward"
INDEX_KEY = "kcd_index"  # the supp_dict entry that carries a sample's dataset index


# -- the dataset wrapper -------------------------------------------------------------------
@register_dataset_wrapper(key=DATASET_WRAPPER_KEY)
class KCDIndexWrapper(BaseDatasetWrapper):
    """torchdistill's ``(sample, target, supp_dict)`` with ``supp_dict["kcd_index"] = index``
    (the DataLoader collates it into the batch's ``[B]`` int64 indices)."""

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        sample, target, supp_dict = super().__getitem__(index)
        supp_dict[INDEX_KEY] = index
        return sample, target, supp_dict


def _unwrap(dataset: Any) -> Any:
    """The dataset under torchdistill's wrappers (the one whose images VAKS summarises)."""
    while isinstance(dataset, BaseDatasetWrapper):
        dataset = dataset.org_dataset
    return dataset


# -- the batch sampler ---------------------------------------------------------------------
class KCDEpochSampler(Sampler[int]):
    """``batch_sampler.sampler``: what torchdistill's epoch steps see. ``set_epoch`` is the KCD
    batch sampler's; iterating gives this rank's points of the current epoch in visiting order
    (``loader.rank_indices``). ``original`` is the sampler torchdistill built."""

    def __init__(self, owner: TorchdistillKCDBatchSampler, original: Sampler):
        self._owner = weakref.ref(owner)
        self.original = original
        self.epoch = owner.epoch

    def _sampler(self) -> TorchdistillKCDBatchSampler:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("the KCD batch sampler this epoch sampler belongs to no longer exists")
        return owner

    def set_epoch(self, epoch: int) -> None:
        self._sampler().set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        return iter(self._sampler().loader.rank_indices.tolist())

    def __len__(self) -> int:
        return int(self._sampler().loader.rank_indices.shape[0])


class KCDDistributedEpochSampler(KCDEpochSampler, DistributedSampler):
    """:class:`KCDEpochSampler` under DDP: a ``DistributedSampler`` (torchdistill's pre-epoch
    step calls ``set_epoch`` only on one), with the original's ``num_replicas``, ``rank``,
    ``shuffle``, ``seed`` and ``drop_last`` for code that reads them."""

    def __init__(self, owner: TorchdistillKCDBatchSampler, original: DistributedSampler):
        KCDEpochSampler.__init__(self, owner, original)  # not DistributedSampler's: the loader shards
        self.dataset = original.dataset
        self.num_replicas, self.rank = original.num_replicas, original.rank
        self.shuffle, self.seed, self.drop_last = original.shuffle, original.seed, original.drop_last


def _schedule(value: Any) -> Any:
    """A mapping (YAML) becomes ``CondensationSchedule(**value)``; anything else is passed on."""
    if isinstance(value, Mapping):
        try:
            return CondensationSchedule(**value)
        except TypeError as err:
            raise TypeError(f"schedule {dict(value)!r} is not CondensationSchedule arguments: {err}") from err
    return value


class TorchdistillKCDBatchSampler(KCDBatchSampler):
    """:class:`kcd_fast.KCDBatchSampler` built as torchdistill builds batch samplers:
    ``TorchdistillKCDBatchSampler(sampler, **kwargs)`` (registered as ``kcd_batch_sampler``).

    Args:
        sampler: the sampler torchdistill built over the (wrapped) dataset: ``RandomSampler``
            (shuffled; without replacement and ``num_samples``), ``SequentialSampler`` (in
            order) or, under DDP, ``DistributedSampler`` (its ``shuffle`` and ``seed``; the
            loader shards by its own rules over the same ranks).
        batch_size: points per batch.
        schedule: a :class:`kcd_fast.CondensationSchedule` (``!import_call`` in YAML) or a mapping
            of its arguments (``{epochs: 6, period: 2, rho: 0.7}``).
        drop_last: as for ``KCDBatchSampler``.
        seed: the KCD seed; default: a ``DistributedSampler``'s ``seed``, else 0.
        **kcd_options: further ``KCDBatchSampler`` options (``value``, ``vaks``, ``alpha``, ...).
    """

    def __init__(
        self,
        sampler: Sampler,
        batch_size: int,
        schedule: Any,
        *,
        drop_last: bool = False,
        seed: int | None = None,
        **kcd_options: Any,
    ):
        if isinstance(sampler, DistributedSampler):
            dataset, shuffle, default_seed = sampler.dataset, sampler.shuffle, sampler.seed
            kcd_options.setdefault("distributed", True)
            kcd_options.setdefault("rank", sampler.rank)
            kcd_options.setdefault("world_size", sampler.num_replicas)
        elif isinstance(sampler, RandomSampler):
            if sampler.replacement or sampler._num_samples is not None:
                raise ValueError(
                    f"sampler RandomSampler(replacement={sampler.replacement}, num_samples={sampler._num_samples}) "
                    "draws another number of points than the dataset's: KCD epochs visit each active point once; "
                    "use a RandomSampler without replacement and num_samples"
                )
            dataset, shuffle, default_seed = sampler.data_source, True, 0
        elif isinstance(sampler, SequentialSampler):
            dataset, shuffle, default_seed = sampler.data_source, False, 0
        else:
            raise TypeError(
                "kcd_batch_sampler takes the RandomSampler, SequentialSampler or DistributedSampler torchdistill "
                f"builds (the YAML's sampler: class_or_func), got {type(sampler).__name__}"
            )
        super().__init__(
            _unwrap(dataset),
            _schedule(schedule),
            batch_size,
            shuffle,
            drop_last=drop_last,
            seed=default_seed if seed is None else seed,
            **kcd_options,
        )
        epoch_sampler = KCDDistributedEpochSampler if isinstance(sampler, DistributedSampler) else KCDEpochSampler
        self.sampler: KCDEpochSampler = epoch_sampler(self, sampler)


register_batch_sampler(TorchdistillKCDBatchSampler, key=BATCH_SAMPLER_KEY)


def kcd_batch_sampler(box: Any) -> TorchdistillKCDBatchSampler:
    """The KCD batch sampler of a torchdistill ``DistillationBox`` / ``TrainingBox``."""
    loader = getattr(box, "train_data_loader", None)
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, KCDBatchSampler):
        raise TypeError(
            f"the box's train_data_loader has batch_sampler {type(sampler).__name__}, not KCD's: the YAML's "
            f"train_data_loader needs batch_sampler: {{key: {BATCH_SAMPLER_KEY}, kwargs: ...}} (and torchdistill's "
            "accelerator path, which re-wraps the DataLoader, is not supported)"
        )
    return sampler


# -- the observe step ----------------------------------------------------------------------
_RECORDED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, torch.Tensor]] = weakref.WeakKeyDictionary()


@register_forward_proc_func(key=FORWARD_KEY)
def kcd_forward(model: Any, sample_batch: Any, targets: Any = None, supp_dict: Any = None, **kwargs: Any) -> Any:
    """torchdistill's ``forward_batch_only`` (``model(sample_batch)``) that also records the
    output's logits (detached) with the batch's ``supp_dict["kcd_index"]`` for
    :func:`kcd_post_forward`."""
    output = model(sample_batch)
    indices = supp_dict.get(INDEX_KEY) if isinstance(supp_dict, Mapping) else None
    if indices is None:
        raise KeyError(
            f"the batch's supp_dict has no {INDEX_KEY!r}: the YAML's train_data_loader needs "
            f"dataset_wrapper: {{key: {DATASET_WRAPPER_KEY}}}"
        )
    logits = logits_of(output)
    if logits is None:
        raise TypeError(f"kcd_forward found no logits in the model's output ({type(output).__name__})")
    _RECORDED[model] = (indices, logits.detach())
    return output


@register_post_forward_proc_func(key=POST_FORWARD_KEY)
def kcd_post_forward(self: Any, loss: torch.Tensor, metrics: Any = None, **kwargs: Any) -> None:
    """torchdistill's ``default_post_forward_process`` (backward, optimizer and LR steps),
    then ``observe`` of the logits :func:`kcd_forward` recorded in this step (``self``: the
    distillation or training box). A misconfiguration raises before the step."""
    sampler = kcd_batch_sampler(self)
    student = getattr(self, "student_model", None)
    if student is None:
        student = self.model  # a TrainingBox
    teacher = getattr(self, "teacher_model", None)
    if student not in _RECORDED:
        raise RuntimeError(
            f"kcd_post_forward found no logits of this step: the YAML's student (or model) needs forward_proc: "
            f"{FORWARD_KEY}"
        )
    kl = sampler.loader.config.value.value == "kl"
    if kl and (teacher is None or teacher not in _RECORDED):
        raise RuntimeError(f"value: kl needs the teacher's logits: set the teacher's forward_proc: {FORWARD_KEY}")
    indices, logits = _RECORDED.pop(student)
    t_recorded = _RECORDED.pop(teacher, None) if teacher is not None else None
    default_post_forward_process(self, loss, metrics=metrics, **kwargs)
    sampler.observe(indices, logits, t_recorded[1] if kl and t_recorded is not None else None)


# -- resume next to torchdistill's checkpoints ----------------------------------------------
def kcd_checkpoint_path(ckpt_file_path: str | os.PathLike[str]) -> str:
    """Where the loader's state lives beside torchdistill's checkpoint: ``<ckpt>.kcd``."""
    return os.fspath(ckpt_file_path) + ".kcd"


def save_kcd_state(box: Any, ckpt_file_path: str | os.PathLike[str]) -> str:
    """Saves the KCD loader's state beside torchdistill's ``save_ckpt(..., ckpt_file_path)``
    (atomically, ``KCDLoader.save``). Under DDP a collective: call it on EVERY rank (rank 0
    writes), not only where torchdistill's ``save_on_master`` writes. Returns the path."""
    path = kcd_checkpoint_path(ckpt_file_path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kcd_batch_sampler(box).save(path)
    return path


def load_kcd_state(box: Any, ckpt_file_path: str | os.PathLike[str]) -> int:
    """Restores the state :func:`save_kcd_state` wrote beside ``ckpt_file_path`` (call it on
    every rank, with torchdistill's ``load_ckpt``, before the epoch loop) and returns the
    epoch to continue from (``for epoch in range(load_kcd_state(box, ckpt), box.num_epochs)``).
    ``FileNotFoundError`` names the missing file."""
    path = kcd_checkpoint_path(ckpt_file_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no KCD loader state at {path!r} (written by save_kcd_state beside {ckpt_file_path!r})"
        )
    sampler = kcd_batch_sampler(box)
    sampler.restore(path)
    return sampler.epoch
