"""Lightning's ddp_spawn strategy on 2 CPU processes with a KCDLoader and KCDCallback;
each rank writes what it trained to <out>/rank<r>.json (run by tests/test_lightning.py)."""

import json
import sys

import lightning.pytorch as pl
import numpy as np
import torch

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader
from kcd_fast.integrations.lightning import KCDCallback

N, C = 60, 5
SCHED = CondensationSchedule(epochs=4, period=2, rho=0.7)


class Mod(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(48, C)
        self.seen = []

    def train_dataloader(self):
        rng = np.random.default_rng(0)
        ds = ArrayDataset(rng.integers(0, 255, (N, 4, 4, 3), dtype=np.uint8), rng.integers(0, C, N))
        self.loader = KCDLoader(ds, SCHED, batch_size=8, shuffle=True, seed=3)
        return self.loader

    def training_step(self, batch, i):
        x, y, idx = batch
        logits = self.net(x.flatten(1))
        self.seen.append((self.current_epoch, idx.tolist()))
        return {"loss": torch.nn.functional.cross_entropy(logits, y), "logits": logits}

    def on_train_end(self):
        out = {
            "rank": self.global_rank,
            "distributed": self.loader.distributed,
            "world": self.loader.world_size,
            "seen": self.seen,
            "history": self.loader.history,
        }
        with open(f"{sys.argv[1]}/rank{self.global_rank}.json", "w") as f:
            json.dump(out, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    t = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=SCHED.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[KCDCallback()],
    )
    t.fit(Mod())
