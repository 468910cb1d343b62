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

``--workload jpeg``: the DALI back end on a JPEG folder (generated in code, cached under
``benchmarks/cache/``: N smooth synthetic 256 x 256 images, quality 90, 10 classes), ImageNet
training recipe (random resized crop 224, flip, normalize to float32 [B, 3, 224, 224]):
3. Full keep: images/s of torch's DataLoader over ``kcd_fast.ImageFolder`` with PIL +
   torchvision transforms (``num_workers`` = W processes, persistent) against
   ``KCDLoader(..., backend="dali")`` on the CPU (W DALI threads, a fresh pipeline per
   epoch, its build timed), epochs interleaved, medians. Goal: DALI / DataLoader >= 1.5.
4. After a condensation to rho * N points: the DALI epoch time against the full-keep DALI
   epoch, and the files read per epoch, counted twice (the back end's counter and Linux
   inotify ``IN_OPEN`` events on the folder): both must equal the surviving points.
The files sit in the page cache (they were just written or read): decoding, not the disk,
is what is measured. Where torch sees a GPU, the DALI back end runs there (``"mixed"``
decoding, CUDA outputs) and the DataLoader's batches are copied to the GPU (pinned) in its
timed loop; ``CUDA_VISIBLE_DEVICES=`` forces the CPU comparison.

``--workload tensor``: the tensor back end (issue 14's goals, ratios measured side by side):
5. ``KCDLoader(backend="tensor", augment="cifar")`` (one fused gather-crop-flip-normalize
   kernel per batch, no workers) against torch's DataLoader over the same ArrayDataset with
   the per-item torchvision v2 CIFAR recipe and 2 persistent workers: samples/s, epochs
   interleaved (alternating which runs first), medians. Goal >= 10x.
6. ``loader.observe(indices, logits)`` per call at B = 256, C = 10 on the CPU (median of
   thousands of calls). Goal <= 15 us.
7. ``kcd_fast.condense`` at N = 1,281,167 (the paper schedule's first condensation, VAKS low,
   on all the cores OpenMP has): 21 calls idle, then 21 with a process spinning on one core;
   the worst busy call against the idle median. Goal <= 3x.

Usage: python benchmarks/loader.py [--workload arrays|jpeg|tensor] [--quick] [--json PATH] [--n N]
       [--workers 0 2 ...]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if importlib.util.find_spec("kcd_fast") is None:  # run from a checkout without installing kcd_fast
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from _common import machine_info  # noqa: E402
from fileopens import FileOpens  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule, ImageFolder, KCDLoader  # noqa: E402

CLASSES = 100


def cifar_transform() -> Any:
    """The CIFAR training recipe on uint8 [C, H, W] tensors (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
        ]
    )


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
            x = batch[0]
        seen += x.shape[0]
    return time.perf_counter() - t0, seen


def bench_workers(
    ds: ArrayDataset, workers: int, batch_size: int, repeats: int, rhos: list[float], seed: int
) -> dict[str, Any]:
    persistent = workers > 0
    logits = torch.randn(batch_size, CLASSES, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    plain = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=persistent, generator=g
    )
    epochs = repeats + 1  # one warm-up epoch
    full = KCDLoader(
        ds,
        CondensationSchedule(epochs=epochs, period=epochs, rho=1.0),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=persistent,
        seed=seed,
    )
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
        kcd = KCDLoader(
            ds,
            sched,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=persistent,
            seed=seed,
            vaks="off",
        )
        time_epoch(kcd, logits)  # epoch 0 on all N points, then the condensation to rho * N
        kept = len(kcd.active_indices)
        # reference: a plain DataLoader over the same kept points (it pays the same per-epoch pipeline fill)
        subset = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, kcd.active_indices.tolist()),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=persistent,
            generator=torch.Generator().manual_seed(seed),
        )
        time_epoch(subset, None)
        times, base, sub = [], [], []
        for r in range(epochs):
            runs = {}
            for which in ("plain", "kcd", "subset")[r % 3 :] + ("plain", "kcd", "subset")[: r % 3]:  # rotate
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
        out["after_condensation"].append(
            {
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
            }
        )
        del subset
        del kcd
    del plain
    return out


# -- JPEG folder: DALI back end vs DataLoader + PIL ------------------------------------------------
JPEG_CLASSES = 10
CACHE = Path(__file__).resolve().parent / "cache"


def make_jpeg_folder(n: int, size: int = 256, seed: int = 0) -> Path:
    """``cache/jpeg<size>_n<n>_s<seed>/c<k>/<i>.jpg``: smooth synthetic images (a 6 x 6
    random grid upsampled bicubically plus mild noise, so JPEGs of a natural size),
    quality 90; written once, reused while complete."""
    from PIL import Image

    root = CACHE / f"jpeg{size}_n{n}_s{seed}"
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % JPEG_CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        img = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n}\n")
    return root


def imagenet_pil_transform() -> Any:
    """The ImageNet training recipe on PIL images (torchvision v2): crop and flip on PIL,
    then to float32 [3, 224, 224], normalize."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def bench_jpeg(root: Path, workers: int, batch_size: int, repeats: int, rho: float, seed: int) -> dict[str, Any]:
    n = len(ImageFolder(root))
    threads = max(1, workers)
    logits = torch.randn(n, JPEG_CLASSES, generator=torch.Generator().manual_seed(seed)) * 2  # per point

    gpu = torch.cuda.is_available()  # KCDLoader's DALI back end then runs on the GPU (device_id "auto")

    def epoch(loader: Any, kcd: bool) -> tuple[float, int]:
        t0 = time.perf_counter()
        seen = 0
        for batch in loader:
            if kcd:
                loader.observe(batch[2], logits[batch[2]])
            elif gpu:  # the DataLoader's batches go to the GPU too, where training would use them
                batch[0].to("cuda", non_blocking=True)
            seen += batch[0].shape[0]
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, seen

    torch_ds = ImageFolder(root, transform=imagenet_pil_transform())
    plain = torch.utils.data.DataLoader(
        torch_ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=gpu,
        generator=torch.Generator().manual_seed(seed),
    )
    epochs = repeats + 1
    dali = KCDLoader(
        ImageFolder(root),
        CondensationSchedule(epochs=epochs, period=epochs, rho=1.0),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        seed=seed,
        backend="dali",
        vaks="off",
    )
    opens = FileOpens(sorted({os.path.dirname(p) for p, _ in torch_ds.samples}))
    t_plain, t_dali, reads_full = [], [], []
    try:
        for r in range(epochs):  # interleaved, alternating which goes first
            order = ("plain", "dali") if r % 2 == 0 else ("dali", "plain")
            for which in order:
                if which == "plain":
                    tp, seen = epoch(plain, False)
                    if seen != n:
                        raise RuntimeError(f"DataLoader yielded {seen} of {n} images")
                else:
                    opens.drain()
                    td, seen = epoch(dali, True)
                    got = opens.drain()
                    reads_full.append(
                        {
                            "points": seen,
                            "backend_files_read": dali._backend.reads["files"],
                            "inotify_files_opened": sum(got.values()),
                            "distinct_files": len(got),
                        }
                    )
            if r > 0:
                t_plain.append(tp)
                t_dali.append(td)

        sched = CondensationSchedule(epochs=1 + epochs, period=1 + epochs, rho=rho, warmup=1)
        kcd = KCDLoader(
            ImageFolder(root),
            sched,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            seed=seed,
            backend="dali",
            vaks="off",
        )
        epoch(kcd, True)  # epoch 0 on all N points, then the condensation to rho * N
        kept = len(kcd.active_indices)
        t_kept, reads_kept = [], []
        for _ in range(epochs):
            planned = collections.Counter(torch_ds.samples[i][0] for i in kcd.epoch_order().tolist())
            opens.drain()
            tk, seen = epoch(kcd, True)
            got = opens.drain()
            t_kept.append(tk)
            reads_kept.append(
                {
                    "points": seen,
                    "backend_files_read": kcd._backend.reads["files"],
                    "inotify_files_opened": sum(got.values()),
                    "opened_exactly_the_planned_files": got == planned,
                }
            )
        t_kept = t_kept[1:]
    finally:
        opens.close()
    med_plain, med_dali, med_kept = statistics.median(t_plain), statistics.median(t_dali), statistics.median(t_kept)
    ok_full = all(r["points"] == r["backend_files_read"] == r["inotify_files_opened"] == n for r in reads_full)
    ok_kept = all(
        r["points"] == r["backend_files_read"] == r["inotify_files_opened"] == kept
        and r["opened_exactly_the_planned_files"]
        for r in reads_kept
    )
    dali_device = dali._backend.device_id
    return {
        "num_workers": workers,
        "dali_threads": threads,
        "dali_device": "cpu (device_id=None)" if dali_device is None else f"cuda:{dali_device} (mixed decoder)",
        "full_keep": {
            "dataloader_pil_images_per_s": n / med_plain,
            "dali_images_per_s": n / med_dali,
            "ratio": med_plain / med_dali,
            "ratio_pairwise_median": statistics.median(p / d for p, d in zip(t_plain, t_dali, strict=True)),
            "goal": ">= 1.5 (DALI on the CPU), >= 5 (DALI on a GPU)",
            "dataloader_epoch_s": t_plain,
            "dali_epoch_s": t_dali,
            "files_read_per_epoch": reads_full,
            "files_read_equal_points": ok_full,
        },
        "after_condensation": {
            "rho": rho,
            "kept": kept,
            "kept_fraction": kept / n,
            "dali_epoch_s": med_kept,
            "dali_full_epoch_s": med_dali,
            "time_fraction": med_kept / med_dali,
            "dali_images_per_s": kept / med_kept,
            "epochs_s": t_kept,
            "files_read_per_epoch": reads_kept[1:],
            "files_read_equal_surviving_points": ok_kept,
            "vaks": "off (summaries of image folders need the core wiring; see kcd_fast.loader.backends.dali)",
        },
    }


def main_jpeg(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (1000 if args.quick else 4000)
    repeats = args.repeats or (3 if args.quick else 5)
    workers = args.workers if args.workers is not None else [2]
    t0 = time.perf_counter()
    root = make_jpeg_folder(n, seed=args.seed)
    made_s = time.perf_counter() - t0
    info = machine_info()
    info["load_average_before"] = list(os.getloadavg())
    import torchvision
    from nvidia.dali import __version__ as dali_version
    from PIL import __version__ as pil_version

    info.update({"torchvision": torchvision.__version__, "dali": dali_version, "pillow": pil_version})
    sizes = [p.stat().st_size for p in root.glob("c*/*.jpg")]
    result: dict[str, Any] = {
        "benchmark": "loader_dali_jpeg",
        "machine": info,
        "config": {
            "n": n,
            "image": [256, 256, 3],
            "jpeg_quality": 90,
            "mean_file_kb": sum(sizes) / len(sizes) / 1e3,
            "folder": str(root),
            "folder_made_s": made_s,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "quick": args.quick,
            "recipe": "RandomResizedCrop 224 (area 0.08-1, aspect 3/4-4/3), HFlip, Normalize, float32 CHW",
            "dataloader": "torch DataLoader(kcd_fast.ImageFolder + PIL + torchvision v2), persistent workers",
            "dali": "KCDLoader(backend='dali'): io.file.read -> decoders.image_random_crop -> resize -> "
            "crop_mirror_normalize; observe() per batch",
        },
        "results": [],
    }
    for w in workers:
        r = bench_jpeg(root, w, args.batch_size, repeats, 0.7, args.seed)
        result["results"].append(r)
        fk, ac = r["full_keep"], r["after_condensation"]
        print(
            f"num_workers={w}: full keep  DataLoader+PIL {fk['dataloader_pil_images_per_s']:7.0f} img/s  "
            f"DALI ({r['dali_device']}) {fk['dali_images_per_s']:7.0f} img/s  ratio {fk['ratio']:.2f} "
            f"(goal >= 1.5 on the CPU, >= 5 on a GPU); "
            f"files read == points every epoch: {fk['files_read_equal_points']}"
        )
        print(
            f"num_workers={w}: rho 0.70  kept {ac['kept']} ({ac['kept_fraction']:.3f})  epoch "
            f"{ac['dali_epoch_s']:.3f} s vs full {ac['dali_full_epoch_s']:.3f} s -> {ac['time_fraction']:.3f}; "
            f"files read == surviving points: {ac['files_read_equal_surviving_points']}"
        )
    info["load_average_after"] = list(os.getloadavg())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def bench_tensor(n: int, batch_size: int, repeats: int, seed: int) -> dict[str, Any]:
    """Sections 5-7 of the module docstring."""
    import multiprocessing as mp

    import kcd_fast
    from kcd_fast import ops

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n)
    from kcd_fast.kd import full_schedule

    full = full_schedule(1000)  # every point every epoch, never condensed
    per_item = ArrayDataset(images, labels, transform=cifar_transform())
    dataloader = torch.utils.data.DataLoader(
        per_item, batch_size=batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )
    tensor = KCDLoader(
        ArrayDataset(images, labels),
        full,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        backend="tensor",
        augment="cifar",
    )
    time_epoch(dataloader, None)  # workers started, caches warm
    time_epoch(tensor, None)
    dl_s, te_s = [], []
    for r in range(repeats):
        order = [(dataloader, dl_s), (tensor, te_s)] if r % 2 == 0 else [(tensor, te_s), (dataloader, dl_s)]
        for loader, out in order:
            sec, seen = time_epoch(loader, None)
            out.append(seen / sec)
    dl_med, te_med = statistics.median(dl_s), statistics.median(te_s)
    feed = {
        "dataloader_samples_per_s": dl_med,
        "tensor_samples_per_s": te_med,
        "ratio": te_med / dl_med,
        "per_pair_ratio_median": statistics.median(t / d for t, d in zip(te_s, dl_s, strict=True)),
        "dataloader_runs": dl_s,
        "tensor_runs": te_s,
    }
    del dataloader

    bank = kcd_fast.ValueBank(n, period=40)
    logits = torch.randn(256, 10)
    idx = torch.from_numpy(rng.integers(0, n, 256))
    for _ in range(200):
        bank.observe(idx, logits)
    calls = []
    for _ in range(5000):
        t0 = time.perf_counter_ns()
        bank.observe(idx, logits)
        calls.append(time.perf_counter_ns() - t0)
    kernel = []
    s, c = bank.sums, bank.counts
    for _ in range(5000):
        t0 = time.perf_counter_ns()
        ops.observe_entropy(logits, idx, s, c)
        kernel.append(time.perf_counter_ns() - t0)
    observe = {
        "us_per_call_median": statistics.median(calls) / 1e3,
        "p90_us": float(np.percentile(calls, 90)) / 1e3,
        "ops_observe_entropy_us_median": statistics.median(kernel) / 1e3,
        "batch": 256,
        "classes": 10,
    }

    big = 1_281_167
    torch.set_num_threads(os.cpu_count() or 1)  # the shared OpenMP pool: the team condense may use
    vrng = np.random.default_rng(seed + 1)
    counts = vrng.integers(1, 40, big)  # observed entropies, as benchmarks/kernels.py draws them
    values = torch.from_numpy(vrng.uniform(0.0, np.log(1000.0), big) * (counts / 40.0) ** 0.03)
    keep = CondensationSchedule(240, 40, rho=0.7).keep_counts(big)[0]

    def condense_times() -> list[float]:
        out = []
        for _ in range(21):
            t0 = time.perf_counter()
            kcd_fast.condense(values, keep, vaks="low")
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    kcd_fast.condense(values, keep, vaks="low")
    idle = condense_times()
    spinner = mp.get_context("spawn").Process(target=_spin, args=(120.0,), daemon=True)
    spinner.start()
    time.sleep(0.5)
    try:
        busy = condense_times()
        # the same with the team sizing switched off (every region on all threads, as before)
        code = (
            "import sys, time, numpy as np, torch, kcd_fast\n"
            "v = torch.from_numpy(np.load(sys.argv[1])); k = int(sys.argv[2]); out = []\n"
            "kcd_fast.condense(v, k)\n"
            "for _ in range(21):\n"
            "    t = time.perf_counter(); kcd_fast.condense(v, k, vaks='low')\n"
            "    out.append((time.perf_counter() - t) * 1e3)\n"
            "print(' '.join(map(str, out)))\n"
        )
        with tempfile.TemporaryDirectory() as tmp:
            np.save(f"{tmp}/v.npy", values.numpy())
            run = subprocess.run(
                [sys.executable, "-c", code, f"{tmp}/v.npy", str(keep)],
                env={**os.environ, "KCD_FAST_LOAD_AWARE": "0"},
                capture_output=True,
                text=True,
                check=True,
            )
        busy_unaware = [float(t) for t in run.stdout.split()]
    finally:
        spinner.terminate()
        spinner.join()
    cond = {
        "n": big,
        "keep": keep,
        "idle_ms": idle,
        "busy_ms": busy,
        "idle_median_ms": statistics.median(idle),
        "busy_median_ms": statistics.median(busy),
        "busy_worst_ms": max(busy),
        "busy_worst_over_idle_median": max(busy) / statistics.median(idle),
        "busy_without_team_sizing_ms": busy_unaware,
        "busy_without_team_sizing_worst_over_idle_median": max(busy_unaware) / statistics.median(idle),
        "openmp_threads": kcd_fast.build_info()["openmp_threads"],
    }
    return {"feed": feed, "observe": observe, "condense_busy_core": cond}


def main_tensor(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (8192 if args.quick else 50000)
    repeats = args.repeats or (5 if args.quick else 9)
    batch = args.batch_size if args.batch_size != 128 else 256
    torch.set_num_threads(1)
    info = machine_info()
    info["load_average_before"] = list(os.getloadavg())
    import torchvision

    info["torchvision"] = torchvision.__version__
    r = bench_tensor(n, batch, repeats, args.seed)
    info["load_average_after"] = list(os.getloadavg())
    result = {
        "benchmark": "loader_tensor",
        "machine": info,
        "config": {
            "n": n,
            "image": [32, 32, 3],
            "batch_size": batch,
            "repeats": repeats,
            "quick": args.quick,
            "dataloader": "ArrayDataset + torchvision v2 CIFAR recipe per item, 2 persistent workers",
            "tensor": "KCDLoader(backend='tensor', augment='cifar'), rho = 1",
        },
        **r,
    }
    f, o, c = r["feed"], r["observe"], r["condense_busy_core"]
    print(
        f"feed: DataLoader (2 workers, v2 per item) {f['dataloader_samples_per_s']:9.0f} samples/s   "
        f"tensor back end {f['tensor_samples_per_s']:9.0f} samples/s   ratio {f['ratio']:.1f}x (goal >= 10x)"
    )
    print(
        f"observe: {o['us_per_call_median']:.1f} us per call (B=256, C=10; goal <= 15 us), "
        f"ops.observe_entropy alone {o['ops_observe_entropy_us_median']:.1f} us"
    )
    print(
        f"condense N={c['n']}: idle median {c['idle_median_ms']:.2f} ms, one core busy: median "
        f"{c['busy_median_ms']:.2f} ms, worst {c['busy_worst_ms']:.2f} ms = {c['busy_worst_over_idle_median']:.1f}x "
        "the idle median (goal <= 3x); without the team sizing (KCD_FAST_LOAD_AWARE=0) worst "
        f"{max(c['busy_without_team_sizing_ms']):.2f} ms = {c['busy_without_team_sizing_worst_over_idle_median']:.1f}x"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute on 2 cores")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--n", type=int, default=None, help="dataset size (default 8192 quick, 50000 full)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="num_workers values (default 2 quick, 0 and 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per loader (default 7 quick, 9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workload",
        choices=["arrays", "jpeg", "tensor"],
        default="arrays",
        help="arrays: KCDLoader (torch) vs DataLoader on CIFAR-like arrays; jpeg: the DALI back end "
        "vs DataLoader + PIL on a generated JPEG folder (defaults: n 1000 quick / 4000, workers 2); tensor: "
        "the tensor back end vs DataLoader + v2 transforms, observe's cost, condense with a busy core",
    )
    args = p.parse_args(argv)
    if args.workload == "tensor":
        return main_tensor(args)
    if args.workload == "jpeg":
        torch.set_num_threads(1)
        return main_jpeg(args)
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
        "config": {
            "n": n,
            "image": [32, 32, 3],
            "batch_size": args.batch_size,
            "repeats": repeats,
            "transform": "RandomCrop(32, pad 4), HFlip, ToDtype(float32), Normalize (torchvision v2)",
            "observe": f"entropy of fixed [B, {CLASSES}] float32 logits per KCD batch",
            "persistent_workers": "when num_workers > 0",
            "rhos": rhos,
            "quick": args.quick,
        },
        "results": [],
    }
    for w in workers:
        r = bench_workers(ds, w, args.batch_size, repeats, rhos, args.seed)
        result["results"].append(r)
        fk = r["full_keep"]
        print(
            f"num_workers={w}: full keep  DataLoader {fk['dataloader_samples_per_s']:9.0f} samples/s  "
            f"KCDLoader {fk['kcd_samples_per_s']:9.0f} samples/s  ratio {fk['ratio']:.3f} (goal >= 0.97)"
        )
        for a in r["after_condensation"]:
            print(
                f"num_workers={w}: rho {a['rho']:.2f}  kept {a['kept_fraction']:.3f}  epoch "
                f"{a['kcd_epoch_s']:.3f} s vs full {a['dataloader_full_epoch_s']:.3f} s -> "
                f"{a['time_fraction']:.3f} of full, deviation {a['deviation']:+.1%} (goal within 3%); "
                f"DataLoader on the kept subset {a['dataloader_on_kept_subset_epoch_s']:.3f} s "
                f"(speed ratio {a['kcd_vs_subset_dataloader']:.3f})"
            )
    info["load_average_after"] = list(os.getloadavg())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
