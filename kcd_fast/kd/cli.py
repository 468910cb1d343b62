"""The KD trainer's command line: ``python -m kcd_fast.kd --help`` (``python -m kcd_fast.train``
is the same program). Trains (or loads from the cache) the teacher, then distils the student
with vanilla KD, KCD, or both, and prints and optionally writes the results.

Conventions (argparse's): a bad argument is one line on stderr and exit code 2, no
traceback; progress is a tqdm bar on a terminal and plain lines (one per epoch, and one
every ~15 s inside a long epoch) when stderr goes to a file or a pipe; teachers are cached
in the user's cache folder (:func:`kcd_fast.kd.teacher.default_cache_dir`), never in the
current folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.arrays import ArrayDataset
from ..schedule import CondensationSchedule
from .data import digits_arrays, load_arrays, split_arrays, synthetic_arrays
from .models import build_model
from .teacher import cached_teacher, default_cache_dir
from .trainer import (
    BatchPreprocess,
    KDConfig,
    KDTrainer,
    LRIndex,
    LRSchedule,
    keep_uint8,
    make_eval_loader,
    make_loader,
    train_data,
)

__all__ = ["build_parser", "main", "prepare_data"]


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where the default is None (its help says
    what None means) or a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=_HelpWithDefaults,
        prog="python -m kcd_fast.kd",
        usage="%(prog)s [options]   (--help lists them)",  # an error is 2 short lines, not a page
        description="Distil a student from a (cached) teacher with vanilla KD or KCD.",
    )
    p.add_argument("--mode", choices=("kd", "kcd", "both"), default="kcd", help="vanilla KD, KCD, or both")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (generated CIFAR-shaped set), 'digits' (sklearn), or an .npz / image folder",
    )
    p.add_argument("--n-train", type=int, default=5000, help="synthetic: training images")
    p.add_argument("--n-test", type=int, default=1000, help="synthetic: test images")
    p.add_argument("--image-size", type=int, default=32, help="image folder / synthetic size")
    p.add_argument("--teacher", default=None, help="teacher model (default convnet_t, mlp_t for digits)")
    p.add_argument("--student", default=None, help="student model (default convnet_s, mlp_s for digits)")
    p.add_argument("--teacher-epochs", type=int, default=12, help="epochs of the teacher's training (on a cache miss)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs I of the student (a multiple of --period)")
    p.add_argument("--period", type=int, default=2, help="condensation period T in epochs")
    p.add_argument("--rho", type=float, default=0.7, help="final keep fraction")
    p.add_argument(
        "--decay",
        default="exp",
        choices=("exp", "linear", "reference"),
        help="how the keep fraction falls from stage to stage",
    )
    p.add_argument("--warmup", type=int, default=1, help="full epochs before the first condensation")
    p.add_argument(
        "--value", default="entropy", choices=("entropy", "kl", "random"), help="what scores a sample's value"
    )
    p.add_argument(
        "--vaks",
        default="low",
        choices=("low", "high", "random", "off"),
        help="which kept points the dropped ones are blended into",
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size (teacher and student)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    p.add_argument("--gamma", type=float, default=0.1, help="cross-entropy weight")
    p.add_argument("--alpha-kd", type=float, default=0.9, help="KL weight")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--lr-schedule", default="cosine", choices=[s.value for s in LRSchedule])
    p.add_argument(
        "--lr-index",
        default="epoch",
        choices=[s.value for s in LRIndex],
        help="what the LR schedule's progress counts: epoch (the same LR for KD and KCD in every epoch) or step",
    )
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision (auto: bf16 on CUDA, off on the CPU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the models train")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (torch back end)")
    p.add_argument("--backend", default="torch", choices=("torch", "dali", "tensor"), help="KCDLoader back end")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the loader")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="folder of cached teachers ('' disables the cache; default $KCD_FAST_CACHE_DIR, else "
        "$XDG_CACHE_HOME/kcd_fast, else ~/.cache/kcd_fast)",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (there are none either when stderr is not a terminal: plain lines instead)",
    )
    return p


def prepare_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(train_images, train_labels, test_images, test_labels, kind)`` for ``--data``."""
    if args.data == "synthetic":
        x, y = synthetic_arrays(args.n_train, image_size=args.image_size, seed=args.seed)
        xt, yt = synthetic_arrays(args.n_test, image_size=args.image_size, seed=args.seed + 10_000)
        return x, y, xt, yt, "image"
    if args.data == "digits":
        x, y = digits_arrays()
        return (*split_arrays(x, y, 0.25, seed=args.seed), "digits")
    return (*load_arrays(args.data, image_size=args.image_size, seed=args.seed), "image")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI: trains (or loads) the teacher, distils the student, prints and returns results.
    A bad argument exits with code 2 and one line naming it (``parser.error``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("n_train", "n_test", "teacher_epochs", "epochs", "period", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.mode != "kd":  # the schedule's own checks, as argument errors
        try:
            CondensationSchedule(args.epochs, args.period, rho=args.rho, decay=args.decay, warmup=args.warmup)
        except (ValueError, TypeError) as err:
            parser.error(f"--epochs/--period/--rho/--decay/--warmup: {err}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device on this machine (use --device cpu)")
    try:
        x, y, xt, yt, kind = prepare_data(args)
    except (OSError, ValueError, TypeError, KeyError) as err:
        parser.error(f"--data {args.data!r}: {err}")
    num_classes = int(max(y.max(), yt.max())) + 1
    input_shape = (x.shape[3], x.shape[1], x.shape[2])
    digits = kind == "digits"
    teacher_name = args.teacher or ("mlp_t" if digits else "convnet_t")
    student_name = args.student or ("mlp_s" if digits else "convnet_s")
    for flag, model in (("--teacher", teacher_name), ("--student", student_name)):
        try:
            build_model(model, num_classes, input_shape, seed=args.seed)
        except (ValueError, KeyError, TypeError) as err:
            parser.error(f"{flag} {model!r}: {err}")
    cache_dir = default_cache_dir() if args.cache_dir is None else (args.cache_dir or None)
    bars = not args.no_progress and sys.stderr.isatty()  # plain lines into logs and pipes
    augment = "none" if digits else "crop_flip"
    pre = BatchPreprocess([0.5] * input_shape[0], [0.25] * input_shape[0], augment=augment, seed=args.seed)
    try:
        cfg = KDConfig(
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            temperature=args.temperature,
            gamma=args.gamma,
            alpha_kd=args.alpha_kd,
            lr_schedule=args.lr_schedule,
            lr_index=args.lr_index,
            amp=args.amp,
        )
    except (ValueError, TypeError) as err:  # "lr must be ...": the flag is the field with dashes
        field = str(err).split(" ", 1)[0]
        parser.error(f"--{field.replace('_', '-')}: {err}")
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"--cache-dir {str(cache_dir)!r} cannot hold the teacher cache: {err}")
    test_set = ArrayDataset(xt, yt, transform=keep_uint8)
    teacher, tinfo = cached_teacher(
        teacher_name,
        ArrayDataset(x, y, transform=keep_uint8),
        num_classes=num_classes,
        input_shape=input_shape,
        config=KDConfig(lr=args.lr, amp=args.amp, gamma=1.0, alpha_kd=0.0),
        epochs=args.teacher_epochs,
        preprocess=BatchPreprocess(pre.mean, pre.std, augment=augment, seed=args.seed),
        batch_size=args.batch_size,
        test_set=test_set,
        cache_dir=cache_dir,
        device=args.device,
        seed=args.seed,
        progress=bars,
        log=_say,
    )
    out: dict[str, Any] = {
        "teacher": {"name": teacher_name, **tinfo},
        "student": student_name,
        "config": {**asdict(cfg), "milestones": list(cfg.milestones)},
        "args": vars(args),
    }
    modes = ("kd", "kcd") if args.mode == "both" else (args.mode,)
    for mode in modes:
        # a fresh copy: KCD summarises its images
        train_set, backend_options, pre_augment = train_data(x, y, args.backend, augment, args.device)
        loader = make_loader(
            mode,
            train_set,
            epochs=args.epochs,
            period=args.period,
            rho=args.rho,
            decay=args.decay,
            warmup=args.warmup,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            seed=args.seed,
            backend=args.backend,
            value=args.value,
            vaks=args.vaks,
            **backend_options,
        )
        student = build_model(student_name, num_classes, input_shape, seed=args.seed)
        trainer = KDTrainer(
            student,
            teacher,
            loader,
            cfg,
            preprocess=BatchPreprocess(pre.mean, pre.std, augment=pre_augment, seed=args.seed),
            device=args.device,
            test_loader=make_eval_loader(test_set),
            progress=bars,
            log=_say,
            name=mode,
        )
        res = trainer.fit()
        out[mode] = res.to_dict()
        print(
            f"{mode:>4}: {res.samples} samples in {res.seconds:.2f} s, accuracy {_pct(res.accuracy)} "
            f"(teacher {_pct(tinfo['accuracy'])})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out
