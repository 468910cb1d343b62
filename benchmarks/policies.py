"""Pruning policies side by side: accuracy against compute, on one engine, many seeds.

Every method trains the same student from the same initialisation against the same cached
teacher, through a :class:`kcd_fast.KCDLoader` and :class:`kcd_fast.kd.KDTrainer` (Hinton
KD, T = 4, SGD, cosine LR indexed by epoch); they differ only in the loader's policy:

- ``vanilla``: every point every epoch (``kcd_fast.kd.full_schedule``);
- ``kcd``: KCD with the paper's defaults (rho 0.7, exp decay, VAKS "low", entropy values);
- ``kcd_vaks_off``: the same without the VAKS summary;
- ``kcd_class``: VAKS "low" with ``vaks_pairing="class"`` (a dropped point only into a kept
  point of its own class);
- ``random``: the random-subset baseline: a uniformly random subset at KCD's exact
  per-epoch counts (``value="random"``, ``vaks="off"``);
- ``infobatch``: :class:`kcd_fast.InfoBatchSchedule` (prune 0.5, delta 0.875): per-sample
  loss scores, loss weights ``1 / (1 - prune)`` on the kept well-learned points;
- ``kcd_at_ib``: KCD (VAKS "low") with rho solved per seed so that its schedule trains the
  fraction of the samples the same seed's InfoBatch run trained.

Methods are interleaved per seed (the order rotates with the seed; ``kcd_at_ib`` runs right
after ``infobatch``, whose budget it needs), so that drift of a shared machine spreads over
all of them. Per method: the wall-clock ratio to the same seed's vanilla run (median and
range), the trained fraction (samples / vanilla's), accuracy mean +- std, and the paired
difference to vanilla with a 95% t interval.

Data: ``--data digits`` (scikit-learn's 8x8 digits upsampled to 16x16, stratified 80/20:
1438 / 359; no augmentation by default: the MLP student cannot follow random crops) or
``--data embedded`` (the main job's generated class-conditional set,
``kcd_fast.kd.synthetic_arrays``, 32x32 as in the main job, random crops and flips). ``--augment`` overrides.

Usage:
    python benchmarks/policies.py --data digits --seeds 10 \\
        --json benchmarks/results/policies_digits.json --plot benchmarks/results/policies_digits.png
    python benchmarks/policies.py --quick            # a smoke run: seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
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

from kcd_fast import ArrayDataset, CondensationSchedule, InfoBatchSchedule, KCDLoader  # noqa: E402
from kcd_fast.kd import (  # noqa: E402
    BatchPreprocess,
    KDConfig,
    KDTrainer,
    build_model,
    cached_teacher,
    count_parameters,
    digits_arrays,
    keep_uint8,
    make_eval_loader,
    split_arrays,
    synthetic_arrays,
)
from kcd_fast.kd.trainer import full_schedule  # noqa: E402

METHODS = ("vanilla", "kcd", "kcd_vaks_off", "kcd_class", "random", "infobatch", "kcd_at_ib")
LABELS = {
    "vanilla": "vanilla KD",
    "kcd": "KCD (rho 0.7, VAKS low)",
    "kcd_vaks_off": 'KCD, vaks="off"',
    "kcd_class": 'KCD, vaks_pairing="class"',
    "random": "random subset at KCD's counts",
    "infobatch": "InfoBatch (prune 0.5, delta 0.875)",
    "kcd_at_ib": "KCD at InfoBatch's budget",
}

PRESETS: dict[str, dict[str, Any]] = {
    # student LR 0.01: at 0.05 InfoBatch's doubled weights diverged on 5 of 10 seeds (results/policies_digits_lr05)
    "digits": {"epochs": 40, "period": 8, "batch_size": 64, "lr": 0.01, "teacher_epochs": 30},
    # the MLP student is unstable at lr 0.05 on 32x32 inputs (the KD loss carries T^2 = 16): 0.01
    "embedded": {"epochs": 40, "period": 8, "batch_size": 64, "lr": 0.01, "teacher_epochs": 30},
    "quick": {"epochs": 2, "period": 1, "batch_size": 32, "lr": 0.05, "teacher_epochs": 1},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="digits", choices=("digits", "embedded"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, 128 points (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..k-1 (default 10; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default 40; quick 2)")
    p.add_argument("--period", type=int, default=None, help="KCD period (default 8; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=None, help="the student's SGD LR (default 0.01)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="InfoBatch's prune ratio")
    p.add_argument("--delta", type=float, default=0.875, help="InfoBatch's delta")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--n-train", type=int, default=None, help="embedded: training points (default 2000)")
    p.add_argument("--n-test", type=int, default=None, help="embedded: test points (default 1000)")
    p.add_argument("--image-size", type=int, default=32, help="embedded: image size (default 32, the main job's)")
    p.add_argument(
        "--augment",
        default=None,
        choices=("none", "crop", "crop_flip"),
        help="batch augmentation of teacher and student (default: none for digits, crop_flip for embedded)",
    )
    p.add_argument("--teacher", default="convnet_s")
    p.add_argument("--student", default="mlp_s")
    p.add_argument("--cache-dir", default=str(HERE / "cache"), help="teacher checkpoints ('' disables)")
    p.add_argument("--note", default="", help="a free-text note stored in the JSON (why a run was shortened, ...)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x_train, y_train, x_test, y_test, description)``, uint8 NHWC."""
    if args.data == "digits":
        x, y = digits_arrays()
        x = np.kron(x[..., 0], np.ones((1, 2, 2), dtype=np.uint8))[..., None]  # 8x8 -> 16x16, nearest
        xtr, ytr, xte, yte = split_arrays(x, y, 0.2, seed=0)
        if args.quick:
            xtr, ytr = xtr[:128], ytr[:128]
        return xtr, ytr, xte, yte, "sklearn digits, 8x8 upsampled to 16x16, stratified 80/20"
    n_train = args.n_train or (128 if args.quick else 2000)
    n_test = args.n_test or (64 if args.quick else 1000)
    xtr, ytr = synthetic_arrays(n_train, image_size=args.image_size, seed=0)
    xte, yte = synthetic_arrays(n_test, image_size=args.image_size, seed=10_000)
    return xtr, ytr, xte, yte, f"embedded synthetic (kcd_fast.kd.synthetic_arrays), {args.image_size}x{args.image_size}"


def rho_for_fraction(fraction: float, epochs: int, period: int, n: int) -> float:
    """The rho whose CondensationSchedule(epochs, period, rho).relative_cost(n) is closest to
    ``fraction`` (bisection; the cost grows with rho)."""
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if CondensationSchedule(epochs, period, rho=mid).relative_cost(n) < fraction:
            lo = mid
        else:
            hi = mid
    return hi


def make_method_loader(method: str, xtr: np.ndarray, ytr: np.ndarray, cfg: dict[str, Any], seed: int, rho: float):
    """The KCDLoader of one method (its own copy of the images: VAKS writes into them)."""
    ds = ArrayDataset(xtr, ytr, transform=keep_uint8)
    epochs, period = cfg["epochs"], cfg["period"]
    common = {"batch_size": cfg["batch_size"], "shuffle": True, "seed": seed}
    kcd = CondensationSchedule(epochs, period, rho=rho)
    if method == "vanilla":
        return KCDLoader(ds, full_schedule(epochs), vaks="off", **common)
    if method in ("kcd", "kcd_at_ib"):
        return KCDLoader(ds, kcd, vaks="low", **common)
    if method == "kcd_vaks_off":
        return KCDLoader(ds, kcd, vaks="off", **common)
    if method == "kcd_class":
        return KCDLoader(ds, kcd, vaks="low", vaks_pairing="class", **common)
    if method == "random":
        return KCDLoader(ds, kcd, value="random", vaks="off", **common)
    if method == "infobatch":
        ib = InfoBatchSchedule(epochs, prune_ratio=cfg["prune_ratio"], delta=cfg["delta"])
        return KCDLoader(ds, ib, vaks="off", **common)
    raise ValueError(f"unknown method {method!r}")


def vaks_pairs(loader: KCDLoader, labels: np.ndarray) -> dict[str, Any]:
    """What the run's VAKS summaries did: pairs, the share whose two points are of different
    classes (the kept label stays), and the mean weight ``1 - eps`` the dropped image got in them."""
    summaries = loader.state_dict()["summaries"]
    if not summaries:
        return {}
    dst = np.concatenate([s["dst"].numpy() for s in summaries])
    src = np.concatenate([s["src"].numpy() for s in summaries])
    eps = np.concatenate([s["eps"].numpy() for s in summaries])
    cross = labels[dst] != labels[src]
    return {
        "vaks_pairs": int(dst.shape[0]),
        "vaks_cross_class_share": float(cross.mean()),
        "vaks_cross_class_mean_src_weight": float((1.0 - eps[cross]).mean()) if cross.any() else 0.0,
    }


def seed_order(methods: list[str], seed: int) -> list[str]:
    """The methods of one seed: rotated by the seed, ``kcd_at_ib`` right after ``infobatch``."""
    base = [m for m in methods if m != "kcd_at_ib"]
    k = seed % len(base)
    order = base[k:] + base[:k]
    if "kcd_at_ib" in methods:
        order.insert(order.index("infobatch") + 1, "kcd_at_ib")
    return order


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return 1.96


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out = {}
    for m in methods:
        acc = [r[m]["accuracy"] for r in rows]
        ratio = [r[m]["seconds"] / r["vanilla"]["seconds"] for r in rows]
        frac = [r[m]["samples"] / r["vanilla"]["samples"] for r in rows]
        delta = [r[m]["accuracy"] - r["vanilla"]["accuracy"] for r in rows]
        k = len(rows)
        d_sd = statistics.stdev(delta) if k > 1 else 0.0
        half = t95(k - 1) * d_sd / math.sqrt(k) if k > 1 else float("nan")
        a_sd = statistics.stdev(acc) if k > 1 else 0.0
        out[m] = {
            "label": LABELS[m],
            "wall_ratio": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)},
            "trained_fraction": {"mean": statistics.fmean(frac), "min": min(frac), "max": max(frac)},
            "accuracy": {
                "mean": statistics.fmean(acc),
                "std": a_sd,
                "ci95_half": t95(k - 1) * a_sd / math.sqrt(k) if k > 1 else float("nan"),
            },
            "paired_delta": {
                "mean": statistics.fmean(delta),
                "std": d_sd,
                "ci95": [statistics.fmean(delta) - half, statistics.fmean(delta) + half],
            },
            "ms_per_trained_sample": statistics.median(1e3 * r[m]["seconds"] / r[m]["samples"] for r in rows),
        }
        if all("vaks_pairs" in r[m] for r in rows):
            out[m]["vaks_pairs_mean"] = statistics.fmean(r[m]["vaks_pairs"] for r in rows)
            out[m]["vaks_cross_class_share_mean"] = statistics.fmean(r[m]["vaks_cross_class_share"] for r in rows)
    return out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and returns the JSON-able result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else args.data])
    cfg = {
        "epochs": args.epochs or preset["epochs"],
        "period": args.period or preset["period"],
        "batch_size": preset["batch_size"],
        "lr": args.lr or preset["lr"],
        "teacher_lr": 0.05,
        "teacher_epochs": preset["teacher_epochs"],
        "prune_ratio": args.prune_ratio,
        "delta": args.delta,
    }
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 10)))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "vanilla" not in methods:
        parser.error(f"--methods must include vanilla and name only {', '.join(METHODS)}; got {args.methods!r}")
    if "kcd_at_ib" in methods and "infobatch" not in methods:
        parser.error("--methods: kcd_at_ib needs infobatch (it matches InfoBatch's measured budget)")
    if not seeds:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if cfg["epochs"] % cfg["period"]:
        parser.error(f"--epochs ({cfg['epochs']}) must be a multiple of --period ({cfg['period']})")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    xtr, ytr, xte, yte, data_desc = load_data(args)
    n, shape = int(xtr.shape[0]), (int(xtr.shape[3]), int(xtr.shape[1]), int(xtr.shape[2]))
    num_classes = int(max(ytr.max(), yte.max())) + 1
    augment = args.augment or ("none" if args.data == "digits" else "crop_flip")
    pre = ([0.5] * shape[0], [0.25] * shape[0])
    test_set = ArrayDataset(xte, yte, transform=keep_uint8)
    teacher, tinfo = cached_teacher(
        args.teacher,
        ArrayDataset(xtr, ytr, transform=keep_uint8),
        num_classes=num_classes,
        input_shape=shape,
        config=KDConfig(lr=cfg["teacher_lr"], gamma=1.0, alpha_kd=0.0),
        epochs=cfg["teacher_epochs"],
        batch_size=cfg["batch_size"],
        preprocess=BatchPreprocess(*pre, augment=augment, seed=0),
        test_set=test_set,
        cache_dir=args.cache_dir or None,
        log=lambda m: print(m, file=sys.stderr),
    )
    kd_cfg = KDConfig(lr=cfg["lr"])
    student_params = count_parameters(build_model(args.student, num_classes, shape, seed=0))
    print(
        f"{data_desc}: {n} train / {xte.shape[0]} test; {args.teacher} ({count_parameters(teacher)} params, "
        f"{tinfo['accuracy']:.2f}%) -> {args.student} ({student_params} params); {cfg['epochs']} epochs; "
        f"seeds {seeds[0]}..{seeds[-1]}",
        flush=True,
    )
    # warm-up: one untimed vanilla epoch (allocator, kernel and library caches), so that the
    # first timed run does not pay for them
    KDTrainer(
        build_model(args.student, num_classes, shape, seed=0),
        teacher,
        make_method_loader("vanilla", xtr, ytr, cfg, 0, args.rho),
        kd_cfg,
        preprocess=BatchPreprocess(*pre, augment=augment, seed=0),
    ).train_epoch()
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed, "order": seed_order(methods, seed)}
        for m in row["order"]:
            rho = args.rho
            if m == "kcd_at_ib":
                rho = rho_for_fraction(
                    row["infobatch"]["samples"] / (n * cfg["epochs"]), cfg["epochs"], cfg["period"], n
                )
            loader = make_method_loader(m, xtr, ytr, cfg, seed, rho)
            trainer = KDTrainer(
                build_model(args.student, num_classes, shape, seed=seed),
                teacher,
                loader,
                kd_cfg,
                preprocess=BatchPreprocess(*pre, augment=augment, seed=seed),
                test_loader=make_eval_loader(test_set),
                name=m,
            )
            res = trainer.fit()
            row[m] = {"accuracy": res.accuracy, "seconds": res.seconds, "samples": res.samples}
            row[m].update(vaks_pairs(loader, ytr))
            if m == "kcd_at_ib":
                row[m]["rho"] = rho
            print(
                f"seed {seed} {m:<13} acc {res.accuracy:6.2f}%  {res.seconds:7.2f} s  {res.samples:>7} samples"
                + (f"  rho {rho:.4f}" if m == "kcd_at_ib" else ""),
                flush=True,
            )
        rows.append(row)
        if args.json:  # the seeds so far, so that a run stopped early leaves its results
            partial = {"seeds": [r["seed"] for r in rows], "complete": False, "per_seed": rows}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(partial, indent=2, default=str) + "\n")
    summary = summarise(rows, methods)
    print_table(summary, methods)
    out = {
        "benchmark": "benchmarks/policies.py",
        "data": args.data,
        "data_description": data_desc,
        "quick": args.quick,
        "n_train": n,
        "n_test": int(xte.shape[0]),
        "seeds": seeds,
        "complete": True,
        "methods": methods,
        "config": {
            **cfg,
            "rho": args.rho,
            "teacher": args.teacher,
            "student": args.student,
            "student_params": student_params,
            "augment": augment,
            "kd": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(kd_cfg).items()},
        },
        "teacher": {"name": args.teacher, "params": count_parameters(teacher), **tinfo},
        "kcd_schedule": CondensationSchedule(cfg["epochs"], cfg["period"], rho=args.rho).state(),
        "kcd_theoretical_C": CondensationSchedule(cfg["epochs"], cfg["period"], rho=args.rho).relative_cost(n),
        "summary": summary,
        "per_seed": rows,
        "note": args.note,
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


def print_table(summary: dict[str, Any], methods: list[str]) -> None:
    print("| method | wall-clock / vanilla (median, range) | trained fraction | accuracy % | paired delta (95% CI) |")
    print("|---|---|---|---|---|")
    for m in methods:
        s = summary[m]
        w, d = s["wall_ratio"], s["paired_delta"]
        print(
            f"| {s['label']} | {w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f}) | "
            f"{s['trained_fraction']['mean']:.3f} | "
            f"{s['accuracy']['mean']:.2f} +- {s['accuracy']['std']:.2f} | "
            + ("-" if m == "vanilla" else f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
            + " |"
        )


def plot(r: dict[str, Any], path: str) -> None:
    """Accuracy (mean, 95% interval of the mean) against the trained fraction, one point per
    method (methods at the same fraction drawn side by side, 0.004 apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    placed: list[float] = []
    for m in r["methods"]:
        s = r["summary"][m]
        f, a = s["trained_fraction"], s["accuracy"]
        x = f["mean"] + 0.004 * sum(abs(p - f["mean"]) < 0.002 for p in placed)
        placed.append(f["mean"])
        ax.errorbar(
            x,
            a["mean"],
            yerr=0.0 if math.isnan(a["ci95_half"]) else a["ci95_half"],
            fmt="o",
            capsize=3,
            label=f"{s['label']}: {a['mean']:.2f}%, wall {s['wall_ratio']['median']:.2f}",
        )
    ax.set(
        xlabel="trained fraction of vanilla's samples (compute; side by side at equal fractions)",
        ylabel="test accuracy % (mean, 95% CI)",
        title=f"{r['data']}: {len(r['seeds'])} seeds, {r['config']['epochs']} epochs",
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
