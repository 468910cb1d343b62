"""KCD with the Hugging Face Trainer: a small text classifier distilled from a larger one on
generated token data. KCDTrainer replaces Trainer; your compute_loss (distillation from
the teacher) stays as it is.

    python examples/hf_text_kd.py [--tiny]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from common import require_extra, smoke_note

transformers = require_extra("transformers", "hf")
require_extra("accelerate", "hf")  # the Trainer needs it
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import kcd_fast  # noqa: E402
from kcd_fast.integrations.hf import KCDTrainer  # noqa: E402

VOCAB, LENGTH, CLASSES = 64, 16, 4


def token_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of random lengths whose class is the most frequent of 4 "topic" token
    groups (with noise tokens): learnable, and some sequences are ambiguous."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, LENGTH + 1))
        label = int(rng.integers(CLASSES))
        topic = rng.random(length) < 0.45
        ids = np.where(topic, 1 + label * 8 + rng.integers(0, 8, length), 33 + rng.integers(0, VOCAB - 33, length))
        ids = np.pad(ids, (0, LENGTH - length))
        mask = np.pad(np.ones(length, dtype=np.int64), (0, LENGTH - length))
        out.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": label})
    return out


def model(hidden: int, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)  # transformers initialises from torch's global RNG; this script owns it
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=CLASSES,
        max_position_embeddings=LENGTH,
    )
    return BertForSequenceClassification(config)


class DistillTrainer(KCDTrainer):  # was: class DistillTrainer(Trainer)
    def __init__(self, *args, teacher: torch.nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        with torch.no_grad():
            t = self.teacher(**inputs).logits
        kl = F.kl_div(F.log_softmax(out.logits / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
        loss = 0.9 * kl + 0.1 * F.cross_entropy(out.logits, labels)
        return (loss, out) if return_outputs else loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="a few seconds on the CPU (what CI runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    smoke_note(args)
    train, test = token_data(200 if args.tiny else 4000, args.seed), token_data(400, args.seed + 1)
    epochs, period = (4, 2) if args.tiny else (12, 3)
    out = tempfile.mkdtemp(prefix="kcd_hf_")
    common = {
        "output_dir": out,
        "per_device_train_batch_size": 32,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": True,
        "seed": args.seed,
        "disable_tqdm": args.tiny,
    }

    teacher = model(64, 2, args.seed)
    Trainer(
        model=teacher,
        args=TrainingArguments(**common, num_train_epochs=1 if args.tiny else 6, learning_rate=1e-3),
        train_dataset=train,
        data_collator=default_data_collator,
    ).train()

    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)
    trainer = DistillTrainer(
        model=model(16, 1, args.seed + 1),
        args=TrainingArguments(**common, num_train_epochs=epochs, learning_rate=2e-3, lr_scheduler_type="cosine"),
        train_dataset=train,
        data_collator=default_data_collator,
        teacher=teacher,
        kcd_schedule=schedule,  # the only KCD arguments
        kcd_options={"seed": args.seed},
    )
    trainer.train()
    student = trainer.model.eval()
    with torch.no_grad():
        batch = default_data_collator(test)
        labels = batch.pop("labels")
        acc = float((student(**batch).logits.argmax(1) == labels).float().mean())
    print(
        f"optimizer steps {trainer.state.global_step}; condensations: "
        f"{[(h['epoch'], h['kept']) for h in trainer.kcd_loader.history]}; student test accuracy {acc:.3f}"
    )
    shutil.rmtree(out, ignore_errors=True)  # save_strategy="no": nothing in it worth keeping
    smoke_note(args)


if __name__ == "__main__":
    main()
