"""KCD in the Hugging Face Trainer: :class:`KCDTrainer`.

Three changes to a Trainer script::

    schedule = CondensationSchedule(epochs=6, period=2, rho=0.7)
    trainer = KCDTrainer(model=student, args=TrainingArguments(..., num_train_epochs=6),  # 1. the subclass
                         train_dataset=train_set, data_collator=collator,
                         kcd_schedule=schedule, kcd_options={"seed": 0})                  # 2. the schedule
    trainer.train()                                                    # 3. nothing else changes
    trainer.kcd_loader.history                                         # what was condensed

What it does:

- builds a :class:`kcd_fast.KCDLoader` over ``train_dataset`` (map-style, dict samples)
  with the Trainer's data collator (unused columns removed as the Trainer does),
  ``per_device_train_batch_size``, the ``dataloader_*`` arguments and ``data_seed`` (else
  ``seed``); ``kcd_options`` are further KCDLoader arguments (``value``, ``vaks``, ...);
- observes the model's logits at every training step: ``outputs.logits`` of the model's
  last forward in the step (a forward hook, so your own ``compute_loss``, for example one
  that distils from a teacher, keeps working unchanged); ``[B, L, V]`` logits are scored
  per sequence under ``attention_mask`` (all tokens without one), ``[B, C]`` per row;
- sizes the run from the schedule: epoch ``e`` has ``loader.steps_per_epoch()[e]``
  batches, the optimizer steps add up to ``ceil(steps_e / gradient_accumulation_steps)``
  over the epochs, and the LR scheduler is built on that total so it ends on time;
  ``max_steps`` must stay unset and ``num_train_epochs`` at most the schedule's epochs;
- saves the loader's state into every checkpoint folder (``kcd_loader.pt``) and restores
  it with ``train(resume_from_checkpoint=...)``, exactly: mid-epoch (``save_steps``: the
  loader yields the rest of the epoch; the Trainer's own batch skipping is not used) and at
  an epoch's end (``save_strategy="epoch"``: the Trainer goes on with the next epoch, whose
  condensation runs at its ``set_epoch``);
- under ``torchrun`` the loader shards itself (the Trainer's DistributedSampler is not used).

With an :class:`kcd_fast.InfoBatchSchedule` the points are scored by their per-sample loss and
each loss is weighted by ``loader.weights``: the default ``compute_loss`` computes the model's
per-sample cross-entropy (``[B, C]`` logits against ``labels`` ``[B]``; ``[B, L, V]`` token
logits as a causal LM's, labels shifted by one and ``-100`` ignored, the mean over a sequence's
tokens) and trains on :meth:`KCDTrainer.kcd_infobatch_loss` of it; a ``compute_loss`` of your
own returns ``self.kcd_infobatch_loss(per_sample_losses)``. The run is sized with every later
epoch at its upper bound (the full set: the sizes depend on the losses), so the LR schedule is
built on that bound and the run ends with fewer steps than it planned.

Checked against transformers 5.x (the epoch loop is ``Trainer._run_epoch``); an older
Trainer raises ``ImportError`` naming the version.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as err:
    raise ImportError(
        "kcd_fast.integrations.hf needs Hugging Face transformers >= 5: pip install 'kcd_fast[hf]'"
    ) from err

from ..loader import KCDLoader
from ..policies import InfoBatchSchedule
from ..schedule import CondensationSchedule
from .outputs import logits_of

__all__ = ["CHECKPOINT_FILE", "KCDTrainer"]

CHECKPOINT_FILE = "kcd_loader.pt"
INDICES_KEY = "kcd_indices"
_NEEDED = ("_run_epoch", "_init_training_state", "set_initial_training_values", "get_total_train_batch_size")

if not all(hasattr(Trainer, name) for name in _NEEDED):
    raise ImportError(
        f"kcd_fast.integrations.hf needs transformers >= 5 (a Trainer with {', '.join(_NEEDED)}); "
        f"installed: {transformers.__version__}"
    )


class _DictBatches:
    """The KCDLoader as the Trainer sees it: dict batches carrying ``kcd_indices``."""

    def __init__(self, loader: KCDLoader):
        self.loader = loader
        self.dataset = loader.dataset

    def __iter__(self):
        for batch, indices in self.loader:
            if not isinstance(batch, dict):
                raise TypeError(
                    "KCDTrainer needs dict batches (the data collator's output, as the Trainer feeds the model), "
                    f"got {type(batch).__name__}"
                )
            yield {**batch, INDICES_KEY: indices}

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class _SaveLoaderState(TrainerCallback):
    """Writes the loader's state into each checkpoint folder the Trainer saves (every rank
    calls it: under DDP a collective; rank 0 writes)."""

    def __init__(self, trainer: KCDTrainer):
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = self.trainer._kcd_loader
        if loader is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            loader.save(os.path.join(folder, CHECKPOINT_FILE))


class KCDTrainer(Trainer):
    """A ``transformers.Trainer`` that trains each epoch on the points KCD keeps.

    Args:
        kcd_schedule: the :class:`kcd_fast.CondensationSchedule`.
        kcd_options: further :class:`kcd_fast.KCDLoader` keyword arguments (``value``,
            ``vaks``, ``alpha``, ``device``, ``strict``, ...); ``seed`` defaults to the
            Trainer's ``data_seed`` (else ``seed``).
        everything else: as for ``transformers.Trainer``.

    ``trainer.kcd_loader`` is the loader of the current (or last) ``train()``.
    """

    def __init__(
        self,
        *args: Any,
        kcd_schedule: CondensationSchedule | InfoBatchSchedule,
        kcd_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(kcd_schedule, (CondensationSchedule, InfoBatchSchedule)):
            raise TypeError(
                "kcd_schedule must be a kcd_fast.CondensationSchedule or kcd_fast.InfoBatchSchedule, got "
                f"{type(kcd_schedule).__name__}"
            )
        if kcd_options is not None and not isinstance(kcd_options, dict):
            raise TypeError(f"kcd_options must be a dict of KCDLoader arguments, got {type(kcd_options).__name__}")
        taken = sorted(set(kcd_options or {}) & {"batch_size", "shuffle", "collate_fn", "num_workers", "drop_last"})
        if taken:
            raise ValueError(
                f"kcd_options {taken} come from TrainingArguments (per_device_train_batch_size, dataloader_*) and "
                "the data collator; set them there"
            )
        super().__init__(*args, **kwargs)
        self.kcd_schedule = kcd_schedule
        self.kcd_options = dict(kcd_options or {})
        self._kcd_loader: KCDLoader | None = None
        self._kcd_resume: str | None = None
        self._kcd_logits: torch.Tensor | None = None
        self._kcd_capturing = False
        self._kcd_infobatch = isinstance(kcd_schedule, InfoBatchSchedule)
        self._kcd_indices: torch.Tensor | None = None
        self._kcd_losses: torch.Tensor | None = None
        if self._kcd_infobatch and getattr(self, "loss_is_scaled_for_ga", None) is None:
            self.loss_is_scaled_for_ga = False  # kcd_infobatch_loss is a per-batch mean
        self._kcd_hook: tuple[Any, Any] | None = None  # (the model hooked, the hook's handle)
        self._kcd_hook_model()
        self.add_callback(_SaveLoaderState(self))

    # -- the loader ----------------------------------------------------------------------
    @property
    def kcd_loader(self) -> KCDLoader:
        """The KCDLoader of the current (or last) ``train()``; built on first use."""
        if self._kcd_loader is None:
            self._kcd_loader = self._build_loader()
        return self._kcd_loader

    def _build_loader(self) -> KCDLoader:
        if self.train_dataset is None:
            raise ValueError("KCDTrainer needs a train_dataset")
        args, dataset, collator = self.args, self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        options = {
            "seed": args.data_seed if args.data_seed is not None else args.seed,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "drop_last": args.dataloader_drop_last,
            **self.kcd_options,
        }
        if args.dataloader_num_workers > 0:
            options.setdefault("persistent_workers", args.dataloader_persistent_workers)
            options.setdefault("prefetch_factor", args.dataloader_prefetch_factor)
        loader = KCDLoader(
            dataset, self.kcd_schedule, batch_size=self._train_batch_size, shuffle=True, collate_fn=collator, **options
        )
        if self._kcd_resume is not None:
            path = os.path.join(self._kcd_resume, CHECKPOINT_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"checkpoint {self._kcd_resume!r} has no {CHECKPOINT_FILE}: it was not saved by a KCDTrainer"
                )
            loader.restore(path)
        return loader

    def get_train_dataloader(self) -> Any:
        return _DictBatches(self.kcd_loader)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            found = get_last_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir!r} to resume from")
            resume_from_checkpoint = found
        self._kcd_resume = resume_from_checkpoint or None
        self._kcd_loader = None  # every train() builds its loader (restored from the checkpoint, if any)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- the run's length: the schedule's epochs -------------------------------------------
    def _epochs(self) -> int:
        epochs = math.ceil(self.args.num_train_epochs)
        if epochs != self.args.num_train_epochs:
            raise ValueError(
                f"num_train_epochs = {self.args.num_train_epochs}: KCDTrainer runs whole KCD epochs; pass an int"
            )
        if self.args.max_steps > 0:
            raise ValueError(
                f"KCDTrainer sizes the run from the KCD schedule; leave max_steps unset (got {self.args.max_steps}) "
                f"and set num_train_epochs <= {self.kcd_schedule.epochs}"
            )
        if not 1 <= epochs <= self.kcd_schedule.epochs:
            raise ValueError(
                f"num_train_epochs = {self.args.num_train_epochs} must be between 1 and the KCD schedule's "
                f"{self.kcd_schedule.epochs} epochs"
            )
        return epochs

    def _updates(self, batches: int) -> int:
        ga = self.args.gradient_accumulation_steps
        return math.ceil(batches / ga)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple[int, int, int, int, int, int, int]:
        epochs = self._epochs()
        loader = self.kcd_loader
        steps = loader.steps_per_epoch()[:epochs]
        if self._kcd_infobatch:  # every epoch at its upper bound, the same in a resumed run
            steps = [loader._planner.num_batches(loader.n)] * epochs
        max_steps = sum(self._updates(s) for s in steps)
        num_train_samples = sum(self.kcd_schedule.epoch_sizes(loader.n)[:epochs])
        total_batch = self.get_total_train_batch_size(args)
        return epochs, max(self._updates(steps[0]), 1), loader.n, num_train_samples, total_batch, steps[0], max_steps

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        epochs_trained, steps_trained = super()._init_training_state(*args, **kwargs)
        if self._kcd_resume is not None:  # the loader knows where the run stood; it skips batches itself
            loader = self.kcd_loader
            # a checkpoint at an epoch's end (save_strategy="epoch"): every batch of that epoch
            # was trained, its condensation runs when the Trainer starts the next (set_epoch)
            return loader.epoch + int(self._epoch_done(loader)), 0
        return epochs_trained, steps_trained

    @staticmethod
    def _epoch_done(loader: KCDLoader) -> bool:
        """The loader was restored after the last batch of its epoch was trained."""
        return (
            loader.epoch < loader.schedule.epochs and loader.resume_position == loader.steps_per_epoch()[loader.epoch]
        )

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        loader = self.kcd_loader
        epoch = kwargs["epoch"]
        if self._kcd_infobatch:
            len(loader)  # completes the last epoch now: this epoch's size is drawn at its start
        ahead = epoch == loader.epoch + 1 and (loader.resume_position == 0 or self._epoch_done(loader))
        if epoch != loader.epoch and not ahead:
            raise RuntimeError(f"the Trainer is at epoch {epoch} but its KCDLoader at epoch {loader.epoch}")
        done = loader.resume_position if epoch == loader.epoch else 0  # batches trained before a resume
        batches = loader.steps_per_epoch()[epoch]
        if done % self.args.gradient_accumulation_steps:
            raise RuntimeError(
                f"the KCDLoader resumes epoch {epoch} after {done} batches, inside an accumulation group of "
                f"{self.args.gradient_accumulation_steps}: the checkpoint was not saved at an optimizer step"
            )
        # the whole epoch, so that state.epoch counts the batches trained before the resume; the
        # Trainer skips nothing itself (get_resumed_dataloader): the loader skips them
        kwargs.update(
            steps_in_epoch=batches,
            num_update_steps_per_epoch=self._updates(batches),
            steps_trained_in_current_epoch=done,
        )
        return super()._run_epoch(*args, **kwargs)

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """The train loader as it is: a restored KCDLoader already skips the batches its state
        records as trained (accelerate's ``skip_first_batches`` would skip them again)."""
        return dataloader

    # -- observing every step ------------------------------------------------------------
    def _kcd_hook_model(self) -> None:
        """Hooks ``self.model``'s forward to capture its logits; again after ``train()``
        replaced the model (``model_init``, ``hyperparameter_search``)."""
        model = self.model
        if model is None or (self._kcd_hook is not None and self._kcd_hook[0] is model):
            return
        if self._kcd_hook is not None:
            self._kcd_hook[1].remove()
        self._kcd_hook = (model, model.register_forward_hook(self._capture_logits))

    def _capture_logits(self, module: Any, inputs: Any, output: Any) -> None:
        if self._kcd_capturing:
            self._kcd_logits = logits_of(output)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        if INDICES_KEY not in inputs:
            raise KeyError(f"the batch has no {INDICES_KEY!r}: KCDTrainer's training_step needs its own train loader")
        indices = inputs.pop(INDICES_KEY)
        if self._kcd_infobatch:
            self._kcd_indices, self._kcd_losses = indices, None
            try:
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._kcd_indices = None
            losses, self._kcd_losses = self._kcd_losses, None
            if losses is None:
                raise RuntimeError(
                    "KCDTrainer with an InfoBatchSchedule scores each sample's loss: your compute_loss must return "
                    "self.kcd_infobatch_loss(per_sample_losses) (losses [B], e.g. reduction='none')"
                )
            self.kcd_loader.observe_scores(indices, losses)
            return loss
        self._kcd_hook_model()
        self._kcd_logits, self._kcd_capturing = None, True
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._kcd_capturing = False
        logits, self._kcd_logits = self._kcd_logits, None
        if logits is None:
            raise RuntimeError(
                "KCDTrainer saw no logits in this training step: the model's forward returned no `logits` "
                "(or was not called on trainer.model)"
            )
        mask = None
        if logits.dim() == 3:
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        self.kcd_loader.observe(indices, logits.detach(), mask=mask)
        return loss

    # -- InfoBatch ---------------------------------------------------------------------------
    def kcd_infobatch_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """``(losses * loader.weights(indices)).mean()`` for the batch in training, and records
        ``losses`` ``[B]`` (per-sample, before weighting) as the batch's InfoBatch scores."""
        if self._kcd_indices is None:
            raise RuntimeError("kcd_infobatch_loss is for compute_loss inside KCDTrainer's training_step")
        if not isinstance(losses, torch.Tensor) or losses.shape != self._kcd_indices.shape:
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a [B] tensor, B = {self._kcd_indices.shape[0]}, got {got}")
        self._kcd_losses = losses.detach()
        weights = self.kcd_loader.weights(self._kcd_indices).to(losses.device, losses.dtype)
        return (losses * weights).mean()

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not (self._kcd_infobatch and model.training and self._kcd_indices is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)
        if "labels" not in inputs:
            raise ValueError("KCDTrainer with an InfoBatchSchedule needs labels in the batch (per-sample losses)")
        labels = inputs["labels"]
        outputs = model(**inputs)
        logits = logits_of(outputs)
        if logits is None:
            raise RuntimeError("KCDTrainer saw no logits in the model's output: it needs them for per-sample losses")
        loss = self.kcd_infobatch_loss(per_sample_loss(logits, labels))
        return (loss, outputs) if return_outputs else loss


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 cross-entropy per sample: ``logits`` ``[B, C]`` against ``labels`` ``[B]``,
    or a causal LM's ``[B, L, V]`` against ``[B, L]`` (shifted by one, ``-100`` ignored): the mean
    over the sequence's counted tokens (0 for a sequence without any)."""
    if logits.dim() == 2:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"per-sample losses need [B, C] logits with [B] labels or [B, L, V] with [B, L], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shifted, target = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), target, ignore_index=-100, reduction="none")
    counted = (target != -100).sum(1)
    return tok.sum(1) / counted.clamp(min=1)
