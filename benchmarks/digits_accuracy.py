"""Accuracy on real data: vanilla KD vs KCD on sklearn's 8x8 handwritten digits.

The data ship with scikit-learn (1797 images, 10 classes; nothing is downloaded). A
stratified 25% is held out for testing. One MLP teacher (two hidden layers of 256) is
trained once (cached in the user's cache folder, kcd_fast.kd.default_cache_dir()); then for
each seed a small MLP student (one hidden layer of 32) is distilled with vanilla KD and with KCD, identical but for the
loader (same init, same first-epoch order, same hyper-parameters). Reports per seed and the
mean and sample standard deviation of both accuracies and of the paired difference.

``--ablation`` adds, per seed, KCD variants in the spirit of the paper's Table 7: the value
measure (entropy vs random) and VAKS (low, high, random, off), each against the same seed's
vanilla run (paired differences).

Usage:
    python benchmarks/digits_accuracy.py [--seeds 10] [--epochs 60 --period 10 --rho 0.7]
        [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("kcd_fast") is None:  # run from a checkout without installing kcd_fast
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from _common import machine_info  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule  # noqa: E402
from kcd_fast.kd import (  # noqa: E402
    BatchPreprocess,
    KDConfig,
    KDTrainer,
    build_model,
    cached_teacher,
    default_cache_dir,
    digits_arrays,
    keep_uint8,
    make_eval_loader,
    make_loader,
    split_arrays,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 seeds, 30 epochs")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..k-1 (default 10; quick 3)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default 60; quick 30)")
    p.add_argument("--period", type=int, default=None, help="condensation period (default epochs / 6)")
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--value", default="entropy", choices=("entropy", "kl", "random"))
    p.add_argument("--vaks", default="low", choices=("low", "high", "random", "off"))
    p.add_argument("--teacher", default="mlp_t")
    p.add_argument("--student", default="mlp_s")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="folder of cached teachers ('' disables; default: the user's cache folder, as python -m kcd_fast.kd)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also KCD with value=random and with vaks=high/random/off (paired against vanilla per seed)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and returns the JSON-able result."""
    args = build_parser().parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (3 if args.quick else 10)
    epochs = args.epochs if args.epochs is not None else (30 if args.quick else 60)
    period = args.period if args.period is not None else max(1, epochs // 6)
    for name, v in (("--seeds", seeds), ("--epochs", epochs), ("--period", period)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    if epochs % period:
        raise SystemExit(f"--epochs ({epochs}) must be a multiple of --period ({period})")
    t_all = time.perf_counter()
    x, y = digits_arrays()
    xtr, ytr, xte, yte = split_arrays(x, y, 0.25, seed=0)
    n, shape = int(xtr.shape[0]), (1, 8, 8)
    schedule = CondensationSchedule(epochs, period, rho=args.rho)
    pre = ([0.5], [0.25])
    test_set = ArrayDataset(xte, yte, transform=keep_uint8)
    teacher, tinfo = cached_teacher(
        args.teacher,
        ArrayDataset(xtr, ytr, transform=keep_uint8),
        num_classes=10,
        input_shape=shape,
        config=KDConfig(lr=args.lr, gamma=1.0, alpha_kd=0.0),
        epochs=args.teacher_epochs,
        batch_size=args.batch_size,
        preprocess=BatchPreprocess(*pre, augment="none"),
        test_set=test_set,
        cache_dir=default_cache_dir() if args.cache_dir is None else (args.cache_dir or None),
        log=lambda m: print(m, file=sys.stderr),
    )
    cfg = KDConfig(lr=args.lr)
    rows = []
    print(
        f"digits: {n} train / {xte.shape[0]} test; {args.teacher} -> {args.student}; {schedule}; "
        f"teacher accuracy {tinfo['accuracy']:.2f}%",
        flush=True,
    )
    variants = {"kd": ("kd", args.value, args.vaks), "kcd": ("kcd", args.value, args.vaks)}
    if args.ablation:
        for value, vaks in (("random", "low"), ("entropy", "high"), ("entropy", "random"), ("entropy", "off")):
            variants[f"kcd_value={value}_vaks={vaks}"] = ("kcd", value, vaks)
    print(f"{'seed':>4} | {'vanilla KD':>10} | {'KCD':>7} | {'delta':>6} | {'vanilla s':>9} | {'KCD s':>6}")
    for seed in range(seeds):
        row: dict[str, Any] = {"seed": seed}
        for kind, (mode, value, vaks) in variants.items():
            loader = make_loader(
                mode,
                ArrayDataset(xtr, ytr, transform=keep_uint8),
                epochs=epochs,
                period=period,
                rho=args.rho,
                batch_size=args.batch_size,
                seed=seed,
                value=value,
                vaks=vaks,
            )
            trainer = KDTrainer(
                build_model(args.student, 10, shape, seed=seed),
                teacher,
                loader,
                cfg,
                preprocess=BatchPreprocess(*pre, augment="none", seed=seed),
                test_loader=make_eval_loader(test_set),
                name=kind,
            )
            res = trainer.fit()
            row[kind] = res.accuracy
            row[f"{kind}_seconds"] = res.seconds
            row[f"{kind}_samples"] = res.samples
        rows.append(row)
        print(
            f"{seed:>4} | {row['kd']:>10.2f} | {row['kcd']:>7.2f} | {row['kcd'] - row['kd']:>+6.2f} | "
            f"{row['kd_seconds']:>9.2f} | {row['kcd_seconds']:>6.2f}",
            flush=True,
        )
    kd_m, kd_s = _mean_std([r["kd"] for r in rows])
    kcd_m, kcd_s = _mean_std([r["kcd"] for r in rows])
    d_m, d_s = _mean_std([r["kcd"] - r["kd"] for r in rows])
    t_kd, t_kcd = sum(r["kd_seconds"] for r in rows), sum(r["kcd_seconds"] for r in rows)
    ablation = {}
    for name, (_, value, vaks) in variants.items():
        if name == "kd":
            continue
        m, sd = _mean_std([r[name] for r in rows])
        dm, dsd = _mean_std([r[name] - r["kd"] for r in rows])
        ablation[name] = {"value": value, "vaks": vaks, "mean": m, "std": sd, "paired_delta": {"mean": dm, "std": dsd}}
        if args.ablation:
            print(f"  {name:<32} {m:6.2f} +- {sd:.2f}   paired delta vs vanilla {dm:+.2f} +- {dsd:.2f}")
    print(
        f"mean +- std over {seeds} seeds: vanilla KD {kd_m:.2f} +- {kd_s:.2f}   "
        f"KCD {kcd_m:.2f} +- {kcd_s:.2f}   "
        f"paired delta {d_m:+.2f} +- {d_s:.2f} (goal: >= -0.5)"
    )
    print(
        f"samples ratio {rows[0]['kcd_samples'] / rows[0]['kd_samples']:.4f} (theoretical C "
        f"{schedule.relative_cost(n):.4f}, paper C {schedule.paper_cost:.4f}); "
        f"seconds ratio {t_kcd / t_kd:.4f}"
    )
    out = {
        "task": "sklearn load_digits (8x8), stratified 25% test",
        "n_train": n,
        "n_test": int(xte.shape[0]),
        "schedule": schedule.state(),
        "theoretical_C": schedule.relative_cost(n),
        "paper_C": schedule.paper_cost,
        "teacher": {"name": args.teacher, **tinfo},
        "student": args.student,
        "config": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
            "batch_size": args.batch_size,
            "value": args.value,
            "vaks": args.vaks,
            "seeds": seeds,
            "lr_schedule": f"{cfg.lr_schedule}, indexed by {cfg.lr_index}",
        },
        "per_seed": rows,
        "vanilla": {"mean": kd_m, "std": kd_s, "accuracy": [r["kd"] for r in rows], "seconds": t_kd},
        "kcd": {"mean": kcd_m, "std": kcd_s, "accuracy": [r["kcd"] for r in rows], "seconds": t_kcd},
        "paired_delta": {"mean": d_m, "std": d_s},
        "ablation": ablation,
        "goal_delta_at_least_-0.5": d_m >= -0.5,
        "machine": machine_info("cpu"),
        "torch_threads": torch.get_num_threads(),
        "wall_seconds_total": time.perf_counter() - t_all,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot:
        plot(out, args.plot)
    return out


def plot(r: dict[str, Any], path: str) -> None:
    """Per-seed accuracies of both runs with their means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = [row["seed"] for row in r["per_seed"]]
    for key, label, m in (("vanilla", "vanilla KD", "o"), ("kcd", "KCD", "s")):
        ax.plot(seeds, r[key]["accuracy"], m, label=f"{label}: {r[key]['mean']:.2f} +- {r[key]['std']:.2f}")
        ax.axhline(r[key]["mean"], lw=1, ls="--", color=ax.lines[-1].get_color())
    ax.set(
        xlabel="seed",
        ylabel="test accuracy (%)",
        title=f"digits: {r['teacher']['name']} -> {r['student']}, C = {r['theoretical_C']:.3f}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
