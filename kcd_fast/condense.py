"""Condensation (docs/algorithm.md sections 3-4): rank all points by value, keep the top
``n_keep``, and pair the dropped points with kept ones for the VAKS summary."""

from __future__ import annotations

from dataclasses import dataclass
from enum import unique
from typing import Any

import numpy as np
import torch

from . import _arrays as A
from ._checks import OptionEnum, check_int, is_finite_number
from ._ext import _cpu, cuda_module


@unique
class Vaks(OptionEnum):
    """Which kept points receive the dropped knowledge (supplement Tab. 7)."""

    LOW = "low"  # the L lowest-valued kept points, weights eps_m .. 1 (the paper's choice)
    HIGH = "high"  # the L highest-valued kept points, same weights
    RANDOM = "random"  # L kept points drawn with the seeded generator, eps = eps_m
    OFF = "off"  # no summary


_MODE = {Vaks.OFF: 0, Vaks.LOW: 1, Vaks.HIGH: 2, Vaks.RANDOM: 3}


@unique
class Pairing(OptionEnum):
    """Which dropped point goes into which kept point (``vaks_pairing``)."""

    PAPER = "paper"  # by rank over the whole set (Eq. 14; a pair may join two classes)
    CLASS = "class"  # within each class: a dropped point only into a kept point of its own class


@dataclass(frozen=True)
class Condensation:
    """The outcome of one condensation, on the device and in the library of ``values``.

    keep: ``[n_keep]`` int64, the kept points sorted by index.
    dropped: ``[n_prev - n_keep]`` int64, the dropped points in rank order.
    dst, src: ``[P]`` int64 summary pairs (``P = min(L, n_keep)``, 0 when vaks is off):
        ``images[dst[j]] <- eps[j] * images[dst[j]] + (1 - eps[j]) * images[src[j]]``.
    eps: ``[P]`` float64 weights.
    """

    keep: Any
    dropped: Any
    dst: Any
    src: Any
    eps: Any
    n: int
    n_keep: int
    n_prev: int
    vaks: Vaks
    eps_m: float

    @property
    def pairs(self) -> int:
        return int(self.dst.shape[0])


# CPU outputs this large share one buffer of fresh huge pages, faulted in by one thread:
# first-touch faults of 4 KiB pages cost more than the condensation itself (about 2 ms
# for the 12 MB at ImageNet size on this project's VM).
_PAGES_MIN_BYTES = 4 << 20


def _empty_outputs(sizes: list[tuple[int, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """Uninitialised 1-D tensors of 8-byte dtypes; on the CPU, views of one buffer when large."""
    total = 8 * sum(n for n, _ in sizes)
    if device.type != "cpu" or total < _PAGES_MIN_BYTES:
        return [torch.empty(n, dtype=dt, device=device) for n, dt in sizes]
    buf = torch.from_dlpack(_cpu.empty_bytes(total))
    out, at = [], 0
    for n, dt in sizes:
        out.append(buf[at : at + 8 * n].view(dt))
        at += 8 * n
    return out


def condense(
    values,
    n_keep: int,
    n_prev: int | None = None,
    vaks: str | Vaks = "low",
    eps_m: float = 0.7,
    seed: int = 0,
    *,
    pairing: str | Pairing = "paper",
    labels: Any = None,
) -> Condensation:
    """Select the ``n_keep`` most valuable of ``N`` points and the VAKS summary pairs.

    Args:
        values: ``[N]`` float values (cast to float64); ``+inf`` marks unobserved points.
            Ranking is by value descending, ties by index ascending; NaN is refused.
        n_keep: points kept, ``1 <= n_keep <= n_prev``.
        n_prev: size of the current set (default N); the ``n_prev - n_keep`` points
            ranked just below the kept ones are this step's dropped points.
        vaks: "low" (default), "high", "random" or "off".
        eps_m: the smallest weight a kept image keeps, in [0, 1].
        seed: seeds the draw of kept points for ``vaks="random"``.
        pairing: "paper" (default: pairs by rank over the whole set, the table in
            docs/algorithm.md section 4) or "class" (:func:`class_pairs`: the same rule
            within each class; needs ``labels``).
        labels: ``[N]`` integer class labels (any device), for ``pairing="class"``.

    CPU: a sample selection, O(N) plus a radix sort of the points near the ranks that
    matter (about the dropped points and the VAKS partners). CUDA: an on-device CUB radix
    sort; nothing returns to the host except the NaN check. Its workspace (one device buffer
    for the call, kcd/condense_layout.h) is 33 bytes per point (sort keys and indices twice, a
    CUB DoubleBuffer, plus one flag byte) plus CUB's temp storage (histograms and look-back
    state, small against it; ``_cuda.condense_workspace_bytes(N)`` asks CUB on the device):
    N = 2^20 needs ~33 MiB, 2^26 ~2.1 GiB, 2^30 ~33 GiB (the copying sort it replaced needed
    49 GiB at 2^30), besides ``values`` and the outputs.

    Example (N = 5, keep 3 of 5, vaks "low")::

        values = [0.9, 0.1, inf, 0.5, 0.1]   -> pi = [2, 0, 3, 1, 4]
        keep = [0, 2, 3]; dropped = [1, 4]; dst = [0, 3]; src = [1, 4]; eps = [1.0, 0.85]
    """
    v, lib = A.as_torch(values, "values")
    A.check_ndim(v, "values", 1, "[N]")
    if not v.is_floating_point():
        raise TypeError(f"values must be a floating dtype, got {A.dtype_name(v)}")
    device = A.check_same_device([("values", v)])
    n = int(v.shape[0])
    if n == 0:
        raise ValueError("values is empty: there is nothing to condense (N = 0)")
    n_keep = check_int(n_keep, "n_keep")
    n_prev = n if n_prev is None else check_int(n_prev, "n_prev")
    if not 1 <= n_prev <= n:
        raise ValueError(f"n_prev must be in [1, N = {n}], got {n_prev}")
    if not 1 <= n_keep <= n_prev:
        raise ValueError(f"n_keep must be in [1, n_prev = {n_prev}], got {n_keep}")
    mode = Vaks.parse(vaks)
    if not (is_finite_number(eps_m) and 0.0 <= eps_m <= 1.0):
        raise ValueError(f"eps_m must be in [0, 1], got {eps_m!r}")
    seed = check_int(seed, "seed")
    pair_mode = Pairing.parse(pairing, "pairing")
    if pair_mode is Pairing.CLASS and mode is not Vaks.OFF:
        lab = _check_labels(labels, n)
        base = condense(v, n_keep, n_prev, "off", eps_m, seed)  # the ranking: keep / dropped
        dst, src, eps = class_pairs(
            v.to(torch.float64).cpu().numpy(),
            base.keep.cpu().numpy(),
            base.dropped.cpu().numpy(),
            lab,
            mode,
            float(eps_m),
            seed,
        )
        conv = [A.to_lib(t, lib, values) for t in (base.keep, base.dropped)]
        conv += [A.to_lib(torch.from_numpy(a).to(device), lib, values) for a in (dst, src, eps)]
        return Condensation(*conv, n=n, n_keep=n_keep, n_prev=n_prev, vaks=mode, eps_m=float(eps_m))
    if device.type == "cuda" and n > 2**31 - 1:
        raise ValueError(f"CUDA condense handles N < 2**31 points, got N = {n}")
    if device.type == "cpu" and n > 2**32 - 1:
        raise ValueError(f"CPU condense handles N < 2**32 points, got N = {n}")

    v = v.to(torch.float64).contiguous()
    pairs = 0 if mode is Vaks.OFF else min(n_prev - n_keep, n_keep)
    if mode is Vaks.RANDOM:
        pos = np.random.default_rng(seed).choice(n_keep, size=pairs, replace=False).astype(np.int64)
        random_pos = torch.from_numpy(pos).to(device)
    else:
        random_pos = torch.zeros(0, dtype=torch.int64, device=device)

    sizes = [
        (n_keep, torch.int64),
        (n_prev - n_keep, torch.int64),
        (pairs, torch.int64),
        (pairs, torch.int64),
        (pairs, torch.float64),
    ]
    keep, dropped, dst, src, eps = _empty_outputs(sizes, device)
    outs = [A.capsule(t) for t in (keep, dropped, dst, src, eps)]
    if device.type == "cpu":
        _cpu.condense(A.capsule(v), n_keep, n_prev, _MODE[mode], float(eps_m), A.capsule(random_pos), *outs)
    else:
        if bool(torch.isnan(v).any()):
            i = int(torch.isnan(v).nonzero()[0, 0])
            raise ValueError(f"values[{i}] is nan")
        ext = cuda_module()
        if not hasattr(ext, "condense"):  # the run-time compiled fallback: condense on the host
            host = [torch.empty_like(t, device="cpu") for t in (keep, dropped, dst, src, eps)]
            _cpu.condense(
                A.capsule(v.cpu()),
                n_keep,
                n_prev,
                _MODE[mode],
                float(eps_m),
                A.capsule(random_pos.cpu()),
                *(A.capsule(t) for t in host),
            )
            for t, h in zip((keep, dropped, dst, src, eps), host, strict=True):
                t.copy_(h)
            conv = [A.to_lib(t, lib, values) for t in (keep, dropped, dst, src, eps)]
            return Condensation(*conv, n=n, n_keep=n_keep, n_prev=n_prev, vaks=mode, eps_m=float(eps_m))
        with torch.cuda.device(device):
            ws = torch.empty(int(ext.condense_workspace_bytes(n)), dtype=torch.uint8, device=device)
        ext.condense(
            A.capsule(v),
            n_keep,
            n_prev,
            _MODE[mode],
            float(eps_m),
            A.capsule(random_pos),
            A.capsule(ws),
            *outs,
            A.stream_of(v),
        )
    conv = [A.to_lib(t, lib, values) for t in (keep, dropped, dst, src, eps)]
    return Condensation(*conv, n=n, n_keep=n_keep, n_prev=n_prev, vaks=mode, eps_m=float(eps_m))


def _check_labels(labels: Any, n: int) -> np.ndarray:
    """``[N]`` int64 numpy copy of ``labels``; ``ValueError`` / ``TypeError`` naming ``labels``."""
    if labels is None:
        raise ValueError("pairing='class' needs labels ([N] integer class labels), got None")
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"labels must be [N] with N = {n} (the values' length), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels, got {t.dtype}")
    return t.detach().to("cpu", torch.int64).numpy().copy()


def dataset_labels(dataset: Any, n: int) -> np.ndarray:
    """The ``[N]`` class labels of a dataset for ``vaks_pairing="class"``: an ArrayDataset's
    ``labels``, a torchvision-style ``targets``, or an image folder's ``samples``."""
    for attr in ("labels", "targets"):
        lab = getattr(dataset, attr, None)
        if lab is not None:
            try:
                return _check_labels(lab, n)
            except (TypeError, ValueError) as err:
                raise ValueError(f"vaks_pairing='class' reads the dataset's .{attr}: {err}") from err
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and len(samples) == n:
        return _check_labels([int(s[1]) for s in samples], n)
    raise ValueError(
        f"vaks_pairing='class' needs the dataset's class labels (.labels, .targets or .samples), and "
        f"{type(dataset).__name__} has none; use vaks_pairing='paper' or vaks='off'"
    )


def class_pairs(
    values: np.ndarray,  # [N] float64
    keep: np.ndarray,  # [n_keep] int64, any order
    dropped: np.ndarray,  # [D] int64, rank order
    labels: np.ndarray,  # [N] int64
    vaks: Vaks,
    eps_m: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VAKS pairs within classes (``pairing="class"``): ``(dst, src, eps)`` ``[P]`` int64, int64,
    float64, classes in ascending label order.

    Per class c with dropped points ``d_c`` (rank order) and kept points ``k_c`` (rank order:
    value descending, ties by index), ``P_c = min(len(d_c), len(k_c))``, ``src = d_c[:P_c]``
    and, as the paper's rule does over the whole set, ``dst = k_c[len(k_c) - P_c:]`` ("low"),
    ``k_c[:P_c]`` ("high") or ``P_c`` kept points of the class drawn without replacement
    (``"random"``: ``default_rng([seed, c]).choice(len(k_c), P_c, replace=False)`` positions
    of ``k_c`` in index order); eps ``eps_m + (1 - eps_m) * (P_c - j) / P_c`` for pair j of the
    class ("low", "high") or ``eps_m`` ("random"). A class with no kept point summarises
    nothing.

    Example: values [5, 4, 3, 2, 1, 0], labels [0, 1, 0, 1, 0, 1], keep 3 (points 0, 1, 2),
    dropped [3, 4, 5]: class 0 pairs 4 -> 2 (kept of class 0 in rank order: [0, 2]; one pair,
    eps 1.0); class 1 pairs 3 -> 1 (eps 1.0): dst [2, 1], src [4, 3].
    """
    order = np.lexsort((keep, -values[keep]))  # value descending, ties by index
    keep_ranked = keep[order]
    dst_parts, src_parts, eps_parts = [], [], []
    drop_lab, keep_lab = labels[dropped], labels[keep_ranked]
    for c in np.unique(drop_lab):
        d_c = dropped[drop_lab == c]
        k_c = keep_ranked[keep_lab == c]
        p = min(d_c.shape[0], k_c.shape[0])
        if p == 0:
            continue
        if vaks is Vaks.LOW:
            dst = k_c[k_c.shape[0] - p :]
        elif vaks is Vaks.HIGH:
            dst = k_c[:p]
        else:
            pos = np.random.default_rng([seed, int(c) & 0x7FFFFFFF]).choice(k_c.shape[0], size=p, replace=False)
            dst = np.sort(k_c)[pos]
        if vaks is Vaks.RANDOM:
            eps = np.full(p, eps_m, dtype=np.float64)
        else:
            eps = eps_m + (1.0 - eps_m) * (p - np.arange(p, dtype=np.float64)) / p
        dst_parts.append(dst)
        src_parts.append(d_c[:p])
        eps_parts.append(eps)
    if not dst_parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), np.zeros(0, dtype=np.float64)
    return (
        np.concatenate(dst_parts).astype(np.int64),
        np.concatenate(src_parts).astype(np.int64),
        np.concatenate(eps_parts).astype(np.float64),
    )
