"""Loader benchmark: KCDLoader (torch back end) side by side with torch's DataLoader on the
same ArrayDataset, the same per-sample transforms (CIFAR recipe: pad-4 random crop, flip,
to float, normalize) and the same workers.

1. Full keep (``rho = 1``: every epoch trains on all N points): samples/s of both loaders,
   epochs interleaved in pairs (alternating which runs first), median of repeats; the
   ratio of the medians is the headline, the median of the per-pair ratios is recorded
   beside it (it cancels slow drift of a shared machine). KCDLoader's loop includes
   ``observe`` (the scoring a KD loop adds). Goal: KCD / DataLoader >= 0.97.
2. After a condensation to rho * N points: epoch wall-clock of KCDLoader divided by the
   full-keep DataLoader epoch (medians; per-pair median beside it), against the kept
   fraction. Goal: within 3%. Beside it, a plain DataLoader over a Subset of the same kept
   points: any gap to the kept fraction that it shows too is the pipeline's fixed per-epoch
   cost (first batches, worker wake-up), not KCD's.

Both loaders use ``persistent_workers`` when ``num_workers > 0`` so that worker start-up
is not timed as part of an epoch.

Usage: python benchmarks/loader.py [--quick] [--json PATH] [--n N] [--workers 0 2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo root, when kcd_fast is not installed
from _common import machine_info  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader  # noqa: E402

CLASSES = 100


def cifar_transform() -> Any:
    """The CIFAR training recipe on uint8 [C, H, W] tensors (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomCrop(32, padding=4),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    ])


def make_dataset(n: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n)
    return ArrayDataset(images, labels, transform=cifar_transform())


def time_epoch(loader: Any, logits: torch.Tensor | None) -> tuple[float, int]:
    """Seconds for one full pass and the samples it yielded; ``logits`` [B, C]: observe
    each KCD batch with them (the scoring a KD loop adds)."""
    t0 = time.perf_counter()
    seen = 0
    for batch in loader:
        if logits is not None:
            x, _y, idx = batch
            loader.observe(idx, logits[: idx.shape[0]])
        else:
            x, _y = batch
        seen += x.shape[0]
    return time.perf_counter() - t0, seen


def bench_workers(ds: ArrayDataset, workers: int, batch_size: int, repeats: int, rhos: list[float],
                  seed: int) -> dict[str, Any]:
    persistent = workers > 0
    logits = torch.randn(batch_size, CLASSES, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    plain = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                        persistent_workers=persistent, generator=g)
    epochs = repeats + 1  # one warm-up epoch
    full = KCDLoader(ds, CondensationSchedule(epochs=epochs, period=epochs, rho=1.0), batch_size=batch_size,
                     shuffle=True, num_workers=workers, persistent_workers=persistent, seed=seed)
    t_plain, t_kcd = [], []
    for r in range(epochs):  # interleaved, alternating which goes first, so drift hits both alike
        if r % 2:
            tk, nk = time_epoch(full, logits)
            tp, np_ = time_epoch(plain, None)
        else:
            tp, np_ = time_epoch(plain, None)
            tk, nk = time_epoch(full, logits)
        assert np_ == nk == len(ds)
        if r > 0:
            t_plain.append(tp)
            t_kcd.append(tk)
    n = len(ds)
    med_plain, med_kcd = statistics.median(t_plain), statistics.median(t_kcd)
    out: dict[str, Any] = {
        "num_workers": workers,
        "full_keep": {
            "dataloader_samples_per_s": n / med_plain,
            "kcd_samples_per_s": n / med_kcd,
            "ratio": med_plain / med_kcd,
            "ratio_pairwise_median": statistics.median(p / k for p, k in zip(t_plain, t_kcd, strict=True)),
            "goal": ">= 0.97",
            "dataloader_epoch_s": t_plain,
            "kcd_epoch_s": t_kcd,
        },
        "after_condensation": [],
    }
    del full
    for rho in rhos:
        sched = CondensationSchedule(epochs=1 + epochs, period=1 + epochs, rho=rho, warmup=1)
        kcd = KCDLoader(ds, sched, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=persistent, seed=seed, vaks="off")
        time_epoch(kcd, logits)  # epoch 0 on all N points, then the condensation to rho * N
        kept = len(kcd.active_indices)
        # reference: a plain DataLoader over the same kept points (it pays the same per-epoch pipeline fill)
        subset = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, kcd.active_indices.tolist()), batch_size=batch_size, shuffle=True,
            num_workers=workers, persistent_workers=persistent, generator=torch.Generator().manual_seed(seed))
        time_epoch(subset, None)
        times, base, sub = [], [], []
        for r in range(epochs):
            runs = {}
            for which in ("plain", "kcd", "subset")[r % 3:] + ("plain", "kcd", "subset")[:r % 3]:  # rotate
                if which == "kcd":
                    runs[which], nk = time_epoch(kcd, logits)
                    assert nk == kept
                else:
                    runs[which] = time_epoch(plain if which == "plain" else subset, None)[0]
            if r > 0:
                base.append(runs["plain"])
                times.append(runs["kcd"])
                sub.append(runs["subset"])
        frac_time = statistics.median(times) / statistics.median(base)
        frac_pairs = statistics.median(k / p for k, p in zip(times, base, strict=True))
        out["after_condensation"].append({
            "rho": rho,
            "kept": kept,
            "kept_fraction": kept / n,
            "kcd_epoch_s": statistics.median(times),
            "dataloader_full_epoch_s": statistics.median(base),
            "time_fraction": frac_time,
            "deviation": frac_time / (kept / n) - 1.0,
            "time_fraction_pairwise_median": frac_pairs,
            "goal": "|deviation| <= 0.03",
            "dataloader_on_kept_subset_epoch_s": statistics.median(sub),
            "kcd_vs_subset_dataloader": statistics.median(sub) / statistics.median(times),
            "kcd_epochs_s": times,
            "dataloader_full_epochs_s": base,
            "dataloader_on_kept_subset_epochs_s": sub,
        })
        del subset
        del kcd
    del plain
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute on 2 cores")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--n", type=int, default=None, help="dataset size (default 8192 quick, 50000 full)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="num_workers values (default 2 quick, 0 and 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per loader (default 7 quick, 9)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.n or (8192 if args.quick else 50000)
    repeats = args.repeats or (7 if args.quick else 9)
    workers = args.workers if args.workers is not None else ([2] if args.quick else [0, 2])
    rhos = [0.7, 0.4] if args.quick else [0.9, 0.7, 0.5, 0.3]
    torch.set_num_threads(1)  # per-sample transforms; keep the main process from oversubscribing

    ds = make_dataset(n, args.seed)
    info = machine_info()
    info["load_average_before"] = list(os.getloadavg())
    import torchvision

    info["torchvision"] = torchvision.__version__
    result: dict[str, Any] = {
        "benchmark": "loader",
        "machine": info,
        "config": {"n": n, "image": [32, 32, 3], "batch_size": args.batch_size, "repeats": repeats,
                   "transform": "RandomCrop(32, pad 4), HFlip, ToDtype(float32), Normalize (torchvision v2)",
                   "observe": f"entropy of fixed [B, {CLASSES}] float32 logits per KCD batch",
                   "persistent_workers": "when num_workers > 0", "rhos": rhos, "quick": args.quick},
        "results": [],
    }
    for w in workers:
        r = bench_workers(ds, w, args.batch_size, repeats, rhos, args.seed)
        result["results"].append(r)
        fk = r["full_keep"]
        print(f"num_workers={w}: full keep  DataLoader {fk['dataloader_samples_per_s']:9.0f} samples/s  "
              f"KCDLoader {fk['kcd_samples_per_s']:9.0f} samples/s  ratio {fk['ratio']:.3f} (goal >= 0.97)")
        for a in r["after_condensation"]:
            print(f"num_workers={w}: rho {a['rho']:.2f}  kept {a['kept_fraction']:.3f}  epoch "
                  f"{a['kcd_epoch_s']:.3f} s vs full {a['dataloader_full_epoch_s']:.3f} s -> "
                  f"{a['time_fraction']:.3f} of full, deviation {a['deviation']:+.1%} (goal within 3%); "
                  f"DataLoader on the kept subset {a['dataloader_on_kept_subset_epoch_s']:.3f} s "
                  f"(speed ratio {a['kcd_vs_subset_dataloader']:.3f})")
    info["load_average_after"] = list(os.getloadavg())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
