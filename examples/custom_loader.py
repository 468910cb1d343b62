"""KCD for code that builds its own torch DataLoader (timm / torchdistill style):
KCDBatchSampler is the DataLoader's batch_sampler, WithIndices makes each sample carry
its index, and the sampler takes the student's logits back.

    python examples/custom_loader.py [--tiny]
"""

from __future__ import annotations

import torch
from common import accuracy, image_args, image_data, kd_loss, smoke_note, train_teacher
from torch.utils.data import DataLoader

import kcd_fast
from kcd_fast.kd.models import build_model


def main() -> None:
    args = image_args(__doc__).parse_args()
    x, y, xt, yt, classes = image_data(args)
    epochs, period = (4, 2) if args.tiny else (24, 6)
    shape = x.shape[1:][::-1]
    teacher = build_model("mlp_t" if args.tiny else "convnet_t", classes, shape, seed=args.seed)
    train_teacher(teacher, x, y, epochs=1 if args.tiny else 10, seed=args.seed)
    student = build_model("mlp_s" if args.tiny else "convnet_s", classes, shape, seed=args.seed + 1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    train_set = kcd_fast.ArrayDataset(x, y)  # shared memory: workers see the VAKS summaries
    schedule = kcd_fast.CondensationSchedule(epochs=epochs, period=period, rho=0.7)
    sampler = kcd_fast.KCDBatchSampler(train_set, schedule, batch_size=64, shuffle=True, seed=args.seed)
    loader = DataLoader(kcd_fast.WithIndices(train_set), batch_sampler=sampler, num_workers=2, persistent_workers=True)
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
            sampler.observe(indices, logits)
            seen += len(indices)
        print(f"epoch {epoch}: {seen} points, test accuracy {accuracy(student, xt, yt):.3f}")
    print(f"condensations: {[(h['epoch'], h['kept']) for h in sampler.history]}")
    smoke_note(args)


if __name__ == "__main__":
    main()
