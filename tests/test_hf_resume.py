"""The Hugging Face Trainer resumes exactly from its epoch-end checkpoints
(``save_strategy="epoch"``): the batches trained (their indices), the weights, the value
bank, the active set and the history equal those of an uninterrupted run, bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_hf import _trainer  # noqa: E402

from kcd_fast.integrations.hf import INDICES_KEY, KCDTrainer  # noqa: E402


class Recording(KCDTrainer):
    """Records the indices of every batch it trains."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.trained.append(inputs[INDICES_KEY].tolist())
        return super().training_step(model, inputs, *args, **kwargs)


EPOCHS = 3  # of the schedule's 6: enough for a condensation after each checkpoint


def _run(out: Path, resume: Path | None = None, **kw) -> Recording:
    t = _trainer(out, cls=Recording, num_train_epochs=EPOCHS, **kw)
    t.trained = []
    t.train(resume_from_checkpoint=None if resume is None else str(resume))
    return t


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Recording, Path]:
    ref = _run(tmp_path_factory.mktemp("hf_ref"))  # uninterrupted: no checkpoints
    out = tmp_path_factory.mktemp("hf_epochs")
    _run(out, save_strategy="epoch")
    return ref, out


@pytest.mark.parametrize("epoch", [0, 1, EPOCHS - 1])
def test_epoch_end_checkpoint_resumes_exactly(runs, tmp_path, epoch: int) -> None:
    ref, out = runs
    steps = ref.kcd_loader.steps_per_epoch()
    updates = sum(-(-s // 2) for s in steps[: epoch + 1])  # gradient_accumulation_steps = 2
    t = _run(tmp_path, out / f"checkpoint-{updates}")
    assert t.trained == ref.trained[sum(steps[: epoch + 1]) :]
    for (name, a), b in zip(ref.model.state_dict().items(), t.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for loader in (ref.kcd_loader, t.kcd_loader):  # the last condensation, if due (in step: no warning)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.set_epoch(EPOCHS)
    sa, sb = ref.kcd_loader.state_dict(), t.kcd_loader.state_dict()
    assert sa["epoch"] == sb["epoch"] == EPOCHS
    assert torch.equal(sa["bank"]["sums"], sb["bank"]["sums"]) and torch.equal(
        sa["bank"]["counts"], sb["bank"]["counts"]
    )
    assert torch.equal(sa["active"], sb["active"]) and sa["history"] == sb["history"]
    assert t.state.global_step == ref.state.global_step
