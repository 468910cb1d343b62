"""A knowledge-distillation trainer in which vanilla KD and KCD share one loop.

Both load through :class:`kcd_fast.KCDLoader`; the only difference is its schedule
(:func:`make_loader`): vanilla KD runs :func:`full_schedule` (every point every epoch,
nothing condensed, so the trainer scores nothing), KCD the schedule's shrinking sets,
scored with ``loader.observe``. The loader reports ``len()``, ``total_steps()`` and
``steps_per_epoch()``, so the LR schedule is sized right although KCD's epochs shrink.

Loss: ``gamma * CE + alpha_kd * T^2 * KL(softmax(t / T) || softmax(s / T)) [+ beta * feature
loss]``. SGD with momentum and weight decay; the LR follows a per-step schedule over
``loader.total_steps()``. The teacher runs in eval mode under ``no_grad``. On CUDA the
forward passes run under bf16 autocast and the models and inputs use ``channels_last``;
on the CPU both are off (``KDConfig.amp`` / ``channels_last`` override this).

Per epoch the trainer records the samples and steps trained, the wall-clock seconds (on
CUDA the device is synchronised at the epoch's start and end only) and KCD's own overhead:
``observe_s`` (scoring, the host time of ``loader.observe``) and ``epoch_end_s`` (the time
from the last batch to the end of the epoch's iterator: for KCDLoader this holds the value
computation, condensation and VAKS summary when one is due).

Usage (module)::

    from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader
    from kcd_fast.kd import KDConfig, KDTrainer, BatchPreprocess, make_eval_loader, full_schedule

    loader = KCDLoader(train_set, CondensationSchedule(240, 40, 0.7), batch_size=64, shuffle=True, seed=0)
    # vanilla KD: loader = KCDLoader(train_set, full_schedule(240), batch_size=64, shuffle=True, seed=0)
    trainer = KDTrainer(student, teacher, loader, KDConfig(), preprocess=BatchPreprocess.cifar(),
                        device="cuda", test_loader=make_eval_loader(test_set))
    result = trainer.fit()            # or trainer.train_epoch() per epoch
    print(result.accuracy, result.seconds)

Usage (command line): ``python -m kcd_fast.kd --help`` (:mod:`kcd_fast.kd.cli`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import unique
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .._checks import OptionEnum, is_finite_number, is_int
from ..data.arrays import ArrayDataset
from ..loader import KCDLoader
from ..schedule import CondensationSchedule

__all__ = [
    "BatchPreprocess",
    "EpochRecord",
    "KDConfig",
    "KDTrainer",
    "LRSchedule",
    "TrainResult",
    "evaluate",
    "full_schedule",
    "kd_loss",
    "keep_uint8",
    "LRIndex",
    "epoch_lr_factor",
    "lr_factor",
    "make_eval_loader",
    "train_data",
    "make_loader",
]


# -- configuration ------------------------------------------------------------------------
@unique
class LRSchedule(OptionEnum):
    """How the LR moves over the run (after ``warmup_steps`` of linear warm-up); the run's
    progress is counted in epochs or in steps (``KDConfig.lr_index``)."""

    COSINE = "cosine"  # 0.5 * (1 + cos(pi * progress))
    MULTISTEP = "multistep"  # times lr_decay at each fraction in milestones (CRD: 150/180/210 of 240)
    CONSTANT = "constant"

    @classmethod
    def option_name(cls) -> str:
        return "lr_schedule"


@unique
class LRIndex(OptionEnum):
    """What the LR schedule's progress counts."""

    EPOCH = "epoch"  # (epoch + step_in_epoch / steps_in_epoch) / epochs: the same LR for KD and KCD each epoch
    STEP = "step"  # optimizer steps / total_steps: KCD's shorter epochs then decay the LR sooner

    @classmethod
    def option_name(cls) -> str:
        return "lr_index"


@dataclass
class KDConfig:
    """Optimisation and loss settings of one KD run (both runs of a comparison share one).

    Defaults follow CRD/KCD's CIFAR recipe (SGD 0.05, momentum 0.9, wd 5e-4, T = 4,
    gamma 0.1 and alpha 0.9 for KD) with a cosine LR indexed by epoch progress
    (``lr_index="epoch"``: epoch e, step k of n is at ``(e + k / n) / epochs``), so vanilla KD
    and KCD train at the same LR in every epoch, as the authors' code does; the paper's
    multistep is ``lr_schedule="multistep"`` with milestones (0.625, 0.75, 0.875) = epochs
    150, 180, 210 of 240. ``lr_index="step"`` counts optimizer steps over the run's
    ``total_steps()`` instead (each run on its own length).
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    temperature: float = 4.0
    gamma: float = 0.1  # cross-entropy weight
    alpha_kd: float = 0.9  # KL weight
    beta: float = 0.0  # feature-loss weight (needs a feature_loss in KDTrainer)
    lr_schedule: str = "cosine"
    lr_index: str = "epoch"  # what the schedule's progress counts: "epoch" or "step"
    milestones: tuple[float, ...] = (0.625, 0.75, 0.875)  # fractions of the run (multistep)
    lr_decay: float = 0.1
    warmup_steps: int = 0
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "fp16", "off"
    channels_last: bool | None = None  # None: on CUDA only
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not is_finite_number(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("momentum", "weight_decay", "gamma", "alpha_kd", "beta", "lr_decay"):
            v = getattr(self, name)
            if not is_finite_number(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not self.momentum < 1:  # SGD's momentum at or above 1 diverges
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        LRSchedule.parse(self.lr_schedule)
        LRIndex.parse(self.lr_index)
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ValueError(f"milestones must be fractions of the run in (0, 1), got {self.milestones!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be one of 'auto', 'bf16', 'fp16', 'off', got {self.amp!r}")
        if self.grad_clip is not None and (not is_finite_number(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0, got {self.grad_clip!r}")


def lr_factor(step: int, total_steps: int, config: KDConfig) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based) of ``total_steps``
    (``lr_index="step"``)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return schedule_factor(progress, config)


def epoch_lr_factor(epoch: int, k: int, steps_in_epoch: int, epochs: int, step: int, config: KDConfig) -> float:
    """The LR multiplier at step ``k`` of ``steps_in_epoch`` in epoch ``epoch`` of ``epochs``
    (``lr_index="epoch"``; ``step``, the optimizer step, for the warm-up)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (epoch + k / max(1, steps_in_epoch)) / epochs)
    return schedule_factor(progress, config)


def schedule_factor(progress: float, config: KDConfig) -> float:
    """The schedule's multiplier at ``progress`` in [0, 1] of the run."""
    kind = LRSchedule.parse(config.lr_schedule)
    if kind is LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind is LRSchedule.MULTISTEP:
        return config.lr_decay ** sum(progress >= m for m in config.milestones)
    return 1.0


# -- loss ---------------------------------------------------------------------------------
def kd_loss(
    logits_s: torch.Tensor,  # [B, C]
    logits_t: torch.Tensor | None,  # [B, C]
    targets: torch.Tensor,  # [B] int64
    *,
    temperature: float = 4.0,
    gamma: float = 0.1,
    alpha_kd: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)``: ``loss = gamma * ce + alpha_kd * kl`` with
    ``kl = T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (Hinton et al.).
    Without a teacher (``logits_t=None``) ``kl`` is 0. Computed in float32."""
    s = logits_s.float()
    ce = F.cross_entropy(s, targets)
    if logits_t is None or alpha_kd == 0:
        kl = s.new_zeros(())
    else:
        t = logits_t.float()
        kl = (
            F.kl_div(
                F.log_softmax(s / temperature, dim=1),
                F.log_softmax(t / temperature, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
    return gamma * ce + alpha_kd * kl, ce, kl


def kd_loss_per_sample(
    logits_s: torch.Tensor,  # [B, C]
    logits_t: torch.Tensor | None,  # [B, C]
    targets: torch.Tensor,  # [B] int64
    *,
    temperature: float = 4.0,
    gamma: float = 0.1,
    alpha_kd: float = 0.9,
) -> torch.Tensor:
    """``[B]`` float32: :func:`kd_loss`'s loss of each sample (their mean is ``kd_loss``'s
    ``loss``): what an :class:`kcd_fast.InfoBatchSchedule` scores and weights."""
    s = logits_s.float()
    loss = gamma * F.cross_entropy(s, targets, reduction="none")
    if logits_t is not None and alpha_kd != 0:
        t = logits_t.float()
        kl = F.kl_div(
            F.log_softmax(s / temperature, dim=1),
            F.log_softmax(t / temperature, dim=1),
            reduction="none",
            log_target=True,
        ).sum(1)
        loss = loss + alpha_kd * kl * temperature**2
    return loss


# -- batch preprocessing (on the training device) -----------------------------------------------
def keep_uint8(image: torch.Tensor) -> torch.Tensor:
    """An :class:`kcd_fast.ArrayDataset` transform that keeps the uint8 ``[C, H, W]`` image
    (the collate step copies it), so normalisation and augmentation run batched on the
    training device in :class:`BatchPreprocess`."""
    return image


keep_uint8.deterministic = True  # draws no random numbers: the loader need not seed RNGs for it


class BatchPreprocess:
    """Turns a collated batch into the network's input on the training device:
    uint8 ``[B, C, H, W]`` (or float in ``[0, 1]``) -> float32 ``(x / 255 - mean) / std``, with
    optional batched augmentation for training: ``"crop"`` (pad by ``pad`` with zeros and
    crop back at a random offset per image), ``"crop_flip"`` (also a random horizontal flip),
    or ``"none"``. Random draws come from a ``torch.Generator`` per device seeded with
    ``seed``, never from the global RNG.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",
        pad: int = 4,
        seed: int = 0,
        channels_last: bool = False,
    ):
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std must be equal-length, non-empty sequences, got {mean!r} and {std!r}")
        if any(not is_finite_number(s) or s <= 0 for s in std):
            raise ValueError(f"std must hold finite numbers > 0, got {std!r}")
        if augment not in ("none", "crop", "crop_flip"):
            raise ValueError(f"augment must be one of 'none', 'crop', 'crop_flip', got {augment!r}")
        if not is_int(pad) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.augment, self.pad, self.seed = augment, pad, int(seed)
        self.channels_last = bool(channels_last)
        self._generators: dict[str, torch.Generator] = {}
        self._consts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def cifar(cls, channels: int = 3, augment: str = "crop_flip", seed: int = 0) -> BatchPreprocess:
        """Mean 0.5 / std 0.25 per channel (a generic normalisation for uint8 images)."""
        return cls([0.5] * channels, [0.25] * channels, augment=augment, seed=seed)

    def spec(self) -> dict[str, Any]:
        """A JSON-able description (part of the teacher cache key)."""
        return {
            "mean": self.mean,
            "std": self.std,
            "augment": self.augment,
            "pad": self.pad,
            "seed": self.seed,
        }

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` uint8 or float on the target device -> float32 ``[B, C, H, W]``."""
        if x.dim() != 4:
            raise ValueError(f"a batch of images must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"batch has {x.shape[1]} channels but mean/std have {len(self.mean)}")
        key = str(x.device)
        if key not in self._consts:
            m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            self._consts[key] = (m, s)
        mean, std = self._consts[key]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = (x - mean) / std
        if train and self.augment != "none" and x.shape[0] > 0:
            x = self._augment(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g, dev = self._generator(x.device), x.device
        if self.pad:
            p = self.pad
            padded = F.pad(x, (p, p, p, p))  # pads with the mean colour (0 after normalisation)
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g, device=dev)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g, device=dev)
            rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [B, H, 1]
            cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [B, 1, W]
            bi = torch.arange(b, device=dev)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
        if self.augment == "crop_flip":
            flip = torch.rand(b, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous()


# -- loaders --------------------------------------------------------------------------------
def make_loader(
    kind: str,
    dataset: Any,
    *,
    epochs: int,
    period: int = 1,
    rho: float = 0.7,
    decay: str = "exp",
    warmup: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    backend: str = "torch",
    value: str = "entropy",
    vaks: str = "low",
    device: Any = None,
    drop_last: bool = False,
    policy: str = "kcd",
    **backend_options: Any,
) -> KCDLoader:
    """The loader of one run: a :class:`kcd_fast.KCDLoader` either way, so that vanilla KD
    and KCD load through the same code and differ only in what KCD does differently.

    ``kind="kcd"``: ``CondensationSchedule(epochs, period, rho, decay, warmup)``.
    ``kind="kd"`` (vanilla): :func:`full_schedule` (every point every epoch, no
    condensation; the trainer then scores nothing) and ``vaks="off"``.
    Both shuffle epoch ``e`` with ``default_rng([seed, e])``: the two runs see the same
    batches until the first condensation.

    ``policy`` (``kind="kcd"`` only): "kcd" (the above), "random" (the random-subset
    baseline: the same schedule's per-epoch counts, ``value="random"``, ``vaks="off"``) or
    "infobatch" (:class:`kcd_fast.InfoBatchSchedule` ``(epochs)`` with its defaults, prune
    0.5 and delta 0.875; ``vaks="off"``; the trainer scores and weights per-sample losses).
    """
    if kind not in ("kd", "kcd"):
        raise ValueError(f"kind must be 'kd' or 'kcd', got {kind!r}")
    if policy not in ("kcd", "random", "infobatch"):
        raise ValueError(f"policy must be 'kcd', 'random' or 'infobatch', got {policy!r}")
    if kind == "kd":
        schedule, value, vaks = full_schedule(epochs), "entropy", "off"
    elif policy == "infobatch":
        from ..policies import InfoBatchSchedule

        schedule, vaks = InfoBatchSchedule(epochs), "off"
    else:
        schedule = CondensationSchedule(epochs, period, rho=rho, decay=decay, warmup=warmup)
        if policy == "random":
            value, vaks = "random", "off"
    return KCDLoader(
        dataset,
        schedule,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        seed=seed,
        backend=backend,
        value=value,
        vaks=vaks,
        device=device,
        persistent_workers=num_workers > 0,
        **backend_options,
    )


def train_data(
    images: Any, labels: Any, backend: str, augment: str, device: str = "cpu"
) -> tuple[ArrayDataset, dict[str, Any], str]:
    """The training set of a KD run for ``backend``, the loader's back-end options and the
    augmentation left to :class:`BatchPreprocess` (``augment``: "none", "crop" or "crop_flip").

    torch / dali: uint8 batches (:func:`keep_uint8`), cropped, flipped and normalised batched on
    the training device by ``BatchPreprocess``. tensor: the loader's fused kernel pads by 4 with
    the normalisation's mean colour (as ``BatchPreprocess`` pads, so the teacher sees the same
    inputs), crops, flips and scales to ``[0, 1]`` (a ``Recipe`` with mean 0, std 1); the
    trainer's ``BatchPreprocess`` then only normalises, as it does for evaluation. With a CUDA
    ``device`` the batches are made on the CPU into pinned memory and copied on a side stream
    one batch ahead (``tensor_device``)."""
    if backend == "tensor":
        from ..loader.backends.recipes import Recipe

        recipe = Recipe(
            pad=4 if augment != "none" else 0,
            random_crop=augment != "none",
            flip=augment == "crop_flip",
            fill=(0.5,),  # BatchPreprocess's mean: its padding is 0 after normalisation
        )
        options: dict[str, Any] = {"augment": recipe}
        if str(device).startswith("cuda"):
            options["tensor_device"] = str(device)
        return ArrayDataset(images, labels), options, "none"
    return ArrayDataset(images, labels, transform=keep_uint8), {}, augment


def full_schedule(epochs: int) -> CondensationSchedule:
    """Vanilla KD as a schedule: one stage whose warm-up is the whole run, rho = 1 (every
    point every epoch, never a condensation)."""
    return CondensationSchedule(epochs, epochs, rho=1.0, warmup=epochs)


def make_eval_loader(dataset: Any, batch_size: int = 512, num_workers: int = 0) -> DataLoader:
    """A plain, unshuffled DataLoader for evaluation (yields ``(inputs, targets)``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


# -- records ------------------------------------------------------------------------------
@dataclass
class EpochRecord:
    """What one epoch did and cost.

    seconds: wall clock of the whole epoch (data, teacher, student, scoring, and the
    epoch-end work of the loader). observe_s: host time in ``loader.observe`` (scoring).
    epoch_end_s: from the last batch to the iterator's end (KCDLoader: values, condensation
    and VAKS summary when one is due). cpu_s: CPU time of this process over the epoch
    (``time.process_time``; immune to other processes on a shared machine, blind to
    worker processes and the GPU). step_median_s: the median host time of one step
    (fetch to optimizer step; on CUDA only meaningful once the launch queue is full).
    condensations: ``loader.history`` records added.
    """

    epoch: int
    samples: int
    steps: int
    seconds: float
    loss: float
    lr: float
    observe_s: float
    epoch_end_s: float
    cpu_s: float = 0.0
    step_median_s: float = 0.0
    lr_start: float = 0.0  # the LR of the epoch's first step
    condensations: list[dict[str, Any]] = field(default_factory=list)
    accuracy: float | None = None


@dataclass
class TrainResult:
    """A finished run: per-epoch records, totals and test accuracy (percent)."""

    name: str
    epochs: list[EpochRecord]
    accuracy: float | None
    history: list[dict[str, Any]]

    def _total(self, field: str) -> float:
        return float(sum(getattr(e, field) for e in self.epochs))

    @property
    def seconds(self) -> float:
        return self._total("seconds")

    @property
    def samples(self) -> int:
        return int(self._total("samples"))

    @property
    def cpu_s(self) -> float:
        return self._total("cpu_s")

    @property
    def observe_s(self) -> float:
        return self._total("observe_s")

    @property
    def epoch_end_s(self) -> float:
        return self._total("epoch_end_s")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "samples": self.samples,
            "accuracy": self.accuracy,
            "epoch_samples": [e.samples for e in self.epochs],
            "epoch_seconds": [e.seconds for e in self.epochs],
            "epoch_cpu_seconds": [e.cpu_s for e in self.epochs],
            "epoch_step_median_s": [e.step_median_s for e in self.epochs],
            "cpu_seconds": self.cpu_s,
            "epoch_steps": [e.steps for e in self.epochs],
            "epoch_loss": [e.loss for e in self.epochs],
            "epoch_lr": [e.lr_start for e in self.epochs],
            "epoch_observe_s": [e.observe_s for e in self.epochs],
            "epoch_end_s": [e.epoch_end_s for e in self.epochs],
            "observe_s": self.observe_s,
            "condense_and_summary_s": self.epoch_end_s,
            "history": self.history,
        }


# -- the trainer ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KDTrainer:
    """One KD training run over ``loader`` (a :class:`kcd_fast.KCDLoader`).

    Args:
        student: the network trained (moved to ``device``).
        teacher: the frozen teacher (moved to ``device``, eval mode, no grad), or None for
            plain cross-entropy training (used to train teachers).
        loader: yields ``(inputs, targets, indices)``; has ``observe``, ``total_steps()``
            and either ``schedule.epochs`` or ``epochs``. Batches are scored with
            ``loader.observe`` when its schedule condenses (``schedule.condensation_epochs``);
            a loader without a schedule is always scored.
        config: :class:`KDConfig`.
        preprocess: :class:`BatchPreprocess` applied on ``device`` to each batch.
        device: where the models run.
        test_loader: a loader of ``(inputs, targets)`` for the final accuracy (optional).
        feature_loss: optional ``f(feat_s [B, Ds], feat_t [B, Dt]) -> scalar``, weighted by
            ``config.beta`` (an ``nn.Module``'s parameters are trained with the student).
        eval_every: also evaluate after every ``eval_every`` epochs (0: only at the end).
        progress: a tqdm bar per epoch (give it only when stderr is a terminal).
        log: where progress goes as plain lines instead (a log file, a pipe): a line per
            epoch from :meth:`fit` and, inside an epoch, one every ``log_every`` seconds.
            None: no lines. With ``progress`` the bar is shown and ``log`` only gets the epochs.
        name: a label for the bars, lines and records.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        loader: Any,
        config: KDConfig,
        *,
        preprocess: BatchPreprocess,
        device: str | torch.device = "cpu",
        test_loader: Any = None,
        feature_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        eval_every: int = 0,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        log_every: float = 15.0,
        name: str = "kd",
    ):
        if not isinstance(config, KDConfig):
            raise TypeError(f"config must be a KDConfig, got {type(config).__name__}")
        for attr in ("observe", "total_steps", "__iter__", "__len__"):
            if not hasattr(loader, attr):
                raise TypeError(f"loader must be a KCDLoader (with {attr}), got {type(loader).__name__}")
        if config.beta > 0 and feature_loss is None:
            raise ValueError(f"config.beta = {config.beta} needs a feature_loss, got None")
        if not is_int(eval_every) or eval_every < 0:
            raise ValueError(f"eval_every must be an int >= 0, got {eval_every!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device")
        self.config, self.loader, self.preprocess, self.name = config, loader, preprocess, name
        self.test_loader, self.eval_every, self.progress = test_loader, eval_every, progress
        if log is not None and not callable(log):
            raise TypeError(f"log must be a callable taking a line (e.g. print) or None, got {type(log).__name__}")
        if not (isinstance(log_every, (int, float)) and not isinstance(log_every, bool) and log_every > 0):
            raise ValueError(f"log_every must be a number of seconds > 0, got {log_every!r}")
        self.log, self.log_every = log, float(log_every)
        self.feature_loss = feature_loss if config.beta > 0 else None
        self.epochs = int(loader.schedule.epochs) if hasattr(loader, "schedule") else int(loader.epochs)
        self.total_steps = int(loader.total_steps())
        schedule = getattr(loader, "schedule", None)
        self.scores = schedule is None or bool(schedule.condensation_epochs)  # vanilla KD scores nothing
        value = getattr(loader, "value", None)  # the teacher's logits go to observe only for value="kl"
        self.scores_teacher = str(getattr(value, "value", value)) == "kl"
        # an InfoBatchSchedule scores each sample's loss and weights it (loader.weights)
        self.loss_scores = getattr(schedule, "kind", None) == "infobatch"
        cuda = self.device.type == "cuda"
        amp = config.amp if config.amp != "auto" else ("bf16" if cuda else "off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        self.channels_last = cuda if config.channels_last is None else bool(config.channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.student = student.to(self.device, memory_format=fmt)
        self.teacher = None if teacher is None else teacher.to(self.device, memory_format=fmt).eval()
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.preprocess.channels_last = self.channels_last
        params = list(self.student.parameters())
        if isinstance(self.feature_loss, nn.Module):
            self.feature_loss.to(self.device)
            params += list(self.feature_loss.parameters())
        self.optimizer = torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
        self.lr_index = LRIndex.parse(config.lr_index)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 and cuda else None
        self.step = 0
        self.records: list[EpochRecord] = []
        self._history_seen = len(getattr(loader, "history", []))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_epoch(self) -> EpochRecord:
        """Trains one epoch (one pass over the loader) and returns its record."""
        cfg, dev, loader = self.config, self.device, self.loader
        epoch = int(getattr(loader, "epoch", len(self.records)))
        need_feat = self.feature_loss is not None
        self.student.train()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"{self.name} epoch {epoch}", leave=False, dynamic_ncols=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        samples = steps = 0
        observe_s = 0.0
        step_times: list[float] = []
        n_batches = len(loader)
        lr_start = self._set_lr(epoch, 0, n_batches)
        _sync(dev)
        t_start, c_start = time.perf_counter(), time.process_time()
        t_line = t_start  # the last progress line (log, without a bar)
        it = iter(loader)
        while True:
            t_next = time.perf_counter()
            try:
                inputs, targets, indices = next(it)
            except StopIteration:
                epoch_end_s = time.perf_counter() - t_next
                break
            self._set_lr(epoch, steps, n_batches)
            x = self.preprocess(inputs.to(dev, non_blocking=True), train=True)
            y = targets.to(dev, non_blocking=True)
            with self._autocast():
                logits_t = feat_t = None
                if self.teacher is not None:
                    with torch.no_grad():
                        out_t = self.teacher(x, features=True) if need_feat else self.teacher(x)
                    logits_t, feat_t = out_t if need_feat else (out_t, None)
                out_s = self.student(x, features=True) if need_feat else self.student(x)
                logits_s, feat_s = out_s if need_feat else (out_s, None)
                if self.loss_scores:
                    per_sample = kd_loss_per_sample(
                        logits_s,
                        logits_t,
                        y,
                        temperature=cfg.temperature,
                        gamma=cfg.gamma,
                        alpha_kd=cfg.alpha_kd if self.teacher is not None else 0.0,
                    )
                    loss = (per_sample * loader.weights(indices).to(dev, non_blocking=True)).mean()
                else:
                    loss, _, _ = kd_loss(
                        logits_s,
                        logits_t,
                        y,
                        temperature=cfg.temperature,
                        gamma=cfg.gamma,
                        alpha_kd=cfg.alpha_kd if self.teacher is not None else 0.0,
                    )
                if self.feature_loss is not None and feat_t is not None:
                    loss = loss + cfg.beta * self.feature_loss(feat_s, feat_t)
            if self.scores:
                t_obs = time.perf_counter()
                if self.loss_scores:
                    loader.observe_scores(indices, per_sample.detach())
                else:
                    teacher = logits_t.detach() if self.scores_teacher and logits_t is not None else None
                    loader.observe(indices, logits_s.detach(), teacher)
                observe_s += time.perf_counter() - t_obs
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
                self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach().float() * y.shape[0]
            samples += int(y.shape[0])
            steps += 1
            if steps == n_batches:
                _sync(dev)  # drain the device first, so that epoch_end_s times the loader's own work
            step_times.append(time.perf_counter() - t_next)
            if bar is not None:
                bar.update(1)
            elif self.log is not None and step_times and time.perf_counter() - t_line >= self.log_every:
                t_line = time.perf_counter()
                self.log(
                    f"{self.name} epoch {epoch}: batch {steps}/{n_batches}, {t_line - t_start:.0f} s "
                    f"(~{(t_line - t_start) / steps * (n_batches - steps):.0f} s left in the epoch)"
                )
        _sync(dev)
        seconds, cpu_s = time.perf_counter() - t_start, time.process_time() - c_start
        if bar is not None:
            bar.close()
        history = list(getattr(loader, "history", []))
        new = [dict(r) for r in history[self._history_seen :]]
        self._history_seen = len(history)
        rec = EpochRecord(
            epoch=epoch,
            samples=samples,
            steps=steps,
            seconds=seconds,
            loss=float(loss_sum.item()) / max(1, samples),
            lr=self.optimizer.param_groups[0]["lr"],
            lr_start=lr_start,
            observe_s=observe_s,
            epoch_end_s=epoch_end_s,
            cpu_s=cpu_s,
            step_median_s=float(np.median(step_times)) if step_times else 0.0,
            condensations=new,
        )
        if self.test_loader is not None and self.eval_every and (len(self.records) + 1) % self.eval_every == 0:
            rec.accuracy = self.evaluate()
        self.records.append(rec)
        return rec

    def _set_lr(self, epoch: int, k: int, steps_in_epoch: int) -> float:
        """Sets the LR of step ``k`` of epoch ``epoch`` (the next optimizer step) and returns it."""
        cfg = self.config
        if self.lr_index is LRIndex.EPOCH:
            factor = epoch_lr_factor(epoch, k, steps_in_epoch, self.epochs, self.step, cfg)
        else:
            factor = lr_factor(self.step, self.total_steps, cfg)
        lr = cfg.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def evaluate(self, loader: Any = None) -> float:
        """Top-1 accuracy (percent) of the student on ``loader`` (default: test_loader)."""
        loader = self.test_loader if loader is None else loader
        if loader is None:
            raise ValueError("evaluate needs a loader: pass one or give KDTrainer a test_loader")
        return evaluate(self.student, loader, self.preprocess, self.device, self.amp_dtype)

    def fit(self) -> TrainResult:
        """Trains the remaining epochs, then evaluates on ``test_loader`` if given."""
        t0, done0 = time.perf_counter(), len(self.records)
        while len(self.records) < self.epochs:
            rec = self.train_epoch()
            if self.log is not None:
                done = len(self.records)
                left = (time.perf_counter() - t0) / (done - done0) * (self.epochs - done)
                self.log(
                    f"{self.name} epoch {done}/{self.epochs}: {rec.samples} samples in {rec.seconds:.1f} s, "
                    f"loss {rec.loss:.4f}" + (f", ~{_duration(left)} left" if done < self.epochs else "")
                )
        return self.result()

    def result(self) -> TrainResult:
        """The run so far, with the final test accuracy (evaluated now if needed)."""
        acc = None
        if self.test_loader is not None:
            last = self.records[-1].accuracy if self.records else None
            acc = last if last is not None else self.evaluate()
            if self.records:
                self.records[-1].accuracy = acc
        return TrainResult(self.name, list(self.records), acc, [dict(r) for r in getattr(self.loader, "history", [])])


def _duration(seconds: float) -> str:
    """``95`` -> ``"1 min 35 s"``; ``4000`` -> ``"1 h 07 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    preprocess: BatchPreprocess,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Top-1 accuracy in percent of ``model`` over ``loader`` (``(inputs, targets[, ...])``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    ctx = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    for batch in loader:
        x = preprocess(batch[0].to(device, non_blocking=True), train=False)
        y = batch[1].to(device, non_blocking=True)
        with ctx:
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        total += int(y.shape[0])
    model.train(was_training)
    return 100.0 * float(correct.item()) / max(1, total)
