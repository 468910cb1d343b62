"""KCD in torchdistill, configured from examples/torchdistill_kd.yaml: the YAML names KCD's
dataset wrapper, batch sampler, forward and post-forward steps (registered by importing
kcd_fast.integrations.torchdistill); the loop below is torchdistill's usual one, and the
loader's state is saved beside torchdistill's checkpoint (save_kcd_state / load_kcd_state).

    python examples/torchdistill_kd.py [--tiny] [--config examples/torchdistill_kd.yaml] [--resume]
    python -m torch.distributed.run --nproc_per_node 2 examples/torchdistill_kd.py --tiny

Data: scikit-learn's digits (1347 training images of 8x8). On the CPU torchdistill does not wrap
the student in DistributedDataParallel (its wrap_model wraps on CUDA only), so under torchrun
on the CPU each rank trains its own replica; the KCD loader shards and condenses the same way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from common import accuracy, require_extra, smoke_note, train_teacher

# registers KCD's keys: import it before the box is built (it imports torchvision.datasets, then torchdistill)
kcd_td = require_extra("kcd_fast.integrations.torchdistill", "torchdistill", package="torchdistill")
require_extra("sklearn", "torchdistill")  # the digits data ships inside scikit-learn

import kcd_fast  # noqa: E402
from kcd_fast.kd import digits_arrays, split_arrays  # noqa: E402
from kcd_fast.kd.models import build_model  # noqa: E402

# isort: split
# torchdistill after kcd_td, which imports torchvision.datasets first (torchdistill 1.1.5 beside torchvision 0.29)
from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.common.main_util import load_ckpt, save_ckpt  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(Path(__file__).with_name("torchdistill_kd.yaml")))
    p.add_argument("--tiny", action="store_true", help="a few seconds on the CPU (what CI runs)")
    p.add_argument("--ckpt", default=None, help="checkpoint path (default: a temporary file, removed with --tiny)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt (torchdistill's and KCD's state)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.resume and args.ckpt is None:
        p.error("--resume needs --ckpt (the checkpoint a previous run wrote)")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        smoke_note(args)
    config = yaml_util.load_yaml_file(args.config)
    x, y = digits_arrays()
    x_train, y_train, x_test, y_test = split_arrays(x, y, 0.25, seed=args.seed)
    dataset_dict = {"digits/train": kcd_fast.ArrayDataset(x_train, y_train)}
    shape = x.shape[1:][::-1]  # (C, H, W)
    teacher = build_model(config["models"]["teacher"]["name"], 10, shape, seed=args.seed)
    train_teacher(teacher, x_train, y_train, epochs=3 if args.tiny else 20, seed=args.seed)
    student = build_model(config["models"]["student"]["name"], 10, shape, seed=args.seed + 1)
    device = torch.device("cpu")
    box = get_distillation_box(teacher, student, dataset_dict, config["train"], device, None, distributed, 1.0)
    sampler = kcd_td.kcd_batch_sampler(box)
    if box.num_epochs != sampler.schedule.epochs:
        p.error(f"train: num_epochs is {box.num_epochs} but the KCD schedule has {sampler.schedule.epochs} epochs")
    ckpt = args.ckpt or os.path.join(tempfile.gettempdir(), f"kcd_td_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}.pt")
    start = 0
    if args.resume:
        load_ckpt(ckpt, model=box.student_model, optimizer=box.optimizer, lr_scheduler=box.lr_scheduler)
        start = kcd_td.load_kcd_state(box, ckpt)  # the loader knows where the run stood
    for epoch in range(start, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        seen = torch.zeros((), dtype=torch.int64)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)  # kcd_post_forward: the step, then observe
            seen += len(targets)
        box.post_epoch_process()
        if distributed:
            dist.all_reduce(seen)
        save_ckpt(box.student_model, box.optimizer, box.lr_scheduler, 0.0, None, ckpt)  # rank 0 writes
        kcd_td.save_kcd_state(box, ckpt)  # every rank (a collective under DDP); rank 0 writes <ckpt>.kcd
        if rank == 0:
            print(
                f"epoch {epoch}: trained {int(seen)} points over {sampler.loader.world_size} rank(s), "
                f"test accuracy {accuracy(student, x_test, y_test):.3f}"
            )
    if rank == 0:
        print(f"schedule: {sampler.schedule.epoch_sizes(sampler.loader.n)}")
        print(f"condensations: {[(h['epoch'], h['kept']) for h in sampler.history]}")
        if args.tiny and args.ckpt is None:  # a smoke run (the tests): leave no checkpoint behind
            for path in (ckpt, kcd_td.kcd_checkpoint_path(ckpt)):
                os.remove(path)
        smoke_note(args)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
