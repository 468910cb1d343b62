"""Slow, obvious numpy versions of every kcd_fast op: the test oracle. Float64
throughout, loops where a loop is the clearest statement of the spec."""

from __future__ import annotations

import numpy as np


def entropy(logits: np.ndarray) -> np.ndarray:
    """[B, C] -> [B]: logsumexp(z) - sum softmax(z) * z, in float64, written relative to the
    row maximum m (log(sum e) - sum e (z - m) / sum e with e = exp(z - m)) so that huge
    logits do not cancel: [3.4e38, 3.4e38] has entropy log 2."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    d = z - m
    e = np.exp(d)
    zsum = e.sum(axis=1)
    w = np.where(e > 0, e * d, 0.0).sum(axis=1)  # e = 0 where d = -inf: no 0 * inf
    return np.maximum(np.log(zsum) - w / zsum, 0.0)


def kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    """[B, C] x2 -> [B]: KL(softmax(t / T) || softmax(s / T)), in float64."""
    a = np.asarray(teacher, dtype=np.float64) / temperature
    b = np.asarray(student, dtype=np.float64) / temperature
    la = a - a.max(axis=1, keepdims=True)
    la = la - np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb = lb - np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return np.maximum((np.exp(la) * (la - lb)).sum(axis=1), 0.0)


def sequence_entropy(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, L, V] token logits, [B, L] 0/1 mask -> [B]: each sequence's mean entropy over
    its unmasked tokens, one token at a time."""
    z = np.asarray(logits, dtype=np.float64)
    out = np.zeros(z.shape[0])
    for b in range(z.shape[0]):
        hs = [entropy(z[b, t][None, :])[0] for t in range(z.shape[1]) if mask[b, t]]
        out[b] = sum(hs) / len(hs)
    return out


def observe(sums: np.ndarray, counts: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> None:
    """Accumulates scores [B] of points indices [B] into sums / counts in place."""
    for i, h in zip(indices.tolist(), scores.tolist(), strict=True):
        sums[i] += h
        counts[i] += 1


def values(sums: np.ndarray, counts: np.ndarray, period: float, alpha: float) -> np.ndarray:
    """v_i = (S_i / n_i) * (n_i / T)**alpha; +inf where n_i == 0."""
    out = np.full(sums.shape, np.inf)
    for i in range(sums.shape[0]):
        n = float(counts[i])
        if n > 0:
            out[i] = (sums[i] / n) * (n / period) ** alpha
    return out


def rank(values: np.ndarray) -> np.ndarray:
    """pi: all points by value descending, ties by index ascending."""
    v = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(v.shape[0]), -v))


def condense(
    values, n_keep: int, n_prev: int | None = None, vaks: str = "low", eps_m: float = 0.7, seed: int = 0
) -> dict[str, np.ndarray]:
    """docs/algorithm.md sections 3-4, literally, with a full sort."""
    n = len(values)
    n_prev = n if n_prev is None else n_prev
    pi = rank(values)
    keep = np.sort(pi[:n_keep])
    dropped = pi[n_keep:n_prev]
    L = len(dropped)
    P = 0 if vaks == "off" else min(L, n_keep)
    src = dropped[:P]
    if vaks == "low":
        dst = pi[n_keep - P : n_keep]
        eps = np.array([eps_m + (1 - eps_m) * (P - j) / P for j in range(P)], dtype=np.float64)
    elif vaks == "high":
        dst = pi[:P]
        eps = np.array([eps_m + (1 - eps_m) * (P - j) / P for j in range(P)], dtype=np.float64)
    elif vaks == "random":
        pos = np.random.default_rng(seed).choice(n_keep, size=P, replace=False)
        dst = keep[pos]
        eps = np.full(P, eps_m, dtype=np.float64)
    else:
        dst = np.zeros(0, dtype=np.int64)
        eps = np.zeros(0, dtype=np.float64)
    return {
        "keep": keep,
        "dropped": dropped,
        "dst": np.asarray(dst, dtype=np.int64),
        "src": np.asarray(src, dtype=np.int64),
        "eps": eps,
    }


def blend(images: np.ndarray, dst, src, eps) -> np.ndarray:
    """A new array: images[dst[j]] = round(eps*images[dst[j]] + (1-eps)*images[src[j]]),
    every pair reading the original images."""
    before = np.asarray(images)
    out = before.copy()
    for d, s, e in zip(np.asarray(dst).tolist(), np.asarray(src).tolist(), np.asarray(eps).tolist(), strict=True):
        v = e * before[d].astype(np.float64) + (1.0 - e) * before[s].astype(np.float64)
        out[d] = np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)
    return out


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> ``[OH, OW, C]``: Pillow's BILINEAR resize written out (a
    triangle filter of support max(1, in / out), weights normalised per output pixel and
    rounded to 22-bit fixed point, two passes in Pillow 13's order (vertical first when the
    height shrinks by more than twice what the width does, else horizontal first), each
    output = clamp((sum + 2**21) >> 22))."""
    bits = 22

    def taps(n_in: int, n_out: int) -> list[tuple[int, list[int]]]:
        scale = n_in / n_out
        fscale = max(scale, 1.0)
        support, ss = fscale, 1.0 / fscale
        out = []
        for i in range(n_out):
            center = (i + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = [max(0.0, 1.0 - abs((x + lo - center + 0.5) * ss)) for x in range(hi - lo)]
            total = sum(w)
            w = [v / total for v in w] if total != 0.0 else w
            out.append((lo, [int(v * (1 << bits) + (0.5 if v >= 0 else -0.5)) for v in w]))
        return out

    def apply(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
        a = np.moveaxis(a.astype(np.int64), axis, 0)
        res = np.empty((n_out, *a.shape[1:]), dtype=np.uint8)
        for i, (lo, w) in enumerate(taps(a.shape[0], n_out)):
            acc = np.full(a.shape[1:], 1 << (bits - 1), dtype=np.int64)
            for t, wt in enumerate(w):
                acc += a[lo + t] * wt
            res[i] = np.clip(acc >> bits, 0, 255)
        return np.moveaxis(res, 0, axis)

    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    oh, ow = size
    if oh < h and (h - oh) > 2 * (w - ow):  # Pillow 13's order: the height shrinks much more
        img = apply(img, oh, 0) if oh != h else img
        return (apply(img, ow, 1) if ow != w else img).copy()
    if ow != w:
        img = apply(img, ow, 1)
    if oh != h:
        img = apply(img, oh, 0)
    return img.copy()


def epoch_sizes(epochs: int, period: int, rho: float, n: int, decay: str = "exp", warmup: int = 1) -> list[int]:
    """Points trained on per epoch, straight from docs/algorithm.md section 2."""
    S = epochs // period
    sizes = []
    for e in range(epochs):
        s = e // period + 1
        if s == 1 and (e < warmup or warmup == period):
            sizes.append(n)
            continue
        if decay == "exp":
            tau = rho ** (s / S)
        elif decay == "linear":
            tau = 1 - (1 - rho) * s / S
        else:
            tau = 1 - (1 - rho) * (s - 1) / S
        sizes.append(max(1, int(np.floor(tau * n + 0.5))))
    return sizes


def augment(
    images: np.ndarray, indices, params, out_size, pad, scale: np.ndarray, shift: np.ndarray, fill=None
) -> np.ndarray:
    """The tensor back end's augmentation, pixel by pixel: [B, C, oh, ow] float32. Sample b
    reads images[indices[b]] padded by `pad`, output (y, x) <- padded
    (y0 + y, x0 + (ow - 1 - x if flip else x)), channel c <- v * scale[c] + shift[c] (float32)
    for a stored pixel, fill[c] for the padding (default: shift[c], the value of pixel 0)."""
    fill = shift if fill is None else fill
    oh, ow = out_size
    _, h, w, c = images.shape
    out = np.zeros((len(indices), c, oh, ow), dtype=np.float32)
    for b, (i, (y0, x0, flip)) in enumerate(zip(indices, params, strict=True)):
        for y in range(oh):
            for x in range(ow):
                sy, sx = y0 + y - pad, x0 + (ow - 1 - x if flip else x) - pad
                for ch in range(c):
                    if 0 <= sy < h and 0 <= sx < w:
                        out[b, ch, y, x] = np.float32(np.float32(images[i, sy, sx, ch]) * scale[ch]) + shift[ch]
                    else:
                        out[b, ch, y, x] = fill[ch]
    return out
