"""Kernel benchmark: kcd_fast's compiled ops side by side with what a user would write.

- observe_entropy vs the torch composite (log_softmax, exp, mul, sum, index_add_),
  B = 256, C = 1000 (and a large batch on GPU for the bandwidth figure);
- condense at N = 1,281,167 (ImageNet) vs the selection a competent numpy user writes
  (``np.partition`` / ``np.argpartition``, then sorting only the parts whose order matters:
  :func:`numpy_select`, checked to give the same keep / dropped / dst), vs numpy's full
  argsort (what the released KCD code does), and on a GPU vs ``torch.argsort`` and
  ``torch.topk`` on the same device;
- blend_ vs numpy (vectorised) on CIFAR-shaped storage.

Usage: python benchmarks/kernels.py [--quick] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _common import interleaved_median_ms, machine_info, median_ms  # noqa: E402

import kcd_fast  # noqa: E402
from kcd_fast import _cpu, ops  # noqa: E402
from kcd_fast._arrays import capsule  # noqa: E402

IMAGENET_N = 1_281_167


def torch_entropy_composite(logits, idx, sums, counts, ones):
    logp = torch.log_softmax(logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    sums.index_add_(0, idx, h.double())
    counts.index_add_(0, idx, ones)


def bench_observe(device: str, repeats: int, b: int, c: int, n: int = 50_000) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, c, generator=gen) * 4).to(device)
    idx = torch.randint(0, n, (b,), generator=gen).to(device)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.int32, device=device)
    ones = torch.ones(b, dtype=torch.int32, device=device)
    errors = torch.zeros(2, dtype=torch.int64, device=device) if device != "cpu" else None
    ours = median_ms(lambda: ops.observe_entropy(logits, idx, sums, counts, errors=errors), repeats, device=device)
    ref = median_ms(lambda: torch_entropy_composite(logits, idx, sums, counts, ones), repeats, device=device)
    out = {"B": b, "C": c, "ours_ms": ours, "torch_ms": ref, "speedup_vs_torch": ref / ours}
    # bytes that must move: the logits once, plus the indexed read-modify-write of sums/counts
    out["bytes"] = b * c * 4 + b * (8 + 2 * 8 + 2 * 4)
    out["ours_GBps"] = out["bytes"] / (ours * 1e-3) / 1e9
    return out


@contextlib.contextmanager
def _forced_isa(name: str) -> Iterator[None]:
    """CPU condense on the named kernels inside the block (ValueError if the CPU lacks them)."""
    _cpu.set_condense_isa(name)
    try:
        yield
    finally:
        _cpu.set_condense_isa("auto")


def numpy_select(values: np.ndarray, n_keep: int, n_prev: int) -> dict[str, np.ndarray]:
    """``condense(values, n_keep, n_prev, vaks="low")``'s keep (by index), dropped (rank order)
    and dst (the lowest kept, rank order) in plain numpy, sorting only what needs an order.
    Rank: value descending, ties by index ascending."""
    key = -values

    def best(s: np.ndarray, k: int) -> np.ndarray:  # the k best of s (s ascending by index)
        if k >= s.size:
            return s
        v = key[s]
        t = np.partition(v, k - 1)[k - 1]
        better, tied = s[v < t], s[v == t]
        return np.concatenate([better, tied[: k - better.size]])

    def worst(s: np.ndarray, k: int) -> np.ndarray:  # the k worst of s (s ascending by index)
        if k >= s.size or k == 0:
            return s[s.size - k :]
        v = key[s]
        t = np.partition(v, s.size - k)[s.size - k]
        worse, tied = s[v > t], s[v == t]
        return np.concatenate([worse, tied[tied.size - (k - worse.size) :]])

    def ranked(s: np.ndarray) -> np.ndarray:
        return s[np.lexsort((s, key[s]))]

    prev = np.sort(best(np.arange(values.size), n_prev))
    keep = np.sort(best(prev, n_keep))
    inside = np.zeros(values.size, dtype=bool)
    inside[keep] = True
    dropped = ranked(prev[~inside[prev]])
    pairs = min(dropped.size, n_keep)
    dst = ranked(worst(keep, pairs))
    return {"keep": keep, "dropped": dropped, "dst": dst}


def bench_condense(device: str, repeats: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 40, n)
    values = rng.uniform(0.0, np.log(1000.0), n) * (counts / 40.0) ** 0.03  # observed entropies
    values[rng.random(n) < 0.001] = np.inf
    sched = kcd_fast.CondensationSchedule(240, 40, rho=0.7)
    kc = sched.keep_counts(n)
    # first / later: the paper's schedule (exp decay); one_shot: straight to rho = 0.7,
    # where the dropped points and their partners are 60% of N.
    cases = {"first": (kc[0], n), "later": (kc[3], kc[2]), "one_shot": (round(0.7 * n), n)}
    res: dict = {"n": n}
    v = torch.from_numpy(values).to(device)
    fns = {
        "numpy_argsort": lambda: np.argsort(-values),
        "numpy_argpartition": lambda: numpy_select(values, cases["first"][0], cases["first"][1]),
    }
    for name, (n_keep, n_prev) in cases.items():
        fns[name] = lambda nk=n_keep, npv=n_prev: kcd_fast.condense(v, nk, npv)
        res[f"{name}_n_keep"], res[f"{name}_n_prev"] = n_keep, n_prev
    if device == "cpu":  # what CPUs with AVX2 only, or neither, get
        auto_isa = _cpu.condense_isa()
        for isa in ("avx2", "generic"):
            try:
                with _forced_isa(isa):
                    pass
            except ValueError:
                continue  # this CPU has no such kernels
            if isa != auto_isa:

                def forced(nk=cases["first"][0], isa=isa):
                    with _forced_isa(isa):
                        kcd_fast.condense(v, nk, n)

                fns[f"first_{isa}"] = forced
    setups = {}
    if device == "cpu":  # `first` right after numpy's argsort: caches flushed, the second core idle meanwhile
        fns["first_after_argsort"] = fns["first"]
        setups["first_after_argsort"] = fns["numpy_argsort"]
    if device == "cpu":  # `first` on fresh memory: the cache of released result buffers emptied first

        def first_fresh(nk=cases["first"][0]):
            kcd_fast.memory.empty_cache()
            kcd_fast.condense(v, nk, n)

        fns["first_fresh"] = first_fresh
    if device == "cpu":  # the same call into outputs allocated once: no first-touch page faults
        nk = cases["first"][0]
        outs = [
            torch.empty(k, dtype=dt)
            for k, dt in (
                (nk, torch.int64),
                (n - nk, torch.int64),
                (n - nk, torch.int64),
                (n - nk, torch.int64),
                (n - nk, torch.float64),
            )
        ]
        caps = (capsule(v), capsule(torch.zeros(0, dtype=torch.int64)))

        def first_kernel():
            _cpu.condense(caps[0], nk, n, 1, 0.7, caps[1], *[capsule(t) for t in outs])

        fns["first_kernel"] = first_kernel
    # the competent numpy selection returns what condense returns (checked before it is timed)
    want = kcd_fast.condense(v, *cases["first"])
    got = numpy_select(values, *cases["first"])
    for name in ("keep", "dropped", "dst"):
        if not np.array_equal(got[name], getattr(want, name).cpu().numpy()):
            raise AssertionError(f"numpy_select's {name} differs from condense's")
    if device == "cpu":
        ms = interleaved_median_ms(fns, repeats, device=device, setups=setups)
        res["numpy_argsort_ms"] = ms.pop("numpy_argsort")
        res["numpy_argpartition_ms"] = ms.pop("numpy_argpartition")
    else:  # the host selections by wall clock, the device calls by CUDA events
        res["numpy_argsort_ms"] = median_ms(fns.pop("numpy_argsort"), repeats)
        res["numpy_argpartition_ms"] = median_ms(fns.pop("numpy_argpartition"), repeats)
        ms = interleaved_median_ms(fns, repeats, device=device)
    res["numpy_argsort_stable_ms"] = median_ms(lambda: np.argsort(-values, kind="stable"), max(1, repeats // 2))
    for name, t in ms.items():
        res[f"{name}_ms"] = t
        res[f"speedup_vs_numpy_argsort_{name}"] = res["numpy_argsort_ms"] / t
    res["ours_ms"] = res["first_ms"]
    res["speedup_vs_numpy_argsort"] = res["speedup_vs_numpy_argsort_first"]
    res["speedup_vs_numpy_argpartition"] = res["numpy_argpartition_ms"] / res["first_ms"]
    if device == "cpu":
        res["isa"] = _cpu.condense_isa()
        kcd_fast.condense(v, *cases["first"])
        res["first_members_sorted"] = _cpu.last_condense_stats()["members"]
    else:  # what a user writes on the device: a stable sort, or topk of the kept count
        res["torch_argsort_ms"] = median_ms(
            lambda: torch.argsort(v, descending=True, stable=True), repeats, device=device
        )
        res["torch_topk_ms"] = median_ms(lambda: torch.topk(v, cases["first"][0]), repeats, device=device)
        res["speedup_vs_torch_argsort"] = res["torch_argsort_ms"] / res["first_ms"]
        res["speedup_vs_torch_topk"] = res["torch_topk_ms"] / res["first_ms"]
    return res


def bench_blend(device: str, repeats: int, n: int, pairs: int) -> dict:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    perm = rng.permutation(n)
    dst, src = perm[:pairs].astype(np.int64), perm[pairs : 2 * pairs].astype(np.int64)
    eps = 0.7 + 0.3 * (pairs - np.arange(pairs)) / pairs

    def numpy_blend(img):
        a = img[dst].astype(np.float64)
        b = img[src].astype(np.float64)
        e = eps[:, None, None, None]
        img[dst] = np.clip(np.floor(e * a + (1.0 - e) * b + 0.5), 0, 255).astype(np.uint8)

    work = images.copy()
    numpy_ms = median_ms(lambda: numpy_blend(work), repeats)
    t_img = torch.from_numpy(images.copy()).to(device)
    t_dst, t_src, t_eps = (torch.from_numpy(x).to(device) for x in (dst, src, eps))
    ours = median_ms(lambda: ops.blend_(t_img, t_dst, t_src, t_eps, check=False), repeats, device=device)
    bytes_moved = pairs * 32 * 32 * 3 * 3  # read dst and src rows, write dst rows
    return {
        "n": n,
        "pairs": pairs,
        "image_bytes": 32 * 32 * 3,
        "ours_ms": ours,
        "numpy_ms": numpy_ms,
        "speedup_vs_numpy": numpy_ms / ours,
        "bytes": bytes_moved,
        "ours_GBps": bytes_moved / (ours * 1e-3) / 1e9,
    }


def copy_bandwidth(device: str, repeats: int) -> float:
    """Device-to-device copy, counting bytes read plus written (GB/s)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), repeats, device=device)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, help="write results here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not kcd_fast.has_cuda():
        p.error("--device cuda needs a GPU and kcd_fast built with CUDA")
    reps = 5 if a.quick else 21
    res: dict = {
        "device": a.device,
        "machine": machine_info(a.device),
        "cuda_variants": os.environ.get("KCD_FAST_CUDA_VARIANTS", ""),
    }
    res["observe_entropy"] = bench_observe(a.device, reps * 4, 256, 1000)
    res["condense"] = bench_condense(a.device, reps, IMAGENET_N)
    res["blend"] = bench_blend(a.device, reps, 50_000, 2_900)
    if a.device != "cpu":
        res["observe_entropy_large"] = bench_observe(a.device, reps, 65_536, 1000, n=1_281_167)
        res["blend_large"] = bench_blend(a.device, reps, 200_000, 60_000)
        bw = copy_bandwidth(a.device, reps)
        res["copy_GBps"] = bw
        for key in ("observe_entropy", "observe_entropy_large", "blend", "blend_large"):
            res[key]["fraction_of_copy_bw"] = res[key]["ours_GBps"] / bw
    _print(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
    return res


def _print(res: dict) -> None:
    o, c, b = res["observe_entropy"], res["condense"], res["blend"]
    print(f"device {res['device']}  ({res['machine'].get('gpu', res['machine']['processor'])})")
    print(
        f"observe_entropy B={o['B']} C={o['C']}: ours {o['ours_ms']:.3f} ms, torch composite "
        f"{o['torch_ms']:.3f} ms -> {o['speedup_vs_torch']:.2f}x"
    )
    print(
        f"condense N={c['n']}: numpy argpartition selection {c['numpy_argpartition_ms']:.2f} ms -> ours "
        f"{c['speedup_vs_numpy_argpartition']:.1f}x faster (the baseline a competent user writes)"
        + (
            f"; torch.argsort on the device {c['torch_argsort_ms']:.3f} ms, torch.topk {c['torch_topk_ms']:.3f} ms"
            if "torch_argsort_ms" in c
            else ""
        )
    )
    print(
        f"condense N={c['n']}: numpy argsort {c['numpy_argsort_ms']:.2f} ms; ours "
        f"{c['first_ms']:.2f} ms (first, keep {c['first_n_keep']}) -> {c['speedup_vs_numpy_argsort']:.1f}x, "
        f"{c['later_ms']:.2f} ms (later) -> {c['speedup_vs_numpy_argsort_later']:.1f}x, "
        f"{c['one_shot_ms']:.2f} ms (one shot to 70%) -> {c['speedup_vs_numpy_argsort_one_shot']:.1f}x"
    )
    variants = {
        "first_after_argsort": "right after numpy's argsort (caches flushed)",
        "first_fresh": "on fresh output memory (result cache emptied)",
        "first_kernel": "into preallocated outputs (no page faults)",
        "first_avx2": "with the AVX2 kernels (no AVX-512)",
        "first_generic": "with the generic kernels (neither AVX-512 nor AVX2)",
    }
    for name, what in variants.items():
        if f"{name}_ms" in c:
            print(
                f"  first condensation {what}: {c[f'{name}_ms']:.2f} ms -> {c[f'speedup_vs_numpy_argsort_{name}']:.1f}x"
            )
    print(
        f"blend_ {b['pairs']} pairs of 32x32x3: ours {b['ours_ms']:.3f} ms, numpy {b['numpy_ms']:.3f} ms -> "
        f"{b['speedup_vs_numpy']:.1f}x"
    )
    if "copy_GBps" in res:
        print(f"copy bandwidth {res['copy_GBps']:.0f} GB/s (read + write)")
        for key in ("observe_entropy", "observe_entropy_large", "blend", "blend_large"):
            r = res[key]
            print(
                f"  {key}: {r['ours_ms']:.3f} ms, {r['ours_GBps']:.0f} GB/s = "
                f"{100 * r['fraction_of_copy_bw']:.0f}% of copy bandwidth"
            )


if __name__ == "__main__":
    main()
