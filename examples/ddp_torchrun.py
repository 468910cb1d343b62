"""KCD under DDP in a hand-written loop: the KCDLoader shards each epoch across the ranks
(no DistributedSampler), all-reduces the values at each condensation, and checkpoints
atomically (every rank calls save; rank 0 writes).

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py [--tiny]
"""

from __future__ import annotations

import gc
import os
import tempfile

import torch
import torch.distributed as dist
from common import accuracy, image_args, image_data, kd_loss, smoke_note, train_teacher
from torch.nn.parallel import DistributedDataParallel

import kcd_fast
from kcd_fast.kd.models import build_model


def main() -> None:
    args = image_args(__doc__).parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    x, y, xt, yt, classes = image_data(args)
    epochs, period = (4, 2) if args.tiny else (24, 6)
    shape = x.shape[1:][::-1]
    teacher = build_model("mlp_t" if args.tiny else "convnet_t", classes, shape, seed=args.seed)
    train_teacher(teacher, x, y, epochs=1 if args.tiny else 10, seed=args.seed)  # the same on every rank
    student = DistributedDataParallel(
        build_model("mlp_s" if args.tiny else "convnet_s", classes, shape, seed=args.seed + 1)
    )
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)
    loader = kcd_fast.KCDLoader(kcd_fast.ArrayDataset(x, y), schedule, batch_size=64, shuffle=True, seed=args.seed)
    ckpt = os.path.join(tempfile.gettempdir(), f"kcd_ddp_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}.pt")
    for epoch in range(schedule.epochs):
        seen = torch.zeros(1, dtype=torch.int64)
        for images, labels, indices in loader:  # this rank's shard
            logits = student(images)
            with torch.no_grad():
                t_logits = teacher(images)
            loss = kd_loss(logits, t_logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loader.observe(indices, logits)  # local; all-reduced at the next condensation
            seen += len(indices)
        dist.all_reduce(seen)
        loader.save(ckpt)  # a collective: every rank calls it, rank 0 writes
        if rank == 0:
            print(
                f"epoch {epoch}: {int(seen)} points over {loader.world_size} ranks, "
                f"test accuracy {accuracy(student.module, xt, yt):.3f}"
            )
    if rank == 0:
        print(f"condensations: {[(h['epoch'], h['kept']) for h in loader.history]}; checkpoint {ckpt}")
        smoke_note(args)
        if args.tiny:  # a smoke run (the tests): leave no checkpoint behind
            os.remove(ckpt)
    # Tear down in order: the DDP model (its reducer holds the process group) and the loader
    # first, then the group once every rank is done with it; a gloo group destroyed under a live
    # reducer or a rank still talking aborts with "terminate called without an active exception".
    del student, opt, loader
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
