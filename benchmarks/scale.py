"""Scale benchmark for image-folder summaries (issue: ImageNet scale): what VAKS costs on a
folder of photo-like JPEGs when the summarised images are materialised by the overlay
(kcd_fast/loader/backends/dali_overlay.py; the same code the DALI back end runs, no DALI
needed here).

A folder of K generated photo-like JPEGs (smooth colour fields with fine texture, about
400 x 350, sizes varied, quality 90; cached under benchmarks/cache/) goes through the first
three condensations of ImageNet's schedule shape (T = 15, rho = 0.7, 90 epochs) with random
values; for each overlay format (jpeg, the default; pnm, lossless) it reports the overlay
bytes per summarised point against the source JPEG bytes of those points, the pairs
summarised per second (and per core: the overlay's thread pool has every core), the
process's resident memory, and the extrapolation to ImageNet-1k (N = 1,281,167, mean JPEG
~110 KB) written out. Also: the JPEG rate on one thread, the memory an overlay holds under a
2 MiB budget after each condensation (flat: the rest goes to files), and with ``overlay_dir``
the time a resumed loader takes to reuse the summaries against building them.

With torchcodec installed, the JPEG rate is also measured with Pillow only
(``KCD_FAST_NO_TORCHCODEC``), the two interleaved. With ``--device cuda`` it also times the
tensor summariser the DALI back end uses on a GPU (nvJPEG decoding and encoding in batches, the
CUDA blend kernel). ``machine_speed``: Pillow decoding the first 50 photos, ms per photo, at the
start and the end (this VM's speed drifts by up to ~1.5x: read the rates against it).

Usage: python benchmarks/scale.py [--quick] [--k K] [--repeats R] [--device DEV] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("kcd_fast") is None:  # run from a checkout without installing kcd_fast
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from _common import machine_info  # noqa: E402

import kcd_fast  # noqa: E402
from kcd_fast.loader.backends.dali_overlay import FolderOverlay  # noqa: E402

IMAGENET_N, IMAGENET_JPEG_BYTES = 1_281_167, 110_000


def make_photos(k: int, seed: int = 0) -> list[str]:
    from PIL import Image

    root = HERE / "cache" / f"scale_photos_{k}_{seed}"
    paths = [str(root / f"{i}.jpg") for i in range(k)]
    if all(os.path.exists(p) for p in paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, p in enumerate(paths):
        h, w = int(rng.integers(300, 400)), int(rng.integers(350, 450))
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 6, (h, w, 3))
        img = np.clip(np.asarray(base, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(p, quality=90)
        if i % 200 == 199:
            print(f"  generated {i + 1}/{k} photos", file=sys.stderr)
    return paths


def _codec() -> str:
    import PIL

    from kcd_fast.loader.backends.image_codec import torchcodec_module

    tc = torchcodec_module()
    return (
        f"torchcodec {tc.__version__}"
        if tc is not None
        else f"Pillow {PIL.__version__} (KCD_FAST_NO_TORCHCODEC or no torchcodec)"
    )


def _pillow_decode_ms(paths: list[str], n: int = 50) -> float:
    """This machine's speed now: Pillow decoding the first n photos (median of 5 passes), ms per photo."""
    from PIL import Image

    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for p in paths[:n]:
            with Image.open(p) as im:
                im.load()
        runs.append((time.perf_counter() - t0) / min(n, len(paths)) * 1e3)
    return float(np.median(runs))


def pair_stages_ms(paths: list[str], summary: dict, repeats: int) -> dict[str, float]:
    """ms per pair of each step of the overlay's CPU path, on the calling thread, over the first
    summary's original pairs (median of ``repeats`` passes), next to Pillow doing the same step."""
    from PIL import Image

    from kcd_fast.loader.backends.image_codec import OverlayFormat, encode, read_rgb
    from kcd_fast.ops import blend_image_, resize_bilinear

    d_l, s_l, e_l = summary["dst"].tolist(), summary["src"].tolist(), summary["eps"].tolist()
    imgs = [(read_rgb(paths[d]), read_rgb(paths[r])) for d, r in zip(d_l, s_l, strict=True)]
    sized = [(a, resize_bilinear(b, a.shape[:2])) for a, b in imgs]

    def pillow_decode(i: int) -> None:
        for q in (paths[d_l[i]], paths[s_l[i]]):
            with Image.open(q) as im:
                np.asarray(im.convert("RGB"))

    steps = {
        "decode_two": lambda i: (read_rgb(paths[d_l[i]]), read_rgb(paths[s_l[i]])),
        "decode_two_pillow": pillow_decode,
        "resize": lambda i: resize_bilinear(imgs[i][1], imgs[i][0].shape[:2]),
        "resize_pillow": lambda i: Image.fromarray(imgs[i][1]).resize(
            (imgs[i][0].shape[1], imgs[i][0].shape[0]), Image.Resampling.BILINEAR
        ),
        "blend": lambda i: blend_image_(sized[i][0], sized[i][1], e_l[i]),  # in place: the same table work
        "encode_jpeg": lambda i: encode(sized[i][0], OverlayFormat.JPEG),
    }
    out = {}
    for name, step in steps.items():
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(len(imgs)):
                step(i)
            runs.append((time.perf_counter() - t0) / len(imgs) * 1e3)
        out[name] = float(np.median(runs))
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def condensation_log(k: int, seed: int, stages: int = 3) -> list[dict]:
    """The first ``stages`` condensations of ImageNet's schedule shape on k points, random values."""
    sched = kcd_fast.CondensationSchedule(epochs=90, period=15, rho=0.7)
    keep = sched.keep_counts(k)
    rng = np.random.default_rng(seed)
    active = np.arange(k)
    log = []
    for s in range(1, stages + 1):
        values = np.full(k, -np.inf)
        values[active] = rng.random(active.size)
        c = kcd_fast.condense(torch.from_numpy(values), keep[s], active.size)
        log.append({"epoch": 15 * s, "dst": c.dst, "src": c.src, "eps": c.eps})
        active = c.keep.numpy()
    return log


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 photos")
    p.add_argument("--k", type=int, default=None, help="photos (default 1500; quick 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=3, help="rate measurements per format (median)")
    p.add_argument(
        "--device",
        default=None,
        help="also time the tensor summariser on this torch device (e.g. cuda; needs torchcodec)",
    )
    a = p.parse_args(argv)
    k = a.k or (300 if a.quick else 1500)
    cores = os.cpu_count() or 1
    paths = make_photos(k, a.seed)
    src_bytes = np.array([os.path.getsize(q) for q in paths], dtype=np.float64)
    log = condensation_log(k, a.seed)
    pairs = [int(s["dst"].numel()) for s in log]
    speed_start = _pillow_decode_ms(paths)
    res: dict = {
        "benchmark": "scale",
        "machine": machine_info(),
        "k": k,
        "mean_source_jpeg_bytes": float(src_bytes.mean()),
        "pairs_per_condensation": pairs,
        "threads": cores,
        # the JPEG codec of the overlay (torchcodec: libjpeg-turbo, Pillow's pixels and bytes, faster)
        "codec": _codec(),
        "formats": {},
    }
    for fmt in ("jpeg", "pnm"):
        rss0 = rss_mb()
        rates, seconds = [], []
        for _ in range(a.repeats):  # a noisy 2-core VM: the median of repeats
            ov = FolderOverlay(paths, overlay_format=fmt, num_threads=cores)
            seconds = []
            for i in range(len(log)):
                t0 = time.perf_counter()
                ov.sync(log[: i + 1])
                seconds.append(time.perf_counter() - t0)
            rates.append(sum(pairs) / sum(seconds))
        pts = ov.points
        per_point = ov.nbytes / len(pts)
        rate = float(np.median(rates))
        res["formats"][fmt] = {
            "summarised_points": len(pts),
            "overlay_bytes": ov.nbytes,
            "bytes_per_point": per_point,
            "bytes_per_point_over_source_jpeg": per_point / float(src_bytes[pts].mean()),
            "seconds_per_condensation": seconds,
            "pairs_per_s": rate,
            "pairs_per_s_runs": rates,
            "pairs_per_s_per_core": rate / cores,
            "rss_mb_growth": rss_mb() - rss0,
        }
        del ov
    # the JPEG codec side by side: torchcodec and Pillow only (KCD_FAST_NO_TORCHCODEC), interleaved
    # repeats on all threads, so a change of the machine's speed hits both
    if res["codec"].startswith("torchcodec"):
        both: dict[str, list[float]] = {"torchcodec": [], "pillow": []}
        before = os.environ.get("KCD_FAST_NO_TORCHCODEC")
        for _ in range(a.repeats):
            for name in both:
                os.environ["KCD_FAST_NO_TORCHCODEC"] = "1" if name == "pillow" else "0"
                try:
                    ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=cores)
                    t0 = time.perf_counter()
                    ov.sync(log)
                    both[name].append(sum(pairs) / (time.perf_counter() - t0) / cores)
                    del ov
                finally:  # the caller's setting back
                    if before is None:
                        os.environ.pop("KCD_FAST_NO_TORCHCODEC", None)
                    else:
                        os.environ["KCD_FAST_NO_TORCHCODEC"] = before
        res["formats"]["jpeg"]["codec_side_by_side_per_core"] = {
            k: {"median": float(np.median(v)), "runs": v} for k, v in both.items()
        }
    # one thread: pairs per second per core without sharing the machine's cores
    one = []
    for _ in range(a.repeats):
        ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=1)
        t0 = time.perf_counter()
        ov.sync(log)
        one.append(sum(pairs) / (time.perf_counter() - t0))
        del ov
    res["formats"]["jpeg"]["pairs_per_s_one_thread"] = float(np.median(one))
    res["stages_ms_one_thread"] = pair_stages_ms(paths, log[0], a.repeats)
    if a.device:  # the tensor summariser (the DALI back end's on a GPU): batched decode/encode on the device
        dev, rates = torch.device(a.device), []
        for _ in range(a.repeats):
            ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=cores, device=dev)
            t0 = time.perf_counter()
            ov.sync(log)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            rates.append(sum(pairs) / (time.perf_counter() - t0))
            del ov
        res["formats"]["jpeg"]["pairs_per_s_device"] = {
            "device": str(dev),
            "median": float(np.median(rates)),
            "runs": rates,
        }
    # a memory budget far below the overlay: memory stays at the budget, the rest goes to files
    budget = 2 << 20
    ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=cores, budget=budget)
    held = []
    for i in range(len(log)):
        ov.sync(log[: i + 1])
        held.append({"points": len(ov.points), "memory_bytes": ov.memory_bytes, "overlay_bytes": ov.nbytes})
    res["budget"] = {"budget_bytes": budget, "after_each_condensation": held}
    del ov
    # overlay_dir: files content-addressed by the log's digest; a resumed loader (a new overlay,
    # the same directory and log) reuses them instead of decoding and encoding every pair again
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kcd-scale-") as tmp:
        first = FolderOverlay(paths, overlay_format="jpeg", num_threads=cores, overlay_dir=tmp)
        t0 = time.perf_counter()
        first.sync(log)
        build = time.perf_counter() - t0
        again = FolderOverlay(paths, overlay_format="jpeg", num_threads=cores, overlay_dir=tmp)
        t0 = time.perf_counter()
        again.sync(log)
        reuse = time.perf_counter() - t0
        res["resume"] = {
            "build_seconds": build,
            "reuse_seconds": reuse,
            "pairs_made_on_resume": again.stats["pairs_made"],
            "summaries_reused": again.stats["summaries_reused"],
        }
        del first, again
    # ImageNet-1k, the same schedule shape: pairs per condensation P_s = min(n_{s-1} - n_s, n_s)
    sched = kcd_fast.CondensationSchedule(epochs=90, period=15, rho=0.7)
    kc = sched.keep_counts(IMAGENET_N)
    inet_pairs = [min(kc[s - 1] - kc[s], kc[s]) for s in range(1, len(kc))]
    j = res["formats"]["jpeg"]
    res["imagenet_extrapolation"] = {
        "formula": "overlay bytes <= sum_s P_s * (bytes per point / source jpeg bytes) * 110 KB; "
        "seconds per condensation = P_s / (pairs per second per core * cores)",
        "pairs_per_condensation": inet_pairs,
        "summarised_points_at_most": int(sum(inet_pairs)),
        "overlay_gb_at_most_jpeg": sum(inet_pairs) * j["bytes_per_point_over_source_jpeg"] * IMAGENET_JPEG_BYTES / 1e9,
        "overlay_gb_at_most_pnm": sum(inet_pairs)
        * res["formats"]["pnm"]["bytes_per_point_over_source_jpeg"]
        * IMAGENET_JPEG_BYTES
        / 1e9,
        "first_condensation_minutes_on_8_cores_jpeg": inet_pairs[0] / (j["pairs_per_s_per_core"] * 8) / 60,
    }
    for fmt, f in res["formats"].items():
        print(
            f"{fmt}: {f['summarised_points']} summarised points, {f['bytes_per_point'] / 1e3:.1f} KB each = "
            f"{f['bytes_per_point_over_source_jpeg']:.2f}x the source JPEG (goal <= 1.5x); "
            f"{f['pairs_per_s']:.0f} pairs/s on {cores} threads = {f['pairs_per_s_per_core']:.0f} per core "
            f"(goal >= 200); RSS +{f['rss_mb_growth']:.0f} MB"
        )
    j = res["formats"]["jpeg"]
    print(f"jpeg on one thread: {j['pairs_per_s_one_thread']:.0f} pairs/s")
    if "codec_side_by_side_per_core" in j:
        c = j["codec_side_by_side_per_core"]
        print(
            f"jpeg per core, interleaved: torchcodec {c['torchcodec']['median']:.0f}, Pillow only "
            f"{c['pillow']['median']:.0f} pairs/s"
        )
    st = res["stages_ms_one_thread"]
    print("ms per pair on one thread: " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()))
    if "pairs_per_s_device" in j:
        d = j["pairs_per_s_device"]
        print(f"jpeg, the tensor summariser on {d['device']}: {d['median']:.0f} pairs/s")
    b = res["budget"]["after_each_condensation"]
    print(
        f"budget {res['budget']['budget_bytes'] >> 20} MiB: memory "
        + ", ".join(f"{h['memory_bytes'] / 1e6:.2f} MB at {h['points']} points" for h in b)
        + f" (overlay {b[-1]['overlay_bytes'] / 1e6:.1f} MB)"
    )
    r = res["resume"]
    print(
        f"overlay_dir resume: {r['reuse_seconds'] * 1e3:.0f} ms reusing {r['summaries_reused']} summaries "
        f"({r['pairs_made_on_resume']} pairs made) vs {r['build_seconds']:.2f} s to build them"
    )
    e = res["imagenet_extrapolation"]
    print(
        f"ImageNet-1k (T=15, rho=0.7, 90 epochs): pairs per condensation {e['pairs_per_condensation']}; at most "
        f"{e['summarised_points_at_most']} summarised points -> at most {e['overlay_gb_at_most_jpeg']:.1f} GB (jpeg) "
        f"/ {e['overlay_gb_at_most_pnm']:.1f} GB (pnm); first condensation "
        f"{e['first_condensation_minutes_on_8_cores_jpeg']:.1f} min on 8 cores (jpeg)"
    )
    res["machine_speed"] = {"pillow_decode_ms_start": speed_start, "pillow_decode_ms_end": _pillow_decode_ms(paths)}
    print(
        f"machine speed: Pillow decodes a photo in {speed_start:.3f} ms at the start, "
        f"{res['machine_speed']['pillow_decode_ms_end']:.3f} ms at the end"
    )
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
