"""KCD under Hugging Face accelerate: the KCDLoader delivers its batches on
``accelerator.device`` itself (``batch_device=``), shards itself under several processes, and
its state is saved and restored with ``accelerator.save_state`` / ``load_state``
(``register_for_checkpointing``), mid-epoch too.

``accelerator.prepare(model, optimizer, loader)`` returns a KCDLoader untouched (accelerate
only wraps ``torch.utils.data.DataLoader`` objects), so prepare the model and optimizer only.

    python examples/accelerate_kd.py [--tiny]
    torchrun --nproc_per_node 2 examples/accelerate_kd.py --tiny   (or: accelerate launch --num_processes 2 ...)
"""

from __future__ import annotations

import copy
import shutil
import tempfile

import torch
from common import accuracy, image_args, image_data, kd_loss, require_extra, smoke_note, train_teacher

Accelerator = require_extra("accelerate", "accelerate").Accelerator

import kcd_fast  # noqa: E402
from kcd_fast.kd.models import build_model  # noqa: E402


def main() -> None:
    p = image_args(__doc__)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    args = p.parse_args()
    accelerator = Accelerator(cpu=args.cpu or args.tiny)
    device = accelerator.device
    x, y, xt, yt, classes = image_data(args)
    epochs, period = (4, 2) if args.tiny else (24, 6)
    shape = x.shape[1:][::-1]
    teacher = build_model("mlp_t" if args.tiny else "convnet_t", classes, shape, seed=args.seed)
    train_teacher(teacher, x, y, epochs=1 if args.tiny else 10, seed=args.seed)  # the same on every process
    teacher = teacher.to(device)
    student = build_model("mlp_s" if args.tiny else "convnet_s", classes, shape, seed=args.seed + 1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)
    loader = kcd_fast.KCDLoader(  # built after the Accelerator: under several processes it shards itself
        kcd_fast.ArrayDataset(x, y),
        schedule,
        batch_size=64,
        shuffle=True,
        seed=args.seed,
        batch_device=device,  # 1. batches arrive on accelerator.device
        pin_memory=device.type == "cuda",
    )
    student, opt = accelerator.prepare(student, opt)  # 2. not the loader (prepare would return it as it is)
    accelerator.register_for_checkpointing(loader)  # 3. its state goes into save_state / load_state
    ckpt = tempfile.mkdtemp(prefix="kcd_accelerate_") if accelerator.is_main_process else None
    ckpt = accelerator.gather_for_metrics([ckpt], use_gather_object=True)[0]  # every process the same folder
    for epoch in range(loader.epoch, schedule.epochs):
        seen = torch.zeros((), dtype=torch.int64, device=device)
        for images, labels, indices in loader:  # images, labels on `device`; indices a CPU tensor
            logits = student(images)
            with torch.no_grad():
                t_logits = teacher(images)
            loss = kd_loss(logits, t_logits, labels)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            loader.observe(indices, logits)  # 4. every batch scored
            seen += len(indices)
        seen = accelerator.reduce(seen, "sum")
        accelerator.save_state(ckpt)  # a collective: the loader's state is taken on every process
        accelerator.print(
            f"epoch {epoch}: {int(seen)} points over {loader.world_size} process(es), "
            f"test accuracy {accuracy(copy.deepcopy(accelerator.unwrap_model(student)).cpu(), xt, yt):.3f}"
        )
    accelerator.print(f"condensations: {[(h['epoch'], h['kept']) for h in loader.history]}")
    accelerator.wait_for_everyone()
    if args.tiny and accelerator.is_main_process:  # a smoke run (the tests): leave no checkpoint behind
        shutil.rmtree(ckpt, ignore_errors=True)
    if accelerator.is_main_process:
        smoke_note(args)
    accelerator.end_training()


if __name__ == "__main__":
    main()
