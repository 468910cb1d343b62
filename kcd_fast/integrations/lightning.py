"""KCD in PyTorch Lightning: :class:`KCDCallback`.

Three changes to a LightningModule::

    def train_dataloader(self):                      # 1. a KCDLoader instead of a DataLoader
        return KCDLoader(train_set, schedule, batch_size=128, shuffle=True, seed=0)

    def training_step(self, batch, batch_idx):
        x, y, indices = batch                         # the batch's last element: the indices
        logits = self(x)
        return {"loss": loss_fn(logits, y), "logits": logits}   # 2. the student's logits

    Trainer(max_epochs=schedule.epochs, callbacks=[KCDCallback()])   # 3. the callback

The callback observes every batch (``"logits"``, optional ``"teacher_logits"`` and
``"mask"`` for sequences, or ``"scores"``) and checks that the loader's epochs are the
trainer's. Lightning itself keeps them in step (it calls ``loader.sampler.set_epoch``).

Resume (docs/resume.md): ``fit(ckpt_path=...)`` continues exactly from ANY checkpoint
Lightning writes: mid-epoch (``every_n_train_steps``), at an epoch's end (the default
``ModelCheckpoint()``), at a validation's end, or from your own callback calling
``trainer.save_checkpoint`` in ``on_train_batch_end``, listed before or after this one.
Lightning stores the loader's state (``state_dict``) in its fit loop, but restores it only
when it resumes mid-epoch; so the callback keeps the same state in its own callback state,
which Lightning always restores, and hands it to the loader at ``on_train_start`` (before
the first batch is pulled). The callback moves itself to the front of
``trainer.callbacks`` at ``setup``: it observes each batch before any other callback's
``on_train_batch_end`` can save a checkpoint, so a checkpoint always holds the
observation of the batch its weights were trained on. The loader records the batches
observed, so the one Lightning's fetcher read ahead is yielded again. Under Lightning's DDP strategies the
loader shards itself (a process group exists by the time ``train_dataloader`` runs) and
Lightning leaves it alone: it only re-wraps ``torch.utils.data.DataLoader`` objects.
Size LR schedules with ``loader.total_steps(trainer.accumulate_grad_batches)``
(``trainer.estimated_stepping_batches`` assumes every epoch has the first epoch's length).

Trainer options that change how many batches an epoch trains are followed exactly or refused
when ``fit`` starts (``ValueError`` naming the option and what to do), never left to break the
schedule silently:

- ``accumulate_grad_batches``: followed (Lightning steps the optimizer on an epoch's last,
  partial group; the run takes ``sum(ceil(batches_e / k))`` optimizer steps);
- ``max_steps``: followed when the schedule's optimizer steps fit in it, else refused;
- ``limit_train_batches``: 1.0, or an int no smaller than the longest epoch, is followed (it
  cuts nothing); a fraction below 1.0, or a smaller int, is refused (Lightning would fix every
  epoch's length from epoch 0 and cut the epochs the condensations rank);
- ``max_time`` (a ``Timer`` with a duration) and ``fast_dev_run``: refused;
- ``val_check_interval``: followed in every epoch. Lightning sizes an epoch (its progress bar,
  the batch after which it validates) from ``len(loader)`` once, at the first epoch; the
  callback gives it each epoch's length at the epoch's start, so the default validates at
  every epoch's end and ``0.5`` halfway through every epoch. An int larger than the
  shortest epoch (validation would stop once the epochs shrink below it) is refused, as
  Lightning refuses one larger than the first epoch.

With an :class:`kcd_fast.InfoBatchSchedule` return ``{"loss": (losses * loader.weights(indices)).mean(),
"scores": losses.detach()}`` (per-sample losses) and pass
``Trainer(reload_dataloaders_every_n_epochs=1)``: its epochs change size, and Lightning reads
``len(loader)`` only when it (re)loads the train dataloader (the same loader object).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import Timer
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.callbacks import Timer
    except ImportError as err:
        raise ImportError(
            "kcd_fast.integrations.lightning needs PyTorch Lightning: pip install 'kcd_fast[lightning]' "
            "(or pip install lightning)"
        ) from err

from ..loader import KCDLoader
from ..loader.state import STATE_FORMAT
from .outputs import observe_step

__all__ = ["KCDCallback", "batch_indices"]


def batch_indices(batch: Any) -> torch.Tensor:
    """The indices a KCDLoader batch carries: its last element (a tuple or list batch), or
    ``batch["indices"]`` / ``batch["index"]`` (a dict batch)."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[-1]
    if isinstance(batch, Mapping):
        for key in ("indices", "index"):
            if key in batch:
                return batch[key]
    raise TypeError(
        "KCDCallback reads the batch's indices from its last element (KCDLoader yields (inputs, targets, indices)) "
        f"or from batch['indices']; got a {type(batch).__name__}"
    )


def _accumulation(trainer: Any) -> int:
    """``trainer.accumulate_grad_batches`` (at least 1)."""
    return max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)


def _run_epochs(trainer: Any, loader: KCDLoader) -> list[int]:
    """Batches on this rank of each epoch the fit runs: the schedule's first ``max_epochs``."""
    steps = loader.steps_per_epoch()
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else len(steps)
    return steps[: min(max_epochs, len(steps))]


class KCDCallback(Callback):
    """Observes every training batch into the trainer's :class:`kcd_fast.KCDLoader`.

    ``training_step`` returns a dict with ``"loss"`` and ``"logits"`` (the student's logits
    for the batch: ``[B, C]``, or ``[B, L, V]`` with ``"mask"`` ``[B, L]``; with
    ``value="kl"`` also ``"teacher_logits"``), or ``"scores"`` ``[B]`` (per-sample values
    you compute). Raises ``TypeError`` when the trainer's train dataloader is not a
    KCDLoader and ``ValueError`` when ``max_epochs`` exceeds the schedule's epochs or a
    Trainer option would cut the schedule's epochs (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.loader: KCDLoader | None = None
        self._to_load: dict[str, Any] | None = None  # the loader state of the checkpoint resumed from

    # -- order and state -------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Moves this callback to the front of ``trainer.callbacks`` (the others keep their
        order): each batch is observed before another callback's ``on_train_batch_end``
        runs, which may save a checkpoint."""
        callbacks = list(trainer.callbacks)
        if callbacks and callbacks[0] is not self and any(c is self for c in callbacks):
            trainer.callbacks = [self, *(c for c in callbacks if c is not self)]

    def state_dict(self) -> dict[str, Any]:
        """``{"loader": loader.state_dict()}`` once the callback knows the trainer's loader
        (under DDP a collective, as Lightning's checkpoint dump is on every rank)."""
        if self.loader is None:
            return {}
        return {"loader": self.loader.state_dict()}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """A checkpoint without this callback's state (written before it kept one): the
        loader state Lightning's fit loop stored, when it holds exactly one KCDLoader state.
        Lightning calls ``load_state_dict`` next, whose state takes precedence."""
        try:
            states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        except (KeyError, TypeError):
            return
        if isinstance(states, list) and len(states) == 1 and isinstance(states[0], Mapping):
            if states[0].get("format") == STATE_FORMAT:
                self._to_load = dict(states[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the checkpoint's loader state until the loader exists (``on_train_start``)."""
        state = state_dict.get("loader") if isinstance(state_dict, Mapping) else None
        if isinstance(state, Mapping):
            self._to_load = dict(state)

    def _find_loader(self, trainer: Any) -> KCDLoader:
        dl = trainer.train_dataloader
        if not isinstance(dl, KCDLoader):
            raise TypeError(
                "KCDCallback needs the LightningModule's train_dataloader() (or the datamodule's) to return a "
                f"kcd_fast.KCDLoader, got {type(dl).__name__}"
            )
        return dl

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_trainer_limits(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loader = self._find_loader(trainer)
        epochs = loader.schedule.epochs
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > epochs:
            raise ValueError(
                f"Trainer(max_epochs={trainer.max_epochs}) runs past the KCD schedule's {epochs} epochs (Lightning "
                f"uses 1000 when max_epochs is not given); pass Trainer(max_epochs={epochs}), or fewer"
            )
        if getattr(loader.schedule, "kind", None) == "infobatch" and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "an InfoBatchSchedule's epochs change size from epoch to epoch and Lightning reads len(loader) only "
                "when it (re)loads the train dataloader: pass Trainer(reload_dataloaders_every_n_epochs=1) (with "
                f"train_dataloader() returning the same KCDLoader), got {trainer.reload_dataloaders_every_n_epochs}"
            )
        self._check_epoch_lengths(trainer, loader)
        self._check_lr_schedules(trainer, loader)
        self.loader = loader
        if self._to_load is not None:
            # Lightning loads the loader's state itself only when it resumes mid-epoch; loading
            # the same state again changes nothing (the summaries already applied are skipped).
            # The iterator Lightning made before this hook has not been pulled: it follows.
            state, self._to_load = self._to_load, None
            loader.load_state_dict(state)
            acc = _accumulation(trainer)
            pos = loader.resume_position
            if pos % acc and pos != loader.steps_per_epoch()[loader.epoch]:  # an epoch's last group steps
                warnings.warn(
                    f"resumed {loader.resume_position} batches into epoch {loader.epoch}, inside a group of "
                    f"accumulate_grad_batches={acc}: Lightning does not save accumulated gradients, so the group's "
                    f"first {loader.resume_position % acc} batch(es) will not count in its optimizer step (with or "
                    "without KCD); save checkpoints at optimizer steps (e.g. validation at a multiple of the group)",
                    UserWarning,
                    stacklevel=2,
                )
        # a resumed mid-epoch run gets no on_train_epoch_start for its first epoch; Lightning
        # then compares the batches its checkpoint completed with this length to decide whether
        # that epoch had ended (a save in on_train_batch_end on the epoch's last batch)
        self._size_epoch(trainer, len(loader))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # resumed from a checkpoint of the last epoch's end: Lightning trains nothing and never
        # calls on_train_start; the loader still takes the checkpoint's state (its history, bank)
        if self._to_load is not None and isinstance(trainer.train_dataloader, KCDLoader):
            state, self._to_load = self._to_load, None
            trainer.train_dataloader.load_state_dict(state)

    # -- Trainer options that change how many batches an epoch trains (checked at fit start) --
    @staticmethod
    def _check_trainer_limits(trainer: Any) -> None:
        """Refuses, before anything runs, the Trainer options that cut KCD epochs short in a way
        the schedule cannot follow: ``fast_dev_run``, ``limit_train_batches`` as a fraction
        below 1.0 and ``max_time`` (or a ``Timer`` callback with a duration)."""
        fast = getattr(trainer, "fast_dev_run", False)
        if fast:
            raise ValueError(
                f"Trainer(fast_dev_run={fast!r}) trains {int(fast)} batch(es) per epoch, not the KCD schedule's "
                "epochs: KCDCallback refuses it; for a quick run use a small schedule (epochs, rho) on a small dataset"
            )
        limit = trainer.limit_train_batches
        if isinstance(limit, float) and limit != 1.0:
            raise ValueError(
                f"Trainer(limit_train_batches={limit!r}) makes Lightning train a fixed number of batches in every "
                "epoch (a fraction of epoch 0's length), which breaks the KCD schedule (each epoch has its own "
                "length and the condensations need every batch observed): leave limit_train_batches at 1.0 and "
                "train on less data instead (a torch.utils.data.Subset of the dataset, or a schedule with smaller rho)"
            )
        for cb in getattr(trainer, "callbacks", []):
            duration = getattr(cb, "_duration", None)
            if isinstance(cb, Timer) and duration is not None:
                raise ValueError(
                    f"Trainer(max_time=...) (a Timer of {duration:g} s) stops training mid-schedule, so the KCDLoader "
                    "would not end where the KCD schedule ends: remove max_time and bound the run with max_epochs; to "
                    "split a long run, save checkpoints (ModelCheckpoint) and resume with trainer.fit(ckpt_path=...)"
                )

    @staticmethod
    def _check_epoch_lengths(trainer: Any, loader: KCDLoader) -> None:
        """The options whose effect depends on the loader's epochs: an int
        ``limit_train_batches`` is followed when no epoch has more batches (it then cuts
        nothing), ``max_steps`` when the run's optimizer steps (``ceil(batches_e /
        accumulate_grad_batches)`` per epoch, Lightning steps on an epoch's last partial group)
        fit in it. ``accumulate_grad_batches`` itself is followed exactly."""
        planned = _run_epochs(trainer, loader)
        limit = trainer.limit_train_batches
        if isinstance(limit, int) and limit < max(planned, default=0):
            raise ValueError(
                f"Trainer(limit_train_batches={limit}) cuts the KCD epochs (the longest has {max(planned)} batches on "
                f"this rank: {planned}), so epochs would not train the schedule's points: leave limit_train_batches "
                f"unset (or >= {max(planned)}) and train on less data instead (a torch.utils.data.Subset)"
            )
        every = getattr(trainer, "val_check_interval", None)
        shortest = min(planned, default=0)
        if (
            isinstance(every, int)
            and not isinstance(every, bool)
            and every > shortest > 0
            and getattr(trainer, "check_val_every_n_epoch", None) is not None
            and trainer.limit_val_batches > 0
        ):
            raise ValueError(
                f"Trainer(val_check_interval={every}) validates after every {every} batches of an epoch, but the KCD "
                f"epochs shrink to {shortest} batches on this rank ({planned}), so validation would stop once they "
                f"do: pass val_check_interval <= {shortest}, a fraction of each epoch (e.g. 0.5 or 1.0), or "
                "check_val_every_n_epoch=None to count batches across epochs"
            )
        acc = _accumulation(trainer)
        updates = loader.total_steps(acc, len(planned))
        if trainer.max_steps is not None and 0 <= trainer.max_steps < updates:
            raise ValueError(
                f"Trainer(max_steps={trainer.max_steps}) stops before the KCD schedule ends: its "
                f"{len(planned)} epochs take {updates} optimizer steps (loader.steps_per_epoch() = {planned}"
                + (f", accumulate_grad_batches={acc}" if acc > 1 else "")
                + f"): leave max_steps at -1 and bound the run with max_epochs, or pass max_steps >= {updates}"
            )

    @staticmethod
    def _check_lr_schedules(trainer: Any, loader: KCDLoader) -> None:
        """Warns about a step-interval LR scheduler sized for another number of optimizer
        steps (OneCycleLR's ``total_steps``), typically ``trainer.estimated_stepping_batches``,
        which assumes every epoch is as long as the first: it would never finish annealing."""
        planned = _run_epochs(trainer, loader)
        acc = _accumulation(trainer)
        updates = loader.total_steps(acc, len(planned))
        shorter = len(planned) < loader.schedule.epochs
        fix = "loader.total_steps(trainer.accumulate_grad_batches" + (
            ", epochs=trainer.max_epochs)" if shorter else ")"
        )
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            total = getattr(config.scheduler, "total_steps", None)
            if getattr(config, "interval", None) != "step" or getattr(config, "frequency", 1) != 1:
                continue
            if isinstance(total, int) and total != updates:
                warnings.warn(
                    f"{type(config.scheduler).__name__}(total_steps={total}) is sized for {total} optimizer steps, but "
                    f"the KCD schedule takes {updates} (its epochs shrink: loader.steps_per_epoch() = "
                    f"{planned}{f', accumulate_grad_batches={acc}' if acc > 1 else ''}), so it "
                    + ("never finishes annealing" if total > updates else "runs out of steps")
                    + "; trainer.estimated_stepping_batches assumes every epoch is as long as the first: size it "
                    f"with {fix}",
                    UserWarning,
                    stacklevel=2,
                )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        loader = self.loader if self.loader is not None else self._find_loader(trainer)
        if loader.epoch != trainer.current_epoch:
            raise RuntimeError(
                f"the KCDLoader is at epoch {loader.epoch} but the trainer at epoch {trainer.current_epoch}: build "
                "the KCDLoader once (in __init__ or setup) and return that one from train_dataloader(), without "
                "reload_dataloaders_every_n_epochs (a new loader starts at epoch 0); resume both from one checkpoint"
            )
        self._size_epoch(trainer, len(loader))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Resumed from a save on an epoch's last batch, Lightning goes straight into the next
        # epoch without on_train_epoch_start: size it at its first batch. Not len(loader): with
        # Lightning's fetcher a batch ahead, the epoch's last batch may be yielded already and
        # len() would end the epoch before that batch is observed.
        if batch_idx == 0:
            loader = self.loader if self.loader is not None else self._find_loader(trainer)
            steps = loader.steps_per_epoch()
            self._size_epoch(trainer, steps[loader.epoch] if loader.epoch < len(steps) else 0)

    @staticmethod
    def _size_epoch(trainer: Any, n: int) -> None:
        """Tells Lightning this epoch's length. Lightning reads ``len(loader)`` when it loads
        the train dataloader (once, unless ``reload_dataloaders_every_n_epochs``) and derives
        ``trainer.num_training_batches`` (the progress bar's total, the end-of-epoch test of
        a resumed run) and ``trainer.val_check_batch`` from it; KCD's epochs shrink, so the
        first epoch's values would skip validation at later epochs' ends. The same rule as
        Lightning's ``_FitLoop.setup_data``: a float ``val_check_interval`` is a fraction of
        the epoch, at least one batch; an int or a time interval does not depend on it."""
        fit_loop = getattr(trainer, "fit_loop", None)
        current = getattr(fit_loop, "max_batches", None)
        if not isinstance(current, int) or isinstance(current, bool):
            return  # no length (inf) or a Lightning without this attribute: nothing to follow
        if n == current or n == 0:
            return
        fit_loop.max_batches = n
        every = getattr(trainer, "val_check_interval", None)
        batch = getattr(trainer, "val_check_batch", None)
        if (
            isinstance(every, float)
            and isinstance(batch, int)
            and getattr(trainer, "_val_check_time_interval", None) is None
        ):
            trainer.val_check_batch = max(1, int(n * every))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:  # training_step skipped the batch: nothing to score (the loader reports such points)
            return
        loader = self.loader if self.loader is not None else self._find_loader(trainer)
        observe_step(loader, batch_indices(batch), outputs, "training_step's output")
