"""KCD in PyTorch Lightning: the LightningModule returns a KCDLoader from train_dataloader()
and its training_step returns the student's logits; KCDCallback does the rest (observing,
epochs in step, the loader's state in Lightning's checkpoints, DDP sharding).

    python examples/lightning_kd.py [--tiny] [--devices 2 --strategy ddp_spawn]
"""

from __future__ import annotations

import torch
from common import accuracy, image_args, image_data, kd_loss, require_extra, smoke_note, train_teacher

pl = require_extra("lightning.pytorch", "lightning")

import kcd_fast  # noqa: E402
from kcd_fast.integrations.lightning import KCDCallback  # noqa: E402
from kcd_fast.kd.models import build_model  # noqa: E402


class Distill(pl.LightningModule):
    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, loader: kcd_fast.KCDLoader):
        super().__init__()
        self.teacher, self.student, self.loader = teacher.requires_grad_(False), student, loader

    def train_dataloader(self) -> kcd_fast.KCDLoader:
        return self.loader  # 1. a KCDLoader

    def training_step(self, batch, batch_idx):
        images, labels, _indices = batch  # the indices come last
        logits = self.student(images)
        with torch.no_grad():
            t_logits = self.teacher(images)
        return {"loss": kd_loss(logits, t_logits, labels), "logits": logits}  # 2. the logits

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        # an LR schedule sized on the loader's real number of steps (KCD epochs shrink)
        steps = self.loader.total_steps(self.trainer.accumulate_grad_batches)  # optimizer steps
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def main() -> None:
    p = image_args(__doc__)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    args = p.parse_args()
    x, y, xt, yt, classes = image_data(args)
    epochs, period = (4, 2) if args.tiny else (24, 6)
    shape = x.shape[1:][::-1]
    teacher = build_model("mlp_t" if args.tiny else "convnet_t", classes, shape, seed=args.seed)
    train_teacher(teacher, x, y, epochs=1 if args.tiny else 10, seed=args.seed)
    student = build_model("mlp_s" if args.tiny else "convnet_s", classes, shape, seed=args.seed + 1)
    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)
    loader = kcd_fast.KCDLoader(kcd_fast.ArrayDataset(x, y), schedule, batch_size=64, shuffle=True, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=schedule.epochs,
        accelerator="cpu" if args.tiny else "auto",
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[KCDCallback()],  # 3. the callback
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.tiny,
        enable_model_summary=False,
    )
    module = Distill(teacher, student, loader)
    trainer.fit(module)
    if trainer.is_global_zero:
        print(f"steps {trainer.global_step} (loader.total_steps() = {loader.total_steps()})")
        print(f"condensations: {[(h['epoch'], h['kept']) for h in loader.history]}")
        print(f"test accuracy {accuracy(student, xt, yt):.3f}")
        smoke_note(args)


if __name__ == "__main__":
    main()
