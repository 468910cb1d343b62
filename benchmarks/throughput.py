"""The main benchmark: KCD's measured wall-clock saving against the theoretical C.

Trains (or loads from the user's cache folder, kcd_fast.kd.default_cache_dir()) a teacher,
then runs vanilla KD and KCD with identical settings and seed on this machine, their epochs
interleaved (A-B, B-A, ...) so that drift of a shared machine hits both, and reports per epoch the samples and seconds
of both runs; the totals; the measured ratio KCD / vanilla next to the theoretical C of
the schedule run (``schedule.relative_cost(N)``) and the paper's closed form
(``schedule.paper_cost``); the test accuracy of both; and KCD's own overhead (scoring in
``observe``; values + condensation + VAKS summary at the epoch end, also re-timed apart).

Vanilla KD loads through the same code as KCD: a :class:`kcd_fast.KCDLoader` on
:func:`kcd_fast.kd.full_schedule` (every point every epoch, never condensed, and the
trainer scores nothing), in the same first-epoch order. So the measured ratio charges
KCD with everything it does differently: scoring, condensation and summarising. What the
shared loading code itself costs is the "feed" row: one epoch of data alone (no model)
through torch's own ``DataLoader`` and through the vanilla KCDLoader, interleaved, median
of repeats, so users see both.

Usage:
    python benchmarks/throughput.py                  # default: embedded data, CPU-sized
    python benchmarks/throughput.py --quick          # ~1 minute on 2 CPU cores (26 s with the teacher cached)
    python benchmarks/throughput.py --device cuda    # resnet32x4 -> resnet8x4, 50k images
    python benchmarks/throughput.py --data cifar.npz --epochs 24 --period 4 --rho 0.7 \\
        --json out.json --plot out.png
    python benchmarks/throughput.py --digits         # accuracy on sklearn digits, several seeds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("kcd_fast") is None:  # run from a checkout without installing kcd_fast
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from _common import machine_info  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule, condense  # noqa: E402
from kcd_fast.kd import (  # noqa: E402
    BatchPreprocess,
    KDConfig,
    KDTrainer,
    build_model,
    cached_teacher,
    count_parameters,
    default_cache_dir,
    keep_uint8,
    load_arrays,
    make_eval_loader,
    make_loader,
    synthetic_arrays,
    train_data,
)
from kcd_fast.ops import blend_  # noqa: E402

# Sizes per preset; any flag given on the command line overrides its entry.
PRESETS: dict[str, dict[str, Any]] = {
    # the default on a CPU: a few minutes on 2 cores (the teacher is cached after the first run)
    "cpu": {
        "n_train": 5000,
        "n_test": 1000,
        "epochs": 12,
        "period": 2,
        "teacher": "convnet_t",
        "student": "convnet_s",
        "teacher_epochs": 12,
        "batch_size": 64,
        "num_workers": 0,
        "lr": 0.05,
        "repeats": 3,
    },
    # --quick: 53 s on 2 cores with the teacher trained first, 26 s with it cached (2026-12-07)
    "quick": {
        "n_train": 2500,
        "n_test": 500,
        "epochs": 6,
        "period": 2,
        "teacher": "convnet_t",
        "student": "convnet_s",
        "teacher_epochs": 8,
        "batch_size": 64,
        "num_workers": 0,
        "lr": 0.05,
        "repeats": 1,
    },
    # on a GPU: the KD literature's CIFAR pair on a CIFAR-sized embedded set
    "cuda": {
        "n_train": 50000,
        "n_test": 10000,
        "epochs": 12,
        "period": 2,
        "teacher": "resnet32x4",
        "student": "resnet8x4",
        "teacher_epochs": 8,
        "batch_size": 128,
        "num_workers": 6,
        "lr": 0.1,
        "repeats": 3,
    },
    "cuda_quick": {
        "n_train": 20000,
        "n_test": 5000,
        "epochs": 6,
        "period": 2,
        "teacher": "resnet32x4",
        "student": "resnet8x4",
        "teacher_epochs": 4,
        "batch_size": 128,
        "num_workers": 6,
        "lr": 0.1,
        "repeats": 1,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: about a minute on 2 CPU cores (half that with the teacher cached)",
    )
    p.add_argument(
        "--digits",
        action="store_true",
        help="run the sklearn-digits accuracy benchmark (benchmarks/digits_accuracy.py) instead",
    )
    p.add_argument(
        "--backend",
        default="tensor",
        choices=("torch", "dali", "tensor"),
        help="KCDLoader back end (default tensor: whole batches cropped and flipped by one fused kernel, no "
        "workers; faster than torch here: results/throughput_quick_*_cpu.txt)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="an .npz of uint8 images + labels, or an image folder (default: the embedded synthetic set)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs I (a multiple of --period)")
    p.add_argument("--period", type=int, default=None, help="condensation period T in epochs")
    p.add_argument("--rho", type=float, default=0.7, help="final keep fraction (default 0.7)")
    p.add_argument("--decay", default="exp", choices=("exp", "linear", "reference"))
    p.add_argument("--warmup", type=int, default=1, help="full epochs before the first condensation (default 1)")
    p.add_argument("--value", default="entropy", choices=("entropy", "kl", "random"))
    p.add_argument("--vaks", default="low", choices=("low", "high", "random", "off"))
    p.add_argument(
        "--policy",
        default="kcd",
        choices=("kcd", "infobatch", "random"),
        help="what the pruned run runs: kcd (default), infobatch (kcd_fast.InfoBatchSchedule, prune 0.5, delta "
        "0.875) or random (a random subset at the KCD schedule's counts); docs/policies.md",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--n-train", type=int, default=None, help="synthetic training images")
    p.add_argument("--n-test", type=int, default=None, help="synthetic test images")
    p.add_argument("--image-size", type=int, default=32, help="synthetic / image-folder size (default 32)")
    p.add_argument("--teacher", default=None, help="teacher model (see kcd_fast.kd.models.MODELS)")
    p.add_argument("--student", default=None, help="student model")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved pairs of runs (default 3; 1 with --quick); the ratio reported is their median",
    )
    p.add_argument(
        "--order",
        default="interleaved",
        choices=("interleaved", "sequential"),
        help="alternate the runs' epochs A-B, B-A (default) or run vanilla then KCD",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="folder of cached teachers ('' disables; default: the user's cache folder, as python -m kcd_fast.kd)",
    )
    p.add_argument(
        "--out",
        default=str(HERE / "out"),
        help="folder for the results: a run writes <out>/throughput-<time>.json and .png (default benchmarks/out)",
    )
    p.add_argument("--json", default=None, help="write the JSON here instead")
    p.add_argument("--plot", default=None, help="write the PNG plot here instead")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (none either when stderr is no terminal)")
    return p


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device")
    preset = (
        ("cuda_quick" if args.quick else "cuda") if device.startswith("cuda") else ("quick" if args.quick else "cpu")
    )
    cfg = dict(PRESETS[preset], preset=preset, device=device)
    for key in list(PRESETS["cpu"]):
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    for key in ("n_train", "n_test", "epochs", "period", "teacher_epochs", "batch_size", "repeats"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be an int >= 1, got {cfg[key]!r}")
    if cfg["num_workers"] < 0:
        raise SystemExit(f"--num-workers must be >= 0, got {cfg['num_workers']}")
    if cfg["epochs"] % cfg["period"]:
        raise SystemExit(f"--epochs ({cfg['epochs']}) must be a multiple of --period ({cfg['period']})")
    return cfg


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def robust_seconds(result: Any) -> float:
    """A contention-robust estimate of a run's seconds: per epoch, steps x the median step
    time, plus the epoch-end time. Bursts of load from other processes on a shared machine
    inflate a few steps' wall clock; the median ignores them. (CPU runs; on CUDA host step
    times only track the device in steady state.)"""
    return float(sum(e.steps * e.step_median_s + e.epoch_end_s for e in result.epochs))


def retime_condensations(loader: Any, images: torch.Tensor) -> dict[str, float]:
    """Re-times, apart, what each of ``loader``'s condensations did at its epoch end, on
    the final value bank: the values (``bank.values()``), ``condense`` (ranking + pairs)
    and the VAKS ``blend_`` on a scratch copy of the images. An estimate of the split of
    the measured epoch-end time (the in-loop total stays the reference)."""
    out = {"values_s": 0.0, "condense_s": 0.0, "summary_s": 0.0}
    scratch = images.clone()
    sizes = loader.schedule.epoch_sizes(loader.n)
    for rec in loader.history:
        e = rec["epoch"]
        t0 = time.perf_counter()
        values = loader.bank.values()
        t1 = time.perf_counter()
        cond = condense(values, sizes[e], sizes[e - 1], loader.vaks.value, loader.eps_m, seed=e)
        t2 = time.perf_counter()
        if cond.pairs:
            dev = scratch.device
            blend_(scratch, cond.dst.to(dev), cond.src.to(dev), cond.eps.to(dev))
        if scratch.is_cuda:
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        out["values_s"] += t1 - t0
        out["condense_s"] += t2 - t1
        out["summary_s"] += t3 - t2
    return out


def feed_seconds(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    num_workers: int,
    seed: int,
    backend: str = "torch",
    augment: str = "crop_flip",
    repeats: int = 5,
) -> dict[str, float]:
    """Seconds of one epoch of data alone (no model): torch's own ``DataLoader`` (shuffled,
    seeded generator, the per-item uint8 dataset the torch back end reads) and the vanilla KD
    loader on ``backend`` (a KCDLoader on ``full_schedule``; the tensor back end also crops and
    flips), passes interleaved in alternating order; medians of ``repeats``."""
    ds = ArrayDataset(x, y, transform=keep_uint8)
    torch_dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
    kcd_ds, options, _ = train_data(x, y, backend, augment)
    kcd_dl = make_loader(
        "kd",
        kcd_ds,
        epochs=repeats + 1,
        batch_size=batch_size,
        num_workers=0 if backend == "tensor" else num_workers,
        seed=seed,
        backend=backend,
        **options,
    )
    times: dict[str, list[float]] = {"dataloader": [], "kcdloader": []}
    runs = {"dataloader": lambda: sum(1 for _ in torch_dl), "kcdloader": lambda: sum(1 for _ in kcd_dl)}
    for name in runs:  # warm-up: worker start, first touch
        runs[name]()
    for r in range(repeats):
        for name in ("dataloader", "kcdloader") if r % 2 == 0 else ("kcdloader", "dataloader"):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "backend": backend,
        "dataloader_s": med["dataloader"],
        "kcdloader_s": med["kcdloader"],
        "kcdloader_over_dataloader": med["kcdloader"] / med["dataloader"],
        "repeats": repeats,
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON-able result (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.digits:
        import digits_accuracy

        extra = [f"--{k}={v}" for k, v in (("json", args.json), ("plot", args.plot)) if v]
        return digits_accuracy.run(extra + (["--quick"] if args.quick else []))
    cfg = _resolve(args)
    device = cfg["device"]
    progress = not args.no_progress and sys.stderr.isatty()  # plain lines into logs
    t_all = time.perf_counter()

    # -- data ---------------------------------------------------------------------------------
    if args.data is None:
        x, y = synthetic_arrays(cfg["n_train"], image_size=args.image_size, seed=args.seed)
        xt, yt = synthetic_arrays(cfg["n_test"], image_size=args.image_size, seed=args.seed + 10_000)
        data_name = f"synthetic (embedded, {cfg['n_train']} train / {cfg['n_test']} test)"
    else:
        x, y, xt, yt = load_arrays(args.data, image_size=args.image_size, seed=args.seed)
        data_name = str(args.data)
    n, num_classes = int(x.shape[0]), int(max(y.max(), yt.max())) + 1
    shape = (int(x.shape[3]), int(x.shape[1]), int(x.shape[2]))
    schedule = CondensationSchedule(cfg["epochs"], cfg["period"], rho=args.rho, decay=args.decay, warmup=args.warmup)
    _say(f"data: {data_name}: {n} x {tuple(x.shape[1:])}, {num_classes} classes; device {device}; schedule {schedule}")

    # -- the two runs: identical but for the loader -------------------------------------------------
    augment = "crop_flip" if min(shape[1:]) >= 16 else "none"
    pre_args = ([0.5] * shape[0], [0.25] * shape[0])
    kd_cfg = KDConfig(lr=cfg["lr"])

    def build_loaders() -> dict[str, Any]:
        loaders = {}
        for kind in ("kd", "kcd"):
            # its own copy of the images: KCD summarises its images
            train_set, backend_options, _ = train_data(x, y, args.backend, augment, device)
            try:
                loaders[kind] = make_loader(
                    kind,
                    train_set,
                    epochs=cfg["epochs"],
                    period=cfg["period"],
                    rho=args.rho,
                    decay=args.decay,
                    warmup=args.warmup,
                    batch_size=cfg["batch_size"],
                    num_workers=0 if args.backend == "tensor" else cfg["num_workers"],
                    pin_memory=device.startswith("cuda"),
                    seed=args.seed,
                    backend=args.backend,
                    value=args.value,
                    vaks=args.vaks,
                    policy=args.policy if kind == "kcd" else "kcd",
                    **backend_options,
                )
            except (ImportError, NotImplementedError) as err:
                raise SystemExit(f"--backend {args.backend}: {err}") from err
        return loaders

    first_loaders = build_loaders()  # built before the teacher, so that a bad --backend fails at once
    pre_augment = train_data(x[:1], y[:1], args.backend, augment)[2]

    # -- teacher --------------------------------------------------------------------------------
    test_set = ArrayDataset(xt, yt, transform=keep_uint8)
    teacher_cfg = KDConfig(lr=cfg["lr"], gamma=1.0, alpha_kd=0.0)
    teacher, tinfo = cached_teacher(
        cfg["teacher"],
        ArrayDataset(x, y, transform=keep_uint8),
        num_classes=num_classes,
        input_shape=shape,
        config=teacher_cfg,
        epochs=cfg["teacher_epochs"],
        batch_size=cfg["batch_size"],
        preprocess=BatchPreprocess(*pre_args, augment=augment, seed=args.seed),
        test_set=test_set,
        cache_dir=default_cache_dir() if args.cache_dir is None else (args.cache_dir or None),
        device=device,
        seed=args.seed,
        progress=progress,
        log=_say,
    )

    def build_pair(loaders: dict[str, Any]) -> dict[str, KDTrainer]:
        trainers = {}
        for kind, loader in loaders.items():
            student = build_model(cfg["student"], num_classes, shape, seed=args.seed)
            trainers[kind] = KDTrainer(
                student,
                teacher,
                loader,
                kd_cfg,
                preprocess=BatchPreprocess(*pre_args, augment=pre_augment, seed=args.seed),
                device=device,
                test_loader=make_eval_loader(test_set),
                progress=progress,
                log=None if progress else _say,  # without bars: a line every ~15 s inside a long epoch
                name="vanilla" if kind == "kd" else "KCD",
            )
        return trainers

    # warm-up: one untimed epoch of a throw-away vanilla run (allocator, kernel and library caches,
    # first-touch of shapes), so that neither timed run pays for it in its first epoch
    warm = build_pair(build_loaders())["kd"]
    warm.train_epoch()
    del warm
    epochs, repeats = cfg["epochs"], cfg["repeats"]
    runs = []
    for r in range(repeats):
        trainers = build_pair(first_loaders if r == 0 else build_loaders())
        order = ("kd", "kcd") if r % 2 == 0 else ("kcd", "kd")  # who goes first in epoch 0 alternates too
        if args.order == "sequential":
            plan = [(kind, e) for kind in order for e in range(epochs)]
        else:
            plan = [(kind, e) for e in range(epochs) for kind in (order if e % 2 == 0 else order[::-1])]
        for kind, e in plan:
            rec = trainers[kind].train_epoch()
            _say(
                f"run {r + 1}/{repeats} epoch {e + 1}/{epochs} {'vanilla' if kind == 'kd' else 'KCD':>7}: "
                f"{rec.samples} samples, {rec.seconds:.2f} s, loss {rec.loss:.4f}, lr {rec.lr_start:.4g}"
            )
        runs.append(({kind: trainers[kind].result() for kind in ("kd", "kcd")}, trainers))
    ratios = [res["kcd"].seconds / res["kd"].seconds for res, _ in runs]
    median_run = sorted(range(repeats), key=lambda i: ratios[i])[(repeats - 1) // 2]
    results, trainers = runs[median_run]
    feed = (
        feed_seconds(x, y, cfg["batch_size"], cfg["num_workers"], args.seed, args.backend, augment)
        if args.backend in ("torch", "tensor")
        else {}
    )
    kcd_loader = trainers["kcd"].loader
    retimed = retime_condensations(kcd_loader, kcd_loader.images) if kcd_loader.images is not None else {}

    # -- report -----------------------------------------------------------------------------------
    van, kcd = results["kd"], results["kcd"]
    expected = schedule.epoch_sizes(n)
    theo, paper = schedule.relative_cost(n), schedule.paper_cost
    measured = float(np.median(ratios))
    cpu_ratio = kcd.cpu_s / van.cpu_s if van.cpu_s > 0 else float("nan")
    robust = {k: robust_seconds(res) for k, res in results.items()}
    overhead_s = kcd.observe_s + kcd.epoch_end_s
    out: dict[str, Any] = {
        "theoretical_C": theo,
        "paper_C": paper,
        "measured_ratio": measured,
        "measured_ratio_runs": ratios,
        "measured_ratio_spread": [min(ratios), max(ratios)],
        "repeats": repeats,
        "reported_run": median_run,
        "measured_ratio_cpu_time": cpu_ratio,
        "measured_ratio_robust": robust["kcd"] / robust["kd"],
        "samples_ratio": kcd.samples / van.samples,
        "delta_vs_theoretical_C": measured - theo,
        # one-sided: KCD should cost at most C (+0.02 for its own overhead); below C is good news
        "goal_within_0.02": measured <= theo + 0.02,
        "verdict": verdict(measured, theo, min(ratios), max(ratios), repeats),
        "schedule": schedule.state(),
        "n_train": n,
        "n_test": int(xt.shape[0]),
        "num_classes": num_classes,
        "data": data_name,
        "teacher": {"name": cfg["teacher"], "params": count_parameters(teacher), **tinfo},
        "student": {"name": cfg["student"], "params": count_parameters(trainers["kd"].student)},
        "config": {
            **cfg,
            "kd": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(kd_cfg).items()},
            "order": args.order + " (who goes first alternates every epoch and, in epoch 0, every run)",
            "warm_up": "one untimed epoch of a throw-away vanilla run",
            "backend": args.backend,
            "value": args.value,
            "vaks": args.vaks,
            "seed": args.seed,
            "augment": augment,
        },
        "vanilla": van.to_dict(),
        "kcd": {**kcd.to_dict(), "epoch_samples_expected": expected},
        "runs": [
            {"measured_ratio": ratios[i], "vanilla": res["kd"].to_dict(), "kcd": res["kcd"].to_dict()}
            for i, (res, _) in enumerate(runs)
        ],
        "overhead": {
            "scoring_s": kcd.observe_s,
            "epoch_end_s": kcd.epoch_end_s,
            "vanilla_epoch_end_s": van.epoch_end_s,
            "retimed": retimed,
            "total_s": overhead_s,
            "fraction_of_kcd_run": overhead_s / kcd.seconds,
            "goal_under_0.02": overhead_s / kcd.seconds < 0.02,
        },
        "feed": feed,
        "accuracy_delta": (kcd.accuracy or 0.0) - (van.accuracy or 0.0),
        "machine": machine_info(device),
        "wall_seconds_total": time.perf_counter() - t_all,
    }
    print_report(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else Path(args.out) / f"throughput-{stamp}.json"
    plot_path = Path(args.plot) if args.plot else Path(args.out) / f"throughput-{stamp}.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    _say(f"wrote {json_path}")
    try:
        plot(out, str(plot_path))
        _say(f"wrote {plot_path}")
    except ImportError as err:  # matplotlib is the bench extra
        _say(f"no plot ({err}); pip install matplotlib")
    return out


def verdict(measured: float, theo: float, lo: float, hi: float, repeats: int) -> str:
    """What the run says, in words: the measured ratio against the schedule's C (one-sided:
    at or below C is the saving the schedule promises, or better)."""
    spread = f"; the {repeats} pairs ranged {lo:.3f}-{hi:.3f}" if repeats > 1 else ""
    head = f"KCD took {measured:.3f} of vanilla KD's wall-clock time; its schedule trains a share C = {theo:.3f}"
    d = measured - theo
    if d < -0.02:
        return (
            f"{head}: {-d:.3f} below C, faster than its sample count predicts (good news: shorter epochs also "
            f"run faster per sample here{spread})"
        )
    if d <= 0.02:
        return f"{head}: within 0.02 of C, the saving the schedule promises{spread}"
    return (
        f"{head}: {d:.3f} above C, so KCD's own work (scoring, condensation, summaries) or noise on this "
        f"machine took part of the saving{spread}"
    )


def print_report(r: dict[str, Any]) -> None:
    """Prints the per-epoch table, the totals, C, accuracies and the overhead."""
    van, kcd = r["vanilla"], r["kcd"]
    exp = kcd["epoch_samples_expected"]
    m = r["machine"]
    dev = m.get("gpu") or f"{m['processor']} ({m['cpu_count']} cores)"
    print(
        f"\nKCD vs vanilla KD: {r['teacher']['name']} -> {r['student']['name']} on {r['data']}; "
        f"{r['schedule']}; {dev}; torch {m['torch']}"
    )
    hdr = (
        f"{'epoch':>5} | {'vanilla n':>9} {'vanilla s':>9} | {'KCD n':>7} {'expected':>8} {'KCD s':>7} | "
        f"{'n ratio':>7} {'s ratio':>7} | condensation"
    )
    print(hdr)
    print("-" * len(hdr))
    cond = {c["epoch"]: c for c in kcd["history"]}
    for e in range(len(van["epoch_samples"])):
        vs, ks = van["epoch_seconds"][e], kcd["epoch_seconds"][e]
        vn, kn = van["epoch_samples"][e], kcd["epoch_samples"][e]
        note = ""
        if e + 1 in cond:
            c = cond[e + 1]
            note = f"after: kept {c['kept']}, dropped {c['dropped']}, {c['pairs']} pairs summarised"
        print(
            f"{e:>5} | {vn:>9} {vs:>9.2f} | {kn:>7} {exp[e]:>8} {ks:>7.2f} | {kn / vn:>7.3f} {ks / vs:>7.3f} | {note}"
        )
    print("-" * len(hdr))
    print(
        f"{'total':>5} | {van['samples']:>9} {van['seconds']:>9.2f} | {kcd['samples']:>7} {sum(exp):>8} "
        f"{kcd['seconds']:>7.2f} | {kcd['samples'] / van['samples']:>7.3f} "
        f"{kcd['seconds'] / van['seconds']:>7.3f} |"
    )
    o = r["overhead"]
    runs = ", ".join(f"{v:.4f}" for v in r["measured_ratio_runs"])
    print(
        f"\nmeasured ratio KCD / vanilla (wall clock): {r['measured_ratio']:.4f}, median of {r['repeats']} "
        f"interleaved pair(s) [{runs}]; the table shows run {r['reported_run'] + 1}   "
        f"(CPU time of this process: {r['measured_ratio_cpu_time']:.4f}; "
        f"median-step estimate: {r['measured_ratio_robust']:.4f})"
    )
    print(
        f"theoretical C (relative_cost of this schedule): {r['theoretical_C']:.4f}   "
        f"paper C (closed form): {r['paper_C']:.4f}   measured - C = {r['delta_vs_theoretical_C']:+.4f} "
        f"(the goal: at most C + 0.02: {'met' if r['goal_within_0.02'] else 'missed'})"
    )
    print(f"verdict: {r['verdict']}")
    t_acc = r["teacher"].get("accuracy")
    print(
        f"test accuracy: vanilla KD {van['accuracy']:.2f}%  KCD {kcd['accuracy']:.2f}%  "
        f"(delta {r['accuracy_delta']:+.2f}; teacher {t_acc if t_acc is None else f'{t_acc:.2f}%'})"
    )
    rt = o["retimed"]
    split = (
        (
            f"; re-timed apart: values {rt['values_s'] * 1e3:.1f} ms, "
            f"condense {rt['condense_s'] * 1e3:.1f} ms, "
            f"summary {rt['summary_s'] * 1e3:.1f} ms"
        )
        if rt
        else ""
    )
    print(
        f"KCD overhead: scoring (observe) {o['scoring_s']:.3f} s + epoch-end (values, condensation, summary) "
        f"{o['epoch_end_s']:.3f} s [vanilla epoch-end {o['vanilla_epoch_end_s']:.3f} s] "
        f"= {o['total_s']:.3f} s = "
        f"{100 * o['fraction_of_kcd_run']:.2f}% of the KCD run{split}"
    )
    f = r.get("feed") or {}
    if f:
        print(
            f"feed (one epoch of data, no model, median of {f['repeats']}): torch DataLoader "
            f"{f['dataloader_s']:.3f} s, KCDLoader (vanilla schedule, {f.get('backend', 'torch')} back end) "
            f"{f['kcdloader_s']:.3f} s "
            f"= {f['kcdloader_over_dataloader']:.3f}x"
        )


def plot(r: dict[str, Any], path: str) -> None:
    """Per-epoch seconds and samples and the cumulative ratio against C: every interleaved pair
    as thin lines, the median pair (the one the table shows) in bold; legends below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    van, kcd = r["vanilla"], r["kcd"]
    runs = r.get("runs") or [{"vanilla": van, "kcd": kcd, "measured_ratio": r["measured_ratio"]}]
    median = r.get("reported_run", 0)
    e = np.arange(len(van["epoch_seconds"]))
    fig, ax = plt.subplots(1, 3, figsize=(16, 5.4))
    w = 0.4
    thin = {"lw": 0.8, "alpha": 0.55}
    ax[0].bar(e - w / 2, van["epoch_seconds"], w, color="C0", alpha=0.35, label="vanilla KD (median pair)")
    ax[0].bar(e + w / 2, kcd["epoch_seconds"], w, color="C1", alpha=0.35, label="KCD (median pair)")
    for i, run in enumerate(runs):
        lab = i == 0
        ax[0].plot(e - w / 2, run["vanilla"]["epoch_seconds"], "o-", color="C0", ms=2, **thin,
                   label="vanilla KD, each pair" if lab else None)  # fmt: skip
        ax[0].plot(e + w / 2, run["kcd"]["epoch_seconds"], "o-", color="C1", ms=2, **thin,
                   label="KCD, each pair" if lab else None)  # fmt: skip
    ax[0].axhline(
        np.median(van["epoch_seconds"]) * r["theoretical_C"],
        color="k",
        ls="--",
        lw=1,
        label=f"median vanilla epoch x C ({r['theoretical_C']:.3f})",
    )
    ax[0].set(xlabel="epoch", ylabel="seconds", title="seconds per epoch")
    ax[1].bar(e - w / 2, van["epoch_samples"], w, label="vanilla KD")
    ax[1].bar(e + w / 2, kcd["epoch_samples"], w, label="KCD")
    ax[1].plot(e, kcd["epoch_samples_expected"], "k.", label="schedule")
    ax[1].axhline(r["n_train"] * r["theoretical_C"], color="k", ls="--", lw=1, label="N x C")
    ax[1].set(xlabel="epoch", ylabel="samples", title="samples per epoch (the same in every pair)")
    cums = [np.cumsum(run["kcd"]["epoch_seconds"]) / np.cumsum(run["vanilla"]["epoch_seconds"]) for run in runs]
    others = [c for i, c in enumerate(cums) if i != median]
    for k, cum in enumerate(others):
        ax[2].plot(e, cum, "-", color="C0", **thin, label="seconds ratio, the other pairs" if k == 0 else None)
    if len(cums) > 1:
        ax[2].fill_between(e, np.min(cums, axis=0), np.max(cums, axis=0), color="C0", alpha=0.12, label="range")
    ax[2].plot(e, cums[median], "o-", color="C0", lw=2, label="seconds ratio, median pair (cumulative)")
    cum_n = np.cumsum(kcd["epoch_samples"]) / np.cumsum(van["epoch_samples"])
    ax[2].plot(e, cum_n, "s--", color="C2", label="samples ratio (cumulative)")
    ax[2].axhline(r["theoretical_C"], color="k", ls="--", lw=1, label=f"theoretical C {r['theoretical_C']:.4f}")
    ax[2].axhline(r["paper_C"], color="grey", ls=":", lw=1, label=f"paper C {r['paper_C']:.4f}")
    ax[2].set(
        xlabel="epoch",
        ylabel="KCD / vanilla",
        title=f"measured {r['measured_ratio']:.3f} (median of {len(runs)}) vs C {r['theoretical_C']:.3f}",
    )
    for a in ax:  # below the axes: never over the bars or lines
        a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    m = r["machine"]
    dev = m.get("gpu") or f"{m['cpu_count']} CPU cores"
    fig.suptitle(
        f"KCD vs vanilla KD ({r['teacher']['name']} -> {r['student']['name']}, N = {r['n_train']}, "
        f"{dev}): accuracy {van['accuracy']:.2f}% vs {kcd['accuracy']:.2f}%",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
