"""KCD in a hand-written KD loop (RepDistiller / mdistiller style): three lines change.

python examples/cifar_kd.py            # CIFAR-100 if --cifar-root has it, else generated data
python examples/cifar_kd.py --tiny     # seconds, what CI runs
"""

from __future__ import annotations

import torch
from common import accuracy, image_args, image_data, kd_loss, smoke_note, train_teacher

import kcd_fast
from kcd_fast.kd.models import build_model


def main() -> None:
    args = image_args(__doc__).parse_args()
    x, y, xt, yt, classes = image_data(args)
    epochs, period = (4, 2) if args.tiny else (24, 6)
    teacher = build_model("mlp_t" if args.tiny else "convnet_t", classes, x.shape[1:][::-1], seed=args.seed)
    train_teacher(teacher, x, y, epochs=1 if args.tiny else 10, seed=args.seed)
    student = build_model("mlp_s" if args.tiny else "convnet_s", classes, x.shape[1:][::-1], seed=args.seed + 1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)  # 1. the schedule
    loader = kcd_fast.KCDLoader(  # 2. a KCDLoader where the DataLoader was
        kcd_fast.ArrayDataset(x, y), schedule, batch_size=64, shuffle=True, seed=args.seed
    )
    for epoch in range(schedule.epochs):
        seen = 0
        for images, labels, indices in loader:
            logits = student(images)
            with torch.no_grad():
                t_logits = teacher(images)
            loss = kd_loss(logits, t_logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loader.observe(indices, logits)  # 3. the student's logits back to the loader
            seen += len(indices)
        print(f"epoch {epoch}: trained on {seen} of {len(y)} points, test accuracy {accuracy(student, xt, yt):.3f}")
    cost = sum(schedule.epoch_sizes(len(y))) / (len(y) * schedule.epochs)
    print(f"condensations: {[(h['epoch'], h['kept']) for h in loader.history]}; computation C = {cost:.3f}")
    smoke_note(args)


if __name__ == "__main__":
    main()
