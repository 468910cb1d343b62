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
trainer's. Lightning itself keeps them in step (it calls ``loader.sampler.set_epoch``),
saves the loader's state in its checkpoints (a ``KCDLoader`` has ``state_dict`` /
``load_state_dict``, which Lightning's fit loop calls) and resumes it with
``fit(ckpt_path=...)``, mid-epoch too: the loader records the batches observed, so the one
Lightning's fetcher read ahead is yielded again. Under Lightning's DDP strategies the
loader shards itself (a process group exists by the time ``train_dataloader`` runs) and
Lightning leaves it alone: it only re-wraps ``torch.utils.data.DataLoader`` objects.
Size LR schedules with ``loader.total_steps()`` (``trainer.estimated_stepping_batches``
assumes every epoch has the first epoch's length).

With an :class:`kcd_fast.InfoBatchSchedule` return ``{"loss": (losses * loader.weights(indices)).mean(),
"scores": losses.detach()}`` (per-sample losses) and pass
``Trainer(reload_dataloaders_every_n_epochs=1)``: its epochs change size, and Lightning reads
``len(loader)`` only when it (re)loads the train dataloader (the same loader object).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as err:
        raise ImportError(
            "kcd_fast.integrations.lightning needs PyTorch Lightning: pip install 'kcd_fast[lightning]' "
            "(or pip install lightning)"
        ) from err

from ..loader import KCDLoader
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


class KCDCallback(Callback):
    """Observes every training batch into the trainer's :class:`kcd_fast.KCDLoader`.

    ``training_step`` returns a dict with ``"loss"`` and ``"logits"`` (the student's logits
    for the batch: ``[B, C]``, or ``[B, L, V]`` with ``"mask"`` ``[B, L]``; with
    ``value="kl"`` also ``"teacher_logits"``), or ``"scores"`` ``[B]`` (per-sample values
    you compute). Raises ``TypeError`` when the trainer's train dataloader is not a
    KCDLoader and ``ValueError`` when ``max_epochs`` exceeds the schedule's epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.loader: KCDLoader | None = None

    def _find_loader(self, trainer: Any) -> KCDLoader:
        dl = trainer.train_dataloader
        if not isinstance(dl, KCDLoader):
            raise TypeError(
                "KCDCallback needs the LightningModule's train_dataloader() (or the datamodule's) to return a "
                f"kcd_fast.KCDLoader, got {type(dl).__name__}"
            )
        return dl

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
        self.loader = loader

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        loader = self.loader if self.loader is not None else self._find_loader(trainer)
        if loader.epoch != trainer.current_epoch:
            raise RuntimeError(
                f"the KCDLoader is at epoch {loader.epoch} but the trainer at epoch {trainer.current_epoch}: build "
                "the KCDLoader once (in __init__ or setup) and return that one from train_dataloader(), without "
                "reload_dataloaders_every_n_epochs (a new loader starts at epoch 0); resume both from one checkpoint"
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:  # training_step skipped the batch: nothing to score (the loader reports such points)
            return
        loader = self.loader if self.loader is not None else self._find_loader(trainer)
        observe_step(loader, batch_indices(batch), outputs, "training_step's output")
