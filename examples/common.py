"""What the examples share: their data, a quickly trained teacher and the KD loss.

The image examples use CIFAR-100 when torchvision finds it on disk (``--cifar-root``; it
is never downloaded here) and otherwise the generated CIFAR-shaped set that
``benchmarks/throughput.py`` trains on (kcd_fast.kd.data.synthetic_arrays).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from kcd_fast.kd.data import synthetic_arrays

SMOKE_NOTE = (
    "--tiny: a smoke run (seconds on a CPU, tiny data, models and epochs): it checks that the code runs end "
    "to end; its accuracies mean nothing. Run without --tiny for a real run."
)


def smoke_note(args: argparse.Namespace) -> None:
    """Says, at the start and the end of a ``--tiny`` run, that its numbers mean nothing."""
    if getattr(args, "tiny", False):
        print(SMOKE_NOTE, flush=True)


def require_extra(module: str, extra: str, package: str | None = None) -> ModuleType:
    """``import module``, or exit with the one command that installs it (the extra that brings
    ``package``, by default the module's top-level package)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = package or module.partition(".")[0]
        if not err.name or err.name.partition(".")[0] != top:
            raise  # something else is missing: its own error says what
        raise SystemExit(
            f"{Path(sys.argv[0]).name} needs {top}, which is not installed here. In the kcd_fast checkout run:\n"
            f'    pip install -e ".[{extra}]"'
        ) from None


def image_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a few seconds on the CPU (what CI runs)")
    p.add_argument("--cifar-root", default="data/cifar100", help="torchvision CIFAR-100 folder, if you have it")
    p.add_argument("--seed", type=int, default=0)
    return p


def image_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(train_images, train_labels, test_images, test_labels, classes)``: uint8 NHWC, int64."""
    root = Path(args.cifar_root)
    if not args.tiny and root.is_dir():
        try:
            from torchvision.datasets import CIFAR100

            tr, te = CIFAR100(root, train=True, download=False), CIFAR100(root, train=False, download=False)
            print(f"data: CIFAR-100 from {root}")
            return tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets), 100
        except (ImportError, RuntimeError) as err:
            print(f"data: CIFAR-100 not readable at {root} ({err}); using the generated set")
    smoke_note(args)
    n = 400 if args.tiny else 10_000
    x, y = synthetic_arrays(n, num_classes=10, seed=args.seed)
    xt, yt = synthetic_arrays(n // 5, num_classes=10, seed=args.seed + 1)
    print(f"data: {n} generated CIFAR-shaped images, 10 classes")
    return x, y, xt, yt, 10


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (what ArrayDataset's default transform gives)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def train_teacher(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> None:
    """Cross-entropy training of the teacher (the examples' stand-in for a pretrained one)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = as_batch(images), torch.from_numpy(labels)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float = 4.0) -> torch.Tensor:
    """Hinton's KD: KL at temperature t (scaled by t^2) plus cross-entropy, 0.9 / 0.1."""
    kl = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean")
    return 0.9 * kl * t * t + 0.1 * F.cross_entropy(student, labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    pred = torch.cat([model(b).argmax(1) for b in as_batch(images).split(512)])
    model.train()
    return float((pred == torch.from_numpy(labels)).float().mean())
