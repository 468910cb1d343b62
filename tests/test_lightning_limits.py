"""Lightning Trainer options that change how many batches an epoch trains, with a real
Trainer (CPU, tiny data): each is either followed exactly (every epoch trains the schedule's
points, the condensations rank observed points, the loader ends where the schedule ends) or
refused by KCDCallback when fit starts, before any batch, with a message naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader  # noqa: E402
from kcd_fast.integrations.lightning import KCDCallback  # noqa: E402

N, C, B = 60, 5, 8
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.7)  # epochs of 8, 7, 6, 6, 6, 6 batches
_rng = np.random.default_rng(1)
IMAGES = _rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
LABELS = _rng.integers(0, C, N)


class Student(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(48, C)
        self.loader = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=5)
        self.trained: list[tuple[int, int]] = []  # (epoch, points)

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.net(x.flatten(1))
        self.trained.append((self.current_epoch, len(idx)))
        return {"loss": torch.nn.functional.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, callbacks: list | None = None, **options) -> pl.Trainer:
    """A quiet CPU Trainer over the schedule's epochs with KCDCallback (after ``callbacks``)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=options.pop("max_epochs", SCHED.epochs),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[*(callbacks or []), KCDCallback()],
        **options,
    )


def _fit(tmp_path, **options) -> tuple[Student, object]:
    module = Student()
    trainer = _trainer(tmp_path, **options)
    trainer.fit(module)
    return module, trainer


def _followed_exactly(module: Student) -> None:
    per_epoch = [sum(p for e, p in module.trained if e == k) for k in range(SCHED.epochs)]
    assert per_epoch == SCHED.epoch_sizes(N)
    loader = module.loader
    assert loader.epoch == SCHED.epochs  # the loader ended where the schedule ends
    assert [h["epoch"] for h in loader.history] == list(SCHED.condensation_epochs)
    assert int(loader.bank.counts.sum()) == sum(SCHED.epoch_sizes(N))  # every batch observed once


def _updates(acc: int) -> int:
    steps = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B).steps_per_epoch()
    return sum(-(-s // acc) for s in steps)


@pytest.mark.parametrize("acc", [3, 4])  # partial last groups: 8 % 3, 7 % 3, 6 % 4 ...
def test_accumulate_grad_batches_is_followed_with_partial_last_groups(tmp_path, acc: int) -> None:
    module, trainer = _fit(tmp_path, accumulate_grad_batches=acc)
    _followed_exactly(module)
    assert trainer.global_step == _updates(acc)  # Lightning steps on each epoch's last, partial group
    assert module.loader.total_steps(acc) == trainer.global_step  # what to size an LR schedule with


def test_max_steps_that_fits_the_schedule_is_followed(tmp_path) -> None:
    module, trainer = _fit(tmp_path, max_steps=_updates(2), accumulate_grad_batches=2)
    _followed_exactly(module)
    assert trainer.global_step == _updates(2)


def test_int_limit_train_batches_that_cuts_nothing_is_followed(tmp_path) -> None:
    module, _ = _fit(tmp_path, limit_train_batches=8)  # the longest epoch has 8 batches
    _followed_exactly(module)


class OneCycleStudent(Student):
    """Sizes OneCycleLR the way Lightning's docs do, or with the loader's optimizer steps."""

    def __init__(self, sized_by: str) -> None:
        super().__init__()
        self.sized_by = sized_by

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        acc = self.trainer.accumulate_grad_batches
        if self.sized_by == "lightning":
            total = self.trainer.estimated_stepping_batches
        elif self.sized_by == "loader":
            total = self.loader.total_steps(acc, epochs=self.trainer.max_epochs)
        else:  # the whole schedule, for a run of fewer epochs
            total = self.loader.total_steps(acc)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=int(total))
        return [opt], [{"scheduler": sched, "interval": "step"}]


@pytest.mark.parametrize("acc", [1, 3])
def test_an_lr_schedule_sized_by_estimated_stepping_batches_warns(tmp_path, acc: int) -> None:
    """estimated_stepping_batches assumes every epoch is as long as the first (8 batches here, then
    7, 6, ...): OneCycleLR sized with it never finishes annealing. Sized with total_steps it does."""
    import warnings

    for sized_by in ("lightning", "loader"):
        module = OneCycleStudent(sized_by)
        trainer = _trainer(tmp_path, accumulate_grad_batches=acc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module)
        ours = [str(w.message) for w in caught if "OneCycleLR(total_steps=" in str(w.message)]
        steps = module.loader.total_steps(acc)
        assert trainer.global_step == steps
        sched = trainer.lr_scheduler_configs[0].scheduler
        if sized_by == "lightning":
            assert len(ours) == 1 and f"the KCD schedule takes {steps}" in ours[0], ours
            assert "never finishes annealing" in ours[0] and "loader.total_steps(" in ours[0]
            assert sched.total_steps - sched.last_epoch > 1  # steps of its cycle never taken
        else:
            assert ours == []
            assert sched.total_steps - sched.last_epoch <= 1  # its cycle ran to the end


class ValStudent(Student):
    """A Student with a validation loop."""

    def val_dataloader(self):
        x = torch.from_numpy(IMAGES[:8]).float().flatten(1) / 255
        return torch.utils.data.DataLoader(list(zip(x, torch.from_numpy(LABELS[:8]), strict=True)), batch_size=4)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))


class Record(pl.Callback):
    """The global step of every validation and Lightning's epoch length at every epoch start."""

    def __init__(self) -> None:
        self.validated: list[int] = []
        self.lengths: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lengths.append(trainer.num_training_batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validated.append(trainer.global_step)


def validation_steps(lengths: list[int], every: float | int, per_epoch: bool = True) -> list[int]:
    """Where Lightning validates when each epoch's length is known: a float ``every`` is a
    fraction of the epoch (``max(1, int(length * every))`` batches), an int a batch count,
    counted within the epoch (``per_epoch``) or over the whole run."""
    out, total = [], 0
    for length in lengths:
        k = max(1, int(length * every)) if isinstance(every, float) else every
        for b in range(1, length + 1):
            if (b if per_epoch else total + b) % k == 0:
                out.append(total + b)
        total += length
    return out


def test_an_lr_schedule_sized_for_the_whole_schedule_in_a_shorter_run_warns_with_the_fix(tmp_path) -> None:
    import warnings

    for sized_by in ("schedule", "loader"):
        module = OneCycleStudent(sized_by)
        trainer = _trainer(tmp_path, max_epochs=4, accumulate_grad_batches=3)  # 4 of the schedule's 6 epochs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module)
        ours = [str(w.message) for w in caught if "OneCycleLR(total_steps=" in str(w.message)]
        assert trainer.global_step == module.loader.total_steps(3, epochs=4)
        if sized_by == "schedule":
            assert len(ours) == 1, ours
            assert "loader.total_steps(trainer.accumulate_grad_batches, epochs=trainer.max_epochs)" in ours[0]
        else:
            assert ours == []


@pytest.mark.parametrize(
    "options",
    [{}, {"val_check_interval": 0.5}, {"val_check_interval": 0.3}, {"val_check_interval": 3}],
    ids=["default", "half", "0.3", "int3"],
)
def test_validation_follows_every_epochs_own_length(tmp_path, options) -> None:
    """Lightning reads len(loader) once; KCD's epochs shrink (8, 7, 6 ... batches). With the
    default val_check_interval=1.0, validation must still run at every epoch's end (not at
    epoch 0's alone), and a fraction must be a fraction of each epoch."""
    module, record = ValStudent(), Record()
    trainer = _trainer(tmp_path, [record], num_sanity_val_steps=0, **options)
    trainer.fit(module)
    _followed_exactly(module)
    lengths = module.loader.steps_per_epoch()
    assert record.lengths == lengths  # the progress bar's total, epoch by epoch
    every = options.get("val_check_interval", 1.0)
    assert record.validated == validation_steps(lengths, every)
    if every == 1.0:
        assert record.validated == np.cumsum(lengths).tolist()


def test_int_validation_interval_across_epochs_is_followed(tmp_path) -> None:
    """check_val_every_n_epoch=None counts batches over the run: an interval longer than the
    later epochs is fine there."""
    module, record = ValStudent(), Record()
    trainer = _trainer(tmp_path, [record], num_sanity_val_steps=0, val_check_interval=7, check_val_every_n_epoch=None)
    trainer.fit(module)
    _followed_exactly(module)
    assert record.validated == validation_steps(module.loader.steps_per_epoch(), 7, per_epoch=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"val_check_interval": 7},
            r"Trainer\(val_check_interval=7\) validates after every 7 batches of an epoch, but the KCD epochs shrink "
            r"to 6 batches on this rank \(\[8, 7, 6, 6, 6, 6\]\).*val_check_interval <= 6",
        ),
        ({"limit_train_batches": 0.5}, r"Trainer\(limit_train_batches=0.5\) makes Lightning train a fixed number"),
        ({"limit_train_batches": 5}, r"Trainer\(limit_train_batches=5\) cuts the KCD epochs \(the longest has 8"),
        ({"max_steps": _updates(1) - 1}, rf"Trainer\(max_steps={_updates(1) - 1}\) stops before the KCD schedule"),
        (
            {"max_steps": _updates(3) - 1, "accumulate_grad_batches": 3},
            rf"take {_updates(3)} optimizer steps .*accumulate_grad_batches=3.*max_steps >= {_updates(3)}",
        ),
        ({"max_time": {"minutes": 30}}, r"Trainer\(max_time=...\) \(a Timer of 1800 s\) stops training mid-schedule"),
        ({"fast_dev_run": 2}, r"Trainer\(fast_dev_run=2\) trains 2 batch\(es\) per epoch"),
    ],
)
def test_options_that_would_break_the_schedule_are_refused_before_training(tmp_path, options, message) -> None:
    module = Student()
    trainer = _trainer(tmp_path, **options)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module)
    assert module.trained == [] and module.loader.epoch == 0 and not module.loader.history
