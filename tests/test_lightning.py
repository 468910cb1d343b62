"""KCD in real PyTorch Lightning (CPU, tiny data): the epochs train exactly the schedule's
points, the condensations happen, the steps add up to total_steps(), a mid-epoch
checkpoint resumes to the same result as an uninterrupted run, and DDP shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader  # noqa: E402
from kcd_fast.integrations.lightning import KCDCallback  # noqa: E402

N, C = 60, 5
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.7)
_rng = np.random.default_rng(0)
IMAGES = _rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
LABELS = _rng.integers(0, C, N)


class Student(pl.LightningModule):
    def __init__(self, output: str = "dict") -> None:
        super().__init__()
        self.net = torch.nn.Linear(48, C)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.net.weight.copy_(torch.randn(C, 48, generator=g) * 0.1)
            self.net.bias.zero_()
        self.loader = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=8, shuffle=True, seed=3)
        self.output = output
        self.trained: list[tuple[int, list[int]]] = []

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.net(x.flatten(1))
        self.trained.append((self.current_epoch, idx.tolist()))
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss if self.output == "loss" else {"loss": loss, "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root: Path, callbacks=(), max_epochs: int = SCHED.epochs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[KCDCallback(), *callbacks],
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    module = Student()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = _trainer(root, [ckpt])
    trainer.fit(module)
    return module, trainer, root / "ckpt"


def test_epochs_train_the_schedule_and_steps_add_up(uninterrupted) -> None:
    module, trainer, _ = uninterrupted
    per_epoch = [sum(len(i) for e, i in module.trained if e == k) for k in range(SCHED.epochs)]
    assert per_epoch == SCHED.epoch_sizes(N)
    for k in range(SCHED.epochs):  # every point of an epoch once
        pts = sum((i for e, i in module.trained if e == k), [])
        assert len(set(pts)) == len(pts)
    assert [h["epoch"] for h in module.loader.history] == list(SCHED.condensation_epochs)
    assert trainer.global_step == module.loader.total_steps()
    assert int(module.loader.bank.counts.sum()) == sum(SCHED.epoch_sizes(N))  # every batch observed once


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # Lightning's, about its own callback
@pytest.mark.parametrize("step", [5, 10, 20, 35])  # mid-epoch 0, 1, 2 and 5 (epochs of 8, 7, 6, 6, 6, 6 batches)
def test_mid_epoch_checkpoint_resumes_exactly(uninterrupted, tmp_path, step: int) -> None:
    ref, ref_trainer, ckpt_dir = uninterrupted
    module = Student()
    same_checkpointing = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    _trainer(tmp_path, [same_checkpointing]).fit(module, ckpt_path=str(ckpt_dir / f"step={step}.ckpt"))
    for a, b in zip(ref.parameters(), module.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = ref.loader.state_dict(), module.loader.state_dict()
    assert torch.equal(sa["bank"]["sums"], sb["bank"]["sums"]) and torch.equal(
        sa["bank"]["counts"], sb["bank"]["counts"]
    )
    assert sa["history"] == sb["history"] and torch.equal(sa["active"], sb["active"])
    assert torch.equal(ref.loader.images, module.loader.images)
    # the resumed run trained exactly the batches the interrupted one had not
    assert ref.trained[step:] == module.trained


def test_callback_errors_name_what_to_change(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=7\) runs past the KCD schedule's 6 epochs"):
        _trainer(tmp_path, max_epochs=7).fit(Student())
    with pytest.raises(ValueError, match="has no 'logits' .* return e.g."):
        _trainer(tmp_path).fit(Student(output="loss"))

    class Plain(Student):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([(torch.zeros(4, 4, 3), 0, 0)] * 4, batch_size=2)

    with pytest.raises(TypeError, match="to return a kcd_fast.KCDLoader, got DataLoader"):
        _trainer(tmp_path).fit(Plain())


@pytest.mark.slow
def test_ddp_strategy_shards_and_does_not_rewrap(tmp_path) -> None:
    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    sizes = CondensationSchedule(epochs=4, period=2, rho=0.7).epoch_sizes(60)
    assert all(r["distributed"] and r["world"] == 2 for r in ranks)
    for e, size in enumerate(sizes):
        shards = [sum((i for ep, i in r["seen"] if ep == e), []) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == -(-size // 2)  # the loader's shards, not a DistributedSampler's
        assert len(set(shards[0]) | set(shards[1])) == size
    assert ranks[0]["history"] == ranks[1]["history"]
