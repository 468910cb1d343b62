"""KCD in the real Hugging Face Trainer (CPU, tiny generated token data): the epochs train
exactly the schedule's points, the optimizer steps equal the planned total and the LR
schedule ends on time, mid-epoch checkpoints resume exactly, a user's own compute_loss
(distillation from a teacher) keeps working, and [B, L, V] logits are scored per sequence
under the attention mask."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from kcd_fast import CondensationSchedule  # noqa: E402
from kcd_fast import _reference as R  # noqa: E402
from kcd_fast.integrations.hf import CHECKPOINT_FILE, KCDTrainer  # noqa: E402

N, L, V, C = 48, 6, 50, 3
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.7)


def _data(labels: str = "class") -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    lens = rng.integers(2, L + 1, N)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int64)
    ids = rng.integers(1, V, (N, L)) * mask
    y = rng.integers(0, C, N)
    out = []
    for i in range(N):
        d = {"input_ids": torch.tensor(ids[i]), "attention_mask": torch.tensor(mask[i])}
        d["labels"] = torch.tensor(np.where(mask[i] > 0, ids[i], -100)) if labels == "lm" else int(y[i])
        out.append(d)
    return out


def _classifier(hidden: int = 16) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=C,
        max_position_embeddings=16,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _args(out: Path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(out),
        "num_train_epochs": SCHED.epochs,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**base, **kw})


class EpochCounts(TrainerCallback):
    """Observations in the bank at every epoch's end."""

    def __init__(self) -> None:
        self.trainer = None
        self.counts: list[int] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.counts.append(int(self.trainer.kcd_loader.bank.counts.sum()))


class StepEpochs(TrainerCallback):
    """state.epoch (the fractional epoch of logs and callbacks) after every optimizer step."""

    def __init__(self) -> None:
        self.epochs: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.epochs[state.global_step] = state.epoch


def _trainer(out: Path, model=None, cls=KCDTrainer, data=None, **kw) -> KCDTrainer:
    t = cls(
        model=model if model is not None else _classifier(),
        args=_args(out, **kw),
        train_dataset=data if data is not None else _data(),
        data_collator=default_data_collator,
        kcd_schedule=SCHED,
        kcd_options={"seed": 1},
    )
    return t


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    t = _trainer(out, save_strategy="steps", save_steps=4)
    counts = EpochCounts()
    counts.trainer = t
    t.add_callback(counts)
    t.kcd_step_epochs = StepEpochs()
    t.add_callback(t.kcd_step_epochs)
    t.train()
    return t, counts, out


def test_epochs_steps_and_lr_follow_the_schedule(uninterrupted) -> None:
    t, counts, _ = uninterrupted
    assert np.diff([0, *counts.counts]).tolist() == SCHED.epoch_sizes(N)
    assert [h["epoch"] for h in t.kcd_loader.history] == list(SCHED.condensation_epochs)
    planned = sum(math.ceil(s / 2) for s in t.kcd_loader.steps_per_epoch())
    assert t.state.global_step == t.state.max_steps == planned
    assert t.lr_scheduler.get_last_lr()[0] == 0.0  # the linear schedule ends exactly at the last step


@pytest.mark.parametrize("step", [4, 8, 12])  # mid-epoch 1, 2, 3 (3, 3, 3, 3, 3, 3 updates per epoch)
def test_mid_epoch_checkpoint_resumes_exactly(uninterrupted, tmp_path, step: int) -> None:
    ref, _, out = uninterrupted
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / CHECKPOINT_FILE).is_file()
    t = _trainer(tmp_path)
    epochs = StepEpochs()
    t.add_callback(epochs)
    t.train(resume_from_checkpoint=str(ckpt))
    # the resumed epoch's fraction counts the batches trained before the checkpoint
    assert epochs.epochs == {k: v for k, v in ref.kcd_step_epochs.epochs.items() if k > step}
    for (name, a), b in zip(ref.model.state_dict().items(), t.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = ref.kcd_loader.state_dict(), t.kcd_loader.state_dict()
    assert torch.equal(sa["bank"]["sums"], sb["bank"]["sums"]) and sa["history"] == sb["history"]
    assert t.state.global_step == ref.state.global_step


class DistillTrainer(KCDTrainer):
    """A user's own compute_loss: KL to a frozen teacher plus the label loss."""

    teacher: torch.nn.Module

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        out = model(**inputs)
        kd = torch.nn.functional.kl_div(
            torch.log_softmax(out.logits / 4, -1), torch.softmax(t_logits / 4, -1), reduction="batchmean"
        )
        loss = 0.5 * kd * 16 + 0.5 * torch.nn.functional.cross_entropy(out.logits, labels)
        return (loss, out) if return_outputs else loss


def test_user_compute_loss_with_a_teacher_keeps_working(tmp_path) -> None:
    t = _trainer(tmp_path, cls=DistillTrainer, gradient_accumulation_steps=1)
    t.teacher = _classifier(hidden=32).eval()
    counts = EpochCounts()
    counts.trainer = t
    t.add_callback(counts)
    t.train()
    assert np.diff([0, *counts.counts]).tolist() == SCHED.epoch_sizes(N)
    assert len(t.kcd_loader.history) == len(SCHED.condensation_epochs)
    assert t.state.global_step == t.kcd_loader.total_steps()  # one optimizer step per batch


class TupleOutput(torch.nn.Module):
    """A model whose forward returns a tuple, as HF models do with return_dict=False:
    ``(loss, logits)`` when labels are passed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).to_tuple()


def test_a_model_returning_a_loss_logits_tuple_is_scored_on_its_logits(uninterrupted, tmp_path) -> None:
    """The plain Trainer accepts (loss, logits) tuples; KCD must score the logits, not the loss."""
    ref, _, _ = uninterrupted
    t = _trainer(tmp_path, model=TupleOutput(_classifier()))
    t.train()
    assert t.state.global_step == ref.state.global_step
    assert torch.equal(t.kcd_loader.bank.counts, ref.kcd_loader.bank.counts)
    # the wrapper has no HF config, so the Trainer scales the accumulated loss a little differently:
    # the same entropies to ~1e-4, where the loss (a scalar) would have failed as [B, C] logits
    torch.testing.assert_close(t.kcd_loader.bank.sums, ref.kcd_loader.bank.sums, rtol=1e-3, atol=0)


def test_model_init_builds_a_model_that_is_observed(uninterrupted, tmp_path) -> None:
    """train() replaces the model when model_init is given (and per trial in hyperparameter_search):
    the new model's logits are observed like the first model's."""
    ref, _, _ = uninterrupted
    t = KCDTrainer(
        model_init=lambda: _classifier(),
        args=_args(tmp_path),
        train_dataset=_data(),
        data_collator=default_data_collator,
        kcd_schedule=SCHED,
        kcd_options={"seed": 1},
    )
    counts = EpochCounts()
    counts.trainer = t
    t.add_callback(counts)
    t.train()
    assert t.state.global_step == ref.state.global_step
    assert np.diff([0, *counts.counts]).tolist() == SCHED.epoch_sizes(N)  # every batch of every epoch observed
    assert [h["epoch"] for h in t.kcd_loader.history] == list(SCHED.condensation_epochs)


def test_sequence_logits_are_scored_under_the_attention_mask(tmp_path) -> None:
    data = _data(labels="lm")
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    t = _trainer(tmp_path, model=model, data=data, learning_rate=0.0, num_train_epochs=1)
    t.train()
    # lr = 0: the model is the same at every step, so each sequence's score is computable here
    model.eval()
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        mask = torch.stack([d["attention_mask"] for d in data])
        logits = model(input_ids=ids, attention_mask=mask).logits
    ref = R.sequence_entropy(logits.numpy(), mask.numpy())
    bank = t.kcd_loader.bank
    assert bank.counts.tolist() == [1] * N  # once per sequence, not per token
    np.testing.assert_allclose(bank.sums.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_refused(uninterrupted, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"leave max_steps unset \(got 5\)"):
        _trainer(tmp_path, max_steps=5).train()
    with pytest.raises(ValueError, match=r"num_train_epochs = 2.5: KCDTrainer runs whole KCD epochs"):
        _trainer(tmp_path, num_train_epochs=2.5).train()
    with pytest.raises(ValueError, match="num_train_epochs = 7 must be between 1 and the KCD schedule's 6 epochs"):
        _trainer(tmp_path, num_train_epochs=7).train()
    with pytest.raises(ValueError, match=r"kcd_options \['batch_size'\] come from TrainingArguments"):
        KCDTrainer(
            model=_classifier(),
            args=_args(tmp_path),
            train_dataset=_data(),
            kcd_schedule=SCHED,
            kcd_options={"batch_size": 4},
        )
    foreign = tmp_path / "checkpoint-4"  # a Trainer checkpoint without the loader's state
    shutil.copytree(uninterrupted[2] / "checkpoint-4", foreign)
    (foreign / CHECKPOINT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {CHECKPOINT_FILE}: it was not saved by a KCDTrainer"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(foreign))


@pytest.mark.slow
def test_torchrun_two_ranks_shard_the_epochs(tmp_path) -> None:
    script = Path(__file__).parent / "scripts" / "hf_ddp.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    out = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    sizes = CondensationSchedule(epochs=4, period=2, rho=0.7).epoch_sizes(48)
    assert all(r["dist"] and r["world"] == 2 for r in ranks)
    for e, size in enumerate(sizes):
        shards = [sum((i for ep, i in r["seen"] if ep == e), []) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == -(-size // 2)
        assert len(set(shards[0]) | set(shards[1])) == size
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["steps"] == ranks[1]["steps"]
