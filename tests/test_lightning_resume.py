"""Lightning resumes exactly from every checkpoint it writes (real Lightning, CPU, tiny data):
the default ``ModelCheckpoint`` at an epoch's end, checkpoints at a validation's end (mid-epoch
and at the epoch's end), and a callback of the user's that saves in ``on_train_batch_end``,
listed before or after ``KCDCallback``. Each resumed run is compared with one uninterrupted
run: the batches trained (their indices), the weights, the value bank, the active set, the
history and the summarised images, bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader  # noqa: E402
from kcd_fast.integrations.lightning import KCDCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The dirpath has changed", "ignore:.*LeafSpec.*is deprecated", "ignore:.*does not have many workers"
)

N, C = 60, 5
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.7)  # epochs of 8, 7, 6, 6, 6, 6 batches of 8
ENDS = np.cumsum([-(-s // 8) for s in SCHED.epoch_sizes(N)]).tolist()  # global step at each epoch's end
_rng = np.random.default_rng(0)
IMAGES = _rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
LABELS = _rng.integers(0, C, N)


class Student(pl.LightningModule):
    def __init__(self, validate: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Linear(48, C)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.net.weight.copy_(torch.randn(C, 48, generator=g) * 0.1)
            self.net.bias.zero_()
        self.loader = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=8, shuffle=True, seed=3)
        self.validate = validate
        self.trained: list[tuple[int, list[int]]] = []

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.net(x.flatten(1))
        self.trained.append((self.current_epoch, idx.tolist()))
        return {"loss": torch.nn.functional.cross_entropy(logits, y), "logits": logits}

    def val_dataloader(self):
        x = torch.from_numpy(IMAGES[:8]).float().flatten(1) / 255
        return torch.utils.data.DataLoader(list(zip(x, torch.from_numpy(LABELS[:8]), strict=True)), batch_size=4)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Saver(Callback):
    """A user's callback that saves a checkpoint in on_train_batch_end at chosen steps."""

    def __init__(self, folder: Path, steps: tuple[int, ...]) -> None:
        self.folder, self.steps = folder, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.folder / f"step={trainer.global_step}.ckpt")


def _fit(root: Path, callbacks: list[Any], module: Student, ckpt: Path | None = None, **kw: Any) -> Student:
    validate = module.validate
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=SCHED.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        default_root_dir=root,
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(module, ckpt_path=None if ckpt is None else str(ckpt))
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Student:
    """The uninterrupted run: no checkpoints at all."""
    return _fit(tmp_path_factory.mktemp("ref"), [KCDCallback()], Student())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three interrupted-run sources: the default ModelCheckpoint at every epoch's end (and
    a saver BEFORE KCDCallback), a saver AFTER it, and validation-end checkpoints (twice an
    epoch: mid-epoch and at its end)."""
    root = tmp_path_factory.mktemp("runs")
    out = {k: root / k for k in ("epoch", "before", "after", "val")}
    steps = (5, ENDS[0], ENDS[1])  # mid-epoch 0, the last batch of epochs 0 and 1
    every_epoch = ModelCheckpoint(dirpath=out["epoch"], save_top_k=-1, filename="{epoch}")
    _fit(root, [Saver(out["before"], steps), KCDCallback(), every_epoch], Student())
    _fit(root, [KCDCallback(), Saver(out["after"], steps)], Student())
    at_val = ModelCheckpoint(dirpath=out["val"], save_top_k=-1, filename="{step}")
    _fit(root, [KCDCallback(), at_val], Student(validate=True), val_check_interval=0.5)
    return out


def _assert_same_run(ref: Student, module: Student, step: int) -> None:
    assert module.trained == ref.trained[step:]  # exactly the batches not yet trained, same indices
    for a, b in zip(ref.parameters(), module.parameters(), strict=True):
        assert torch.equal(a, b)
    for m in (ref, module):  # the last epoch's condensation, if it has not run yet (in step: no warning)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m.loader.set_epoch(SCHED.epochs)
    sa, sb = ref.loader.state_dict(), module.loader.state_dict()
    assert sa["epoch"] == sb["epoch"] == SCHED.epochs
    for key in ("sums", "counts"):
        assert torch.equal(sa["bank"][key], sb["bank"][key])
    assert torch.equal(sa["active"], sb["active"]) and sa["history"] == sb["history"]
    assert torch.equal(ref.loader.images, module.loader.images)


@pytest.mark.parametrize("epoch", [0, 2, 5])
def test_resume_from_the_default_epoch_end_checkpoint(reference, runs, tmp_path, epoch: int) -> None:
    module = _fit(tmp_path, [KCDCallback()], Student(), runs["epoch"] / f"epoch={epoch}.ckpt")
    _assert_same_run(reference, module, ENDS[epoch])


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_resume_from_a_saver_callback_in_either_order(reference, runs, tmp_path, order: str, k: int) -> None:
    step = (5, ENDS[0], ENDS[1])[k]
    module = _fit(tmp_path, [KCDCallback()], Student(), runs[order] / f"step={step}.ckpt")
    _assert_same_run(reference, module, step)


# val_check_interval=0.5 of each epoch's own length (KCDCallback sizes every epoch for Lightning): after 4 and 8
# of epoch 0's 8 batches, after 3 and 6 of epoch 1's 7, after 3 and 6 of epoch 2's 6 (its end), ...
@pytest.mark.parametrize("step", [4, ENDS[0], ENDS[0] + 3, ENDS[1] + 3, ENDS[2]])
def test_resume_from_validation_end_checkpoints(reference, runs, tmp_path, step: int) -> None:
    module = _fit(tmp_path, [KCDCallback()], Student(validate=True), runs["val"] / f"step={step}.ckpt")
    _assert_same_run(reference, module, step)


class ValSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def test_a_resumed_run_validates_where_the_uninterrupted_one_does(tmp_path) -> None:
    """Resumed mid-epoch 1 (7 batches; Lightning sees no epoch start for it), validation at 0.5
    still falls after 3 and 6 of its batches, then halfway through and at the end of each
    6-batch epoch: the uninterrupted run's steps after the checkpoint's."""
    ref = ValSteps()
    _fit(tmp_path / "ref", [KCDCallback(), ref], Student(validate=True), val_check_interval=0.5)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=ENDS[0] + 1)
    _fit(tmp_path / "a", [KCDCallback(), every], Student(validate=True), val_check_interval=0.5)
    resumed = ValSteps()
    ckpt = tmp_path / "ckpt" / f"epoch=1-step={ENDS[0] + 1}.ckpt"
    _fit(tmp_path / "b", [KCDCallback(), resumed], Student(validate=True), ckpt, val_check_interval=0.5)
    assert ref.steps == [4, 8, 11, 14, 18, 21, 24, 27, 30, 33, 36, 39]
    assert resumed.steps == [s for s in ref.steps if s > ENDS[0] + 1]


class Steps(Callback):
    """Validations (global step), optimizer steps per epoch, and Lightning's epoch length per epoch."""

    def __init__(self) -> None:
        self.validated: list[tuple[int, int]] = []  # (epoch, batch index)
        self.stepped: dict[int, int] = {}
        self.lengths: dict[int, int] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validated.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.stepped[trainer.current_epoch] = self.stepped.get(trainer.current_epoch, 0) + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lengths[trainer.current_epoch] = trainer.num_training_batches


@pytest.mark.parametrize("at", [0, 1])
def test_resume_from_an_epochs_last_batch_into_a_shorter_epoch(tmp_path, at: int) -> None:
    """A checkpoint saved in on_train_batch_end on an epoch's last batch (a saver callback,
    every_n_train_steps, save_on_exception): Lightning resumes straight into the next, shorter
    epoch without on_train_epoch_start. It must still validate at that epoch's end and step
    the optimizer on its last, partial accumulation group, as the uninterrupted run does."""
    kw = {"val_check_interval": 1.0, "accumulate_grad_batches": 4}
    ref = Steps()
    want = _fit(tmp_path / "ref", [KCDCallback(), ref], Student(validate=True), **kw)
    lengths = want.loader.steps_per_epoch()
    ckpt = tmp_path / "last_batch.ckpt"

    class SaveLastBatch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.current_epoch == at and batch_idx == lengths[at] - 1:
                trainer.save_checkpoint(ckpt)

    _fit(tmp_path / "a", [KCDCallback(), SaveLastBatch()], Student(validate=True), **kw)
    got = Steps()
    module = _fit(tmp_path / "b", [KCDCallback(), got], Student(validate=True), ckpt, **kw)
    assert ref.validated == [(e, n - 1) for e, n in enumerate(lengths)]
    assert ref.stepped == {e: -(-n // 4) for e, n in enumerate(lengths)}
    assert got.validated == ref.validated[at + 1 :]
    assert got.stepped == {e: n for e, n in ref.stepped.items() if e > at}
    assert got.lengths == {e: n for e, n in enumerate(lengths) if e > at}
    assert module.trained == want.trained[ENDS[at] :]
    for a, b in zip(want.parameters(), module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("batches", "warns"), [(4, True), (6, False), (8, False)])  # epoch 0 has 8
def test_a_resume_inside_an_accumulation_group_warns(tmp_path, batches: int, warns: bool) -> None:
    """Lightning saves no accumulated gradients: a checkpoint inside a group of 3 (after 4 batches)
    loses that group's first batch in its step, with or without KCD; say so. After 6 (a step) or
    at the epoch's end (its last, partial group stepped) there is nothing to say."""
    import warnings

    ckpt = tmp_path / "mid.ckpt"

    class SaveAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.current_epoch == 0 and batch_idx == batches - 1:
                trainer.save_checkpoint(ckpt)

    _fit(tmp_path / "a", [KCDCallback(), SaveAt()], Student(), accumulate_grad_batches=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", [KCDCallback()], Student(), ckpt, accumulate_grad_batches=3)
    ours = [str(w.message) for w in caught if "inside a group of accumulate_grad_batches" in str(w.message)]
    if warns:
        assert len(ours) == 1 and ours[0].startswith("resumed 4 batches into epoch 0, inside a group of"), ours
        assert "the group's first 1 batch(es) will not count" in ours[0]
    else:
        assert ours == []


def test_a_checkpoint_without_the_callback_state_resumes_from_the_fit_loop_state(reference, runs, tmp_path) -> None:
    """A checkpoint written before KCDCallback kept the loader state: the fit loop's copy."""
    ckpt = torch.load(runs["epoch"] / "epoch=2.ckpt", weights_only=False)
    assert any("KCDCallback" in k for k in ckpt["callbacks"])
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "KCDCallback" not in k}
    torch.save(ckpt, tmp_path / "old.ckpt")
    module = _fit(tmp_path, [KCDCallback()], Student(), tmp_path / "old.ckpt")
    _assert_same_run(reference, module, ENDS[2])


def test_the_callback_observes_before_other_callbacks(tmp_path) -> None:
    saver, kcd = Saver(tmp_path, ()), KCDCallback()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[saver, kcd])
    kcd.setup(trainer, Student(), "fit")
    assert trainer.callbacks.index(kcd) < trainer.callbacks.index(saver)
