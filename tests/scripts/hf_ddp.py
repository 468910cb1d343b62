"""KCDTrainer under torchrun: 2 CPU ranks (gloo); each rank writes what it trained to
<out>/rank<r>.json (run by tests/test_hf.py)."""

import json
import os
import sys

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments, default_data_collator

from kcd_fast import CondensationSchedule
from kcd_fast.integrations.hf import KCDTrainer

N, L, V, C = 48, 6, 50, 3
rng = np.random.default_rng(0)
ids = rng.integers(1, V, (N, L))
labels = rng.integers(0, C, N)
DATA = [
    {"input_ids": torch.tensor(ids[i]), "attention_mask": torch.ones(L, dtype=torch.int64), "labels": int(labels[i])}
    for i in range(N)
]
SCHED = CondensationSchedule(epochs=4, period=2, rho=0.7)
torch.manual_seed(0)  # this script's own process: the model's initialisation
config = BertConfig(
    vocab_size=V,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    num_labels=C,
    max_position_embeddings=16,
)
args = TrainingArguments(
    output_dir=sys.argv[1],
    num_train_epochs=4,
    per_device_train_batch_size=8,
    use_cpu=True,
    ddp_backend="gloo",
    report_to=[],
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
    seed=0,
)
trainer = KCDTrainer(
    model=BertForSequenceClassification(config),
    args=args,
    train_dataset=DATA,
    data_collator=default_data_collator,
    kcd_schedule=SCHED,
)
seen = []
step = trainer.training_step


def recording_step(model, inputs, *a, **k):
    seen.append((trainer.kcd_loader.epoch, inputs["kcd_indices"].tolist()))
    return step(model, inputs, *a, **k)


trainer.training_step = recording_step
trainer.train()
loader = trainer.kcd_loader
rank = int(os.environ.get("RANK", 0))
out = {
    "rank": rank,
    "dist": loader.distributed,
    "world": loader.world_size,
    "seen": seen,
    "history": loader.history,
    "steps": trainer.state.global_step,
}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
# Tear down in order: the trainer (its DDP model's reducer holds the gloo group) and the loader
# first, then the group once every rank is done with it (a group destroyed under a live reducer,
# or a rank exiting while another still talks to it, aborts: "terminate called without an
# active exception").
import gc  # noqa: E402

import torch.distributed as dist  # noqa: E402

trainer.accelerator.free_memory()  # drops accelerate's references to the DDP-wrapped model
trainer.model_wrapped = trainer.model = None
del loader
gc.collect()
if dist.is_available() and dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
