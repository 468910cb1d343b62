"""Value scoring and VAKS blending ops (docs/algorithm.md sections 1 and 4).

Every op takes torch tensors (CPU or CUDA), numpy arrays or other DLPack arrays and runs
the compiled kernel on the arrays' device. Accumulators and images are updated in place;
results come back in the caller's library on the caller's device.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _arrays as A
from ._checks import is_finite_number
from ._ext import _cpu, cuda_module

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The largest ``|score|`` a row may add to a bank (kcd/scoring.h: ``kScoreLimit``): a point's sum of
#: up to 2^31 - 1 of them (counts are int32) stays finite in float64, so no sum overflows to inf. A
#: caller's score beyond it (:func:`observe_scores`), like a non-finite one or a KL that overflows,
#: is refused (on CUDA without ``strict``: skipped and counted as a non-finite row).
SCORE_LIMIT = 1e298


def _bank_args(indices, sums, counts, rows: int, row_name: str):
    idx = indices_arg(indices, rows, row_name)
    s, _ = A.as_torch(sums, "sums", writable=True)
    c, _ = A.as_torch(counts, "counts", writable=True)
    A.check_dtype(s, "sums", (torch.float64,))
    A.check_ndim(s, "sums", 1, "[N]")
    A.check_dtype(c, "counts", (torch.int32,))
    A.check_ndim(c, "counts", 1, "[N]")
    if c.shape[0] != s.shape[0]:
        raise ValueError(f"counts has {c.shape[0]} entries but sums has {s.shape[0]}; both are [N]")
    A.check_contiguous_out(s, "sums")
    A.check_contiguous_out(c, "counts")
    return idx, s, c


def logits_arg(x, name: str) -> torch.Tensor:
    """``x`` as a torch view checked to be ``[B, C]`` logits (C >= 1 when B > 0), rows contiguous."""
    t, _ = A.as_torch(x, name)
    A.check_dtype(t, name, LOGIT_DTYPES)
    A.check_ndim(t, name, 2, "[B, C]")
    if t.shape[0] > 0 and t.shape[1] == 0:
        raise ValueError(f"{name} has C = 0 classes, shape {tuple(t.shape)}")
    return A.rows_contiguous(t)


def indices_arg(indices, rows: int, row_name: str) -> torch.Tensor:
    """``indices`` as a contiguous int64 ``[rows]`` torch view."""
    idx, _ = A.as_torch(indices, "indices")
    A.check_dtype(idx, "indices", (torch.int64,))
    A.check_ndim(idx, "indices", 1, "[B]")
    if idx.shape[0] != rows:
        raise ValueError(f"indices has {idx.shape[0]} entries but {row_name} has {rows} rows")
    return idx.contiguous()


def _errors_arg(errors, device: torch.device, strict: bool | None = None) -> torch.Tensor | None:
    if errors is None:
        if strict is False and device.type == "cuda":
            raise ValueError(
                "strict=False skips bad rows on the device without a host sync, but no errors buffer was given "
                "to count them: pass errors=torch.zeros(2, dtype=torch.int64, device=...) and check it, or "
                "strict=None / True to validate first"
            )
        return None
    e, _ = A.as_torch(errors, "errors", writable=True)
    if e.dtype != torch.int64 or e.shape != (2,) or e.device != device:
        raise ValueError(
            f"errors must be an int64 [2] tensor on {device}, got {e.dtype} {tuple(e.shape)} on {e.device}"
        )
    return e


def strict_check(indices: torch.Tensor, n: int, rows: list[tuple[str, torch.Tensor]]) -> None:
    """Validates a batch with torch ops (a host sync on CUDA): indices in [0, n) and
    every logit finite. Raises before anything changes."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= n)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise IndexError(f"indices[{r}] = {int(indices[r])} is outside [0, {n})")
    for name, t in rows:
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):
            r = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} row {r} (point {int(indices[r])}) holds a non-finite value (inf or nan)")


def observe_entropy(logits, indices, sums, counts, *, errors=None, strict: bool | None = None) -> None:
    """Accumulate the prediction entropy of each row into ``sums`` / ``counts`` in place.

    Args:
        logits: ``[B, C]`` float32, float16 or bfloat16 student logits.
        indices: ``[B]`` int64 point index of each row, in ``[0, N)``.
        sums: ``[N]`` float64 running sum of entropies (updated in place).
        counts: ``[N]`` int32 number of observations (updated in place).
        errors: CUDA only: ``[2]`` int64 device counters {bad index, non-finite row}.
            Bad rows are skipped on the device and counted there, with no host sync;
            the caller raises them later (see ``ValueBank.check``).
        strict: validate on the host before launching (a sync on CUDA). Defaults to
            True unless ``errors`` is given. On CPU input is always validated first.

    ``h = logsumexp(z) - sum softmax(z) * z`` is computed in one fused pass per row and is
    finite even when probabilities underflow. Any width C: the row sums are float64 totals of
    float32 blocks of 1024 terms (kcd/scoring.h ``kSumBlock``), within 1e-6 relative of a float64
    evaluation (C = 2^30 zero logits score ln 2^30; plain float32 sums saturated at ln 2^28).
    B = 0 is a no-op. A point that appears twice in a batch is accumulated twice. A row is
    classified as on CUDA (kcd/scoring.h ``row_status``): a bad index first, then a non-finite
    value.
    """
    lg = logits_arg(logits, "logits")
    idx, s, c = _bank_args(indices, sums, counts, lg.shape[0], "logits")
    device = A.check_same_device([("logits", lg), ("indices", idx), ("sums", s), ("counts", c)])
    launch_observe(device, lg, None, idx, s, c, 0.0, _errors_arg(errors, device, strict), strict)
    A.order_back((s, sums), (c, counts))


def _row_scratch(rows: int, device: torch.device) -> torch.Tensor:
    """``[rows]`` float64 on ``device`` from torch's caching allocator (stream-ordered, graph
    capturable): the CUDA scoring kernels write each row's score there, then add the rows to
    the bank in row order (deterministic with duplicate indices)."""
    return torch.empty(rows, dtype=torch.float64, device=device)


def launch_observe(
    device: torch.device,
    lg: torch.Tensor,
    te: torch.Tensor | None,
    idx: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    temperature: float,
    errors: torch.Tensor | None,
    strict: bool | None,
) -> None:
    """The scoring kernels on checked arguments (the one place both the public ops and
    ``ValueBank.observe`` launch them): entropy when ``te`` is None, else KL.

    Args: ``lg`` / ``te`` ``[B, C]`` of one logit dtype with contiguous rows, ``idx`` ``[B]``
    int64 contiguous, ``sums`` ``[N]`` float64 and ``counts`` ``[N]`` int32 contiguous, all on
    ``device``; ``errors`` ``[2]`` int64 on ``device`` or None. Bad rows raise on the CPU
    (the C++ kernel checks before writing) and, on CUDA, with ``strict`` or no ``errors``."""
    if lg.shape[0] == 0:
        return
    if device.type == "cpu":
        if te is None:
            _cpu.observe_entropy(A.capsule(lg), A.capsule(idx), A.capsule(sums), A.capsule(counts))
        else:
            _cpu.observe_kl(
                A.capsule(lg), A.capsule(te), A.capsule(idx), A.capsule(sums), A.capsule(counts), float(temperature)
            )
        return
    check = bool(strict) or (strict is None and errors is None)
    if check:
        rows = [("logits", lg)] if te is None else [("student_logits", lg), ("teacher_logits", te)]
        strict_check(idx, sums.shape[0], rows)
    if errors is None:
        errors = torch.zeros(2, dtype=torch.int64, device=device)
    scratch = _row_scratch(lg.shape[0], device)
    if te is not None and check:
        # finite logits can still give a KL that overflows (+inf, as on the CPU): score the rows
        # first, refuse such a row before anything changes, then add them (one more sync)
        mod = cuda_module()
        mod.observe_kl(
            *(A.capsule(t) for t in (lg, te, idx, sums, counts)),
            float(temperature),
            A.capsule(errors),
            A.capsule(scratch),
            A.stream_of(lg),
            commit=False,
        )
        bad = torch.isnan(scratch)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"student_logits/teacher_logits row {r} (point {int(idx[r])}) holds a non-finite value (inf or nan): "
                "its score overflows (KL of logits this far apart at this temperature)"
            )
        mod.accumulate_rows(A.capsule(idx), A.capsule(scratch), A.capsule(sums), A.capsule(counts), A.stream_of(lg))
        return
    if te is None:
        cuda_module().observe_entropy(
            A.capsule(lg),
            A.capsule(idx),
            A.capsule(sums),
            A.capsule(counts),
            A.capsule(errors),
            A.capsule(scratch),
            A.stream_of(lg),
        )
    else:
        cuda_module().observe_kl(
            A.capsule(lg),
            A.capsule(te),
            A.capsule(idx),
            A.capsule(sums),
            A.capsule(counts),
            float(temperature),
            A.capsule(errors),
            A.capsule(scratch),
            A.stream_of(lg),
        )


def observe_kl(
    student_logits,
    teacher_logits,
    indices,
    sums,
    counts,
    temperature: float = 4.0,
    *,
    errors=None,
    strict: bool | None = None,
) -> None:
    """Accumulate ``KL(softmax(t / T) || softmax(s / T))`` per row, like ``observe_entropy``.

    Args:
        student_logits, teacher_logits: ``[B, C]`` of one dtype (float32/float16/bfloat16).
        indices: ``[B]`` int64. sums: ``[N]`` float64. counts: ``[N]`` int32.
        temperature: the distillation temperature T > 0.

    Finite logits whose KL overflows (teacher 3e38, student -3e38 at T = 1: +inf) are refused
    as a non-finite row, before anything changes, on the CPU and on CUDA with ``strict`` (the
    rows are scored, looked at, then added); on CUDA without it they are skipped and counted.
    """
    check_temperature(temperature)
    st, te = student_teacher_args(student_logits, teacher_logits)
    idx, s, c = _bank_args(indices, sums, counts, st.shape[0], "student_logits")
    device = A.check_same_device(
        [("student_logits", st), ("teacher_logits", te), ("indices", idx), ("sums", s), ("counts", c)]
    )
    launch_observe(device, st, te, idx, s, c, float(temperature), _errors_arg(errors, device, strict), strict)
    A.order_back((s, sums), (c, counts))


def sequence_logits_arg(x, name: str = "logits") -> torch.Tensor:
    """``x`` as a contiguous torch ``[B, L, V]`` tensor of token logits (V >= 1 when B, L > 0)."""
    t, _ = A.as_torch(x, name)
    A.check_dtype(t, name, LOGIT_DTYPES)
    A.check_ndim(t, name, 3, "[B, L, V] (sequences, tokens, vocabulary) when a mask is given")
    if t.shape[0] * t.shape[1] > 0 and t.shape[2] == 0:
        raise ValueError(f"{name} has V = 0 classes, shape {tuple(t.shape)}")
    return t.contiguous()


def mask_arg(mask, indices: torch.Tensor, b: int, length: int, device: torch.device, strict: bool) -> torch.Tensor:
    """``mask`` as a contiguous uint8 ``[B, L]`` tensor of 0 / 1 on ``device``.

    bool, integer and floating masks are accepted (an HF ``attention_mask`` is int64). Values
    other than 0 and 1, and sequences without a 1 (bool masks included), raise ``ValueError``
    on the CPU and with ``strict`` (a host sync on CUDA); otherwise on CUDA they are marked for
    the kernel, which skips and counts those sequences (raised by ``ValueBank.check``)."""
    m, _ = A.as_torch(mask, "mask")
    if m.is_complex():
        raise TypeError(f"mask must be bool, integer or floating 0/1 values, got {A.dtype_name(m)}")
    if m.dim() != 2 or tuple(m.shape) != (b, length):
        raise ValueError(f"mask must be [B, L] = [{b}, {length}] (one entry per token of logits), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"mask is on {m.device} but logits are on {device}; pass them on one device")
    binary = None if m.dtype == torch.bool else (m == 0) | (m == 1)
    if device.type == "cpu" or strict:
        if binary is not None and not bool(binary.all()):
            i, j = (int(v) for v in (~binary).nonzero()[0])
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), got mask[{i}, {j}] = {m[i, j].item()!r}")
        out = m.contiguous().view(torch.uint8) if binary is None else m.to(torch.uint8).contiguous()
        empty = out.sum(dim=1) == 0
        if b and bool(empty.any()):
            r = int(empty.nonzero()[0, 0])
            raise ValueError(
                f"mask row {r} (point {int(indices[r])}) has no unmasked token: a sequence is scored by the "
                "mean entropy of its unmasked tokens and needs at least one"
            )
        return out
    if binary is None:  # bool: 0 / 1 by construction; a row without a 1 is the kernel's to count
        return m.contiguous().view(torch.uint8)
    return torch.where(binary, m, 2).to(torch.uint8).contiguous()


def scores_arg(scores, rows: int | None = None) -> torch.Tensor:
    """``scores`` as a contiguous float64 ``[B]`` torch tensor (real dtypes, converted)."""
    t, _ = A.as_torch(scores, "scores")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"scores must be real numbers (a float or integer dtype), got {A.dtype_name(t)}")
    A.check_ndim(t, "scores", 1, "[B] (one score per sample)")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"scores has {t.shape[0]} entries but indices has {rows}")
    return t.detach().to(torch.float64).contiguous()


def observe_entropy_seq(logits, mask, indices, sums, counts, *, errors=None, strict: bool | None = None) -> None:
    """Accumulate each sequence's mean token entropy into ``sums`` / ``counts`` in place.

    Args:
        logits: ``[B, L, V]`` float32, float16 or bfloat16 token logits (made contiguous).
        mask: ``[B, L]`` bool or 0/1 numbers: 1 for a token that counts (an HF
            ``attention_mask``); masked tokens are never read.
        indices: ``[B]`` int64 point index of each sequence. sums ``[N]`` float64 and
            counts ``[N]`` int32 are updated in place; errors and strict as for
            :func:`observe_entropy`.

    A sequence's score is ``mean_{t: mask[b, t] = 1} H(softmax(logits[b, t]))``, counted once
    (``counts += 1``) per sequence. A mask value other than 0/1 or a sequence with no
    unmasked token raises before anything changes (on CUDA without ``strict`` and with
    ``errors``: skipped and counted as a non-finite row).
    """
    lg = sequence_logits_arg(logits)
    idx, s, c = _bank_args(indices, sums, counts, lg.shape[0], "logits")
    device = A.check_same_device([("logits", lg), ("indices", idx), ("sums", s), ("counts", c)])
    errs = _errors_arg(errors, device, strict)
    launch_observe_seq(device, lg, mask, idx, s, c, errs, strict)
    A.order_back((s, sums), (c, counts))


def launch_observe_seq(
    device: torch.device,
    lg: torch.Tensor,
    mask,
    idx: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    errors: torch.Tensor | None,
    strict: bool | None,
) -> None:
    """The masked sequence kernel on checked arguments (``lg`` ``[B, L, V]`` contiguous,
    ``idx`` ``[B]``, the bank's ``sums`` / ``counts``); ``mask`` is checked here."""
    b, length = lg.shape[0], lg.shape[1]
    check = device.type == "cpu" or bool(strict) or (strict is None and errors is None)
    m = mask_arg(mask, idx, b, length, device, check)
    if b == 0:
        return
    if device.type == "cpu":
        _cpu.observe_entropy_seq(A.capsule(lg), A.capsule(m), A.capsule(idx), A.capsule(sums), A.capsule(counts))
        return
    if check:
        strict_check(idx, sums.shape[0], [])
        bad = m.reshape(-1).bool() & ~torch.isfinite(lg.reshape(b * length, -1)).all(dim=1)  # unmasked rows only
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"logits row {t // length} (point {int(idx[t // length])}) holds a non-finite value (inf or nan) "
                f"at unmasked token {t % length}"
            )
    if errors is None:
        errors = torch.zeros(2, dtype=torch.int64, device=device)
    cuda_module().observe_entropy_seq(
        A.capsule(lg),
        A.capsule(m),
        A.capsule(idx),
        A.capsule(sums),
        A.capsule(counts),
        A.capsule(errors),
        A.capsule(_row_scratch(lg.shape[0], device)),
        A.stream_of(lg),
    )


def observe_scores(scores, indices, sums, counts, *, errors=None, strict: bool | None = None) -> None:
    """Accumulate caller-computed per-sample scores: ``sums[indices[r]] += scores[r]``,
    ``counts[indices[r]] += 1`` (higher = more valuable, as for entropy).

    Args:
        scores: ``[B]`` real numbers (a detection loss, any measure), converted to float64.
        indices: ``[B]`` int64. sums ``[N]`` float64, counts ``[N]`` int32 (in place);
            errors and strict as for :func:`observe_entropy`.

    Non-finite scores, scores beyond ``+-SCORE_LIMIT`` (1e298: a point's sum of 2^31 of them
    stays finite, so a sum never overflows to inf; 1e308 is refused, not clamped) and indices
    outside ``[0, N)`` raise before anything changes (on CUDA without ``strict`` and with
    ``errors``: skipped and counted, a bad index in ``errors[0]``, the rest in ``errors[1]``).
    """
    sc = scores_arg(scores)
    idx, s, c = _bank_args(indices, sums, counts, sc.shape[0], "scores")
    device = A.check_same_device([("scores", sc), ("indices", idx), ("sums", s), ("counts", c)])
    launch_observe_scores(device, sc, idx, s, c, _errors_arg(errors, device, strict), strict)
    A.order_back((s, sums), (c, counts))


def launch_observe_scores(
    device: torch.device,
    sc: torch.Tensor,
    idx: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    errors: torch.Tensor | None,
    strict: bool | None,
) -> None:
    """The scores kernel on checked arguments (``sc`` ``[B]`` float64 contiguous)."""
    if sc.shape[0] == 0:
        return
    if device.type == "cpu":
        _cpu.observe_scores(A.capsule(sc), A.capsule(idx), A.capsule(sums), A.capsule(counts))
        return
    if strict or (strict is None and errors is None):
        strict_check(idx, sums.shape[0], [("scores", sc[:, None])])
        check_score_limit(sc, idx)
    if errors is None:
        errors = torch.zeros(2, dtype=torch.int64, device=device)
    cuda_module().observe_scores(
        A.capsule(sc),
        A.capsule(idx),
        A.capsule(sums),
        A.capsule(counts),
        A.capsule(errors),
        A.capsule(_row_scratch(sc.shape[0], device)),
        A.stream_of(sc),
    )


def check_score_limit(sc: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuses a finite score beyond ``+-SCORE_LIMIT`` (the CPU kernel's rule; a host sync on CUDA)."""
    big = sc.abs() > SCORE_LIMIT
    if bool(big.any()):
        r = int(big.nonzero()[0, 0])
        raise ValueError(
            f"scores row {r} (point {int(idx[r])}) = {float(sc[r])!r} is beyond +-1e298, the largest score the bank "
            "adds (a point's sum of 2^31 such scores stays finite in float64)"
        )


def check_temperature(temperature: float) -> None:
    if not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def student_teacher_args(student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits checked (``[B, C]``, one shape, one logit dtype), rows contiguous."""
    st = logits_arg(student_logits, "student_logits")
    te = logits_arg(teacher_logits, "teacher_logits")
    if st.shape != te.shape:
        raise ValueError(
            f"student_logits {tuple(st.shape)} and teacher_logits {tuple(te.shape)} must have one shape [B, C]"
        )
    if st.dtype != te.dtype:
        raise TypeError(f"student_logits is {A.dtype_name(st)} but teacher_logits is {A.dtype_name(te)}")
    return st, te


def values(sums, counts, period: float, alpha: float = 0.03):
    """Cost-aware value of every point (paper Eq. 13): ``v = (S/n) * (n/T)**alpha``.

    Args:
        sums: ``[N]`` float64. counts: ``[N]`` int32. period: T (epochs per stage) > 0.
        alpha: the cost-aware weighting exponent (paper default 0.03).

    Returns: ``[N]`` float64 in the caller's library and device; ``+inf`` where
    ``counts == 0`` (an unobserved point ranks above every observed one).
    """
    for name, v in (("period", period), ("alpha", alpha)):
        if not is_finite_number(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period!r}")
    s, lib = A.as_torch(sums, "sums")
    c, _ = A.as_torch(counts, "counts")
    A.check_dtype(s, "sums", (torch.float64,))
    A.check_dtype(c, "counts", (torch.int32,))
    A.check_ndim(s, "sums", 1, "[N]")
    A.check_ndim(c, "counts", 1, "[N]")
    if c.shape != s.shape:
        raise ValueError(f"counts has {c.shape[0]} entries but sums has {s.shape[0]}; both are [N]")
    device = A.check_same_device([("sums", s), ("counts", c)])
    s, c = s.contiguous(), c.contiguous()
    out = torch.empty_like(s)
    if device.type == "cpu":
        _cpu.values(A.capsule(s), A.capsule(c), A.capsule(out), float(period), float(alpha))
    else:
        cuda_module().values(A.capsule(s), A.capsule(c), A.capsule(out), float(period), float(alpha), A.stream_of(s))
    return A.to_lib(out, lib, sums)


def normalization(mean, std, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[C]`` ``scale = 1 / (255 std)`` and ``shift = -mean / std`` (computed in
    float64, rounded once): what :func:`augment` applies to each uint8 value."""
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if m.numel() == 1:
        m = m.expand(channels)
    if s.numel() == 1:
        s = s.expand(channels)
    if m.numel() != channels or s.numel() != channels:
        raise ValueError(f"mean and std need 1 or C = {channels} values, got {m.numel()} and {s.numel()}")
    if not (torch.isfinite(m).all() and torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"mean must be finite and std finite and > 0, got mean {m.tolist()}, std {s.tolist()}")
    return (1.0 / (255.0 * s)).float(), (-m / s).float()


def fill_values(fill, mean, std, channels: int) -> torch.Tensor:
    """float32 ``[C]`` padding outputs ``(fill - mean) / std`` (in float64, rounded once)."""
    f = torch.as_tensor(fill, dtype=torch.float64).flatten()
    f = f.expand(channels) if f.numel() == 1 else f
    if f.numel() != channels or not bool(torch.isfinite(f).all()):
        raise ValueError(f"fill needs 1 or C = {channels} finite values, got {f.tolist()}")
    m = torch.as_tensor(mean, dtype=torch.float64).flatten().expand(channels)
    s = torch.as_tensor(std, dtype=torch.float64).flatten().expand(channels)
    return ((f - m) / s).float()


def augment(
    images,
    indices,
    params,
    *,
    out_size: tuple[int, int],
    pad: int = 0,
    mean=(0.0,),
    std=(1.0,),
    fill=None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    check: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gathers, pads, crops, flips and normalizes a batch in one pass (the tensor back end).

    Args:
        images: ``[N, H, W, C]`` uint8 storage, contiguous (CPU or CUDA).
        indices: ``[B]`` int64 images to take.
        params: ``[B, 3]`` int32 per sample: crop origin ``y0`` in ``[0, H + 2 pad - oh]``,
            ``x0`` in ``[0, W + 2 pad - ow]`` (padded coordinates), ``flip`` 0 or 1.
        out_size: ``(oh, ow)``. pad: zero pixels added on every side before cropping.
        mean, std: per channel (or one value), on the ``[0, 1]`` scale: channel c becomes
            ``(v / 255 - mean[c]) / std[c]``.
        fill: the padding's colour per channel (or one value) on the ``[0, 1]`` scale,
            normalised like the pixels; None: black (pixel 0, torchvision's padding).
        dtype: float32 or bfloat16 output. channels_last: output memory in NHWC order.
        check: validate indices and params first (always on CPU; on CUDA default True, a
            host sync; the back end passes False for params it drew in range).
        out: an output tensor to write into (shape ``[B, C, oh, ow]``, the dtype and memory
            format asked for), or None to allocate one.

    Returns ``[B, C, oh, ow]`` on the images' device.
    """
    im, _ = A.as_torch(images, "images")
    idx, _ = A.as_torch(indices, "indices")
    pa, _ = A.as_torch(params, "params")
    A.check_dtype(im, "images", (torch.uint8,))
    A.check_ndim(im, "images", 4, "[N, H, W, C]")
    if not im.is_contiguous():
        raise ValueError(f"images must be contiguous [N, H, W, C], got strides {im.stride()}")
    A.check_dtype(idx, "indices", (torch.int64,))
    A.check_ndim(idx, "indices", 1, "[B]")
    A.check_dtype(pa, "params", (torch.int32,))
    if pa.dim() != 2 or pa.shape != (idx.shape[0], 3):
        raise ValueError(f"params must be [B, 3] = [{idx.shape[0]}, 3] (y0, x0, flip), got {tuple(pa.shape)}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    oh, ow = (int(v) for v in out_size)
    n, h, w, c = im.shape
    if not (0 <= pad and 1 <= oh <= h + 2 * pad and 1 <= ow <= w + 2 * pad):
        raise ValueError(f"out_size {(oh, ow)} with pad {pad} does not fit images of {h}x{w} (crop <= size + 2 pad)")
    device = A.check_same_device([("images", im), ("indices", idx), ("params", pa)])
    scale, shift = normalization(mean, std, c)
    pad_values = shift.clone() if fill is None else fill_values(fill, mean, std, c)
    scale, shift, pad_values = (t.to(device) for t in (scale, shift, pad_values))
    b = idx.shape[0]
    if out is None:
        out = torch.empty((b, oh, ow, c) if channels_last else (b, c, oh, ow), dtype=dtype, device=device)
        out = out.permute(0, 3, 1, 2) if channels_last else out
    elif out.shape != (b, c, oh, ow) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be [{b}, {c}, {oh}, {ow}] {dtype} on {device}, got {tuple(out.shape)} {out.dtype}")
    raw = out.permute(0, 2, 3, 1) if channels_last else out  # the memory order the kernel writes
    if not raw.is_contiguous():
        raise ValueError("out must be contiguous in the memory format asked for (channels_last or not)")
    if b == 0:
        return out
    idx, pa = idx.contiguous(), pa.contiguous()
    if device.type == "cuda" and (check is None or check):
        _check_augment_torch(n, idx, pa, h + 2 * pad - oh, w + 2 * pad - ow)
    args = [A.capsule(t) for t in (im, idx, pa, scale, shift, pad_values, raw)] + [int(pad), bool(channels_last)]
    if device.type == "cpu":
        _cpu.augment(*args)  # checks indices and params itself, before writing
    else:
        cuda_module().augment(*args, A.stream_of(im))
    return out


def _check_augment_torch(n: int, idx: torch.Tensor, pa: torch.Tensor, max_y: int, max_x: int) -> None:
    bad = (idx < 0) | (idx >= n)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise IndexError(f"indices[{j}] = {int(idx[j])} is outside [0, {n})")
    ok = (
        (pa[:, 0] >= 0)
        & (pa[:, 0] <= max_y)
        & (pa[:, 1] >= 0)
        & (pa[:, 1] <= max_x)
        & ((pa[:, 2] == 0) | (pa[:, 2] == 1))
    )
    if not bool(ok.all()):
        j = int((~ok).nonzero()[0, 0])
        raise ValueError(
            f"params[{j}] = {pa[j].tolist()} is not a crop origin in [0, {max_y}] x [0, {max_x}] with flip 0 or 1"
        )


def resize_bilinear(image, size: tuple[int, int]):
    """Resizes one image as Pillow (13)'s ``Image.resize((OW, OH), BILINEAR)`` does, bit for
    bit (antialiased triangle filter, 22-bit fixed point, Pillow 13's pass order; kcd/resize.h),
    without the round trip through a PIL image and 2.4x faster (benchmarks/scale.py's photo pairs,
    ~400x350: 0.69 vs 1.65 ms): the folder overlay resizes each VAKS pair's ``src`` image to its
    ``dst`` image's size with it.

    Args:
        image: ``[H, W, C]`` uint8 on the CPU, C = 1 (grey, Pillow's "L") or 3 (RGB) (numpy or
            torch; C-contiguous or copied).
        size: ``(OH, OW)``, both >= 1.

    Returns ``[OH, OW, C]`` uint8 in the caller's library.
    """
    im, lib = A.as_torch(image, "image")
    A.check_dtype(im, "image", (torch.uint8,))
    A.check_ndim(im, "image", 3, "[H, W, C]")
    if im.device.type != "cpu":
        raise ValueError(f"image must be on the CPU, got {im.device}")
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    if not ok or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ValueError(f"size must be (OH, OW) with ints >= 1, got {size!r}")
    if min(im.shape) < 1:
        raise ValueError(f"image must have H, W, C >= 1, got shape {tuple(im.shape)}")
    if im.shape[2] not in (1, 3):
        hint = " (channels first? pass [H, W, C])" if im.shape[0] in (1, 3) else ""
        raise ValueError(
            f"image must be [H, W, C] with C = 1 or 3 (grey or RGB: Pillow premultiplies alpha, so 2 or 4 "
            f"channels would not match it), got shape {tuple(im.shape)}{hint}"
        )
    im = im.contiguous()
    out = torch.empty((int(size[0]), int(size[1]), im.shape[2]), dtype=torch.uint8)
    _cpu.resize_bilinear(A.capsule(im), A.capsule(out))
    return A.to_lib(out, lib, image)


def blend_(images, dst, src, eps, *, check: bool | None = None):
    """In-place VAKS summary: ``images[dst[j]] = round(eps[j] * images[dst[j]] +
    (1 - eps[j]) * images[src[j]])`` for every pair j, all pairs reading the images as
    they were before the call (round half up, clamp to [0, 255]). On CUDA every pair in one
    launch, each pair cut into 64 KiB spans with a block per span (large images no longer
    run on one block).

    Args:
        images: ``[N, ...]`` uint8 storage, contiguous (updated in place).
        dst: ``[L]`` int64 points to write; unique and disjoint from ``src``.
        src: ``[L]`` int64 points to read.
        eps: ``[L]`` float weights in [0, 1] (cast to float64).
        check: validate ranges, uniqueness and disjointness first (always on CPU;
            on CUDA default True, a host sync; pass False for ``condense`` output: the
            kernel then skips pairs out of bounds, counts them and this raises
            ``IndexError`` after it, without writing anything out of bounds).

    Returns ``images``.
    """
    im, _ = A.as_torch(images, "images", writable=True)
    d, _ = A.as_torch(dst, "dst")
    s, _ = A.as_torch(src, "src")
    e, _ = A.as_torch(eps, "eps")
    A.check_dtype(im, "images", (torch.uint8,))
    if im.dim() < 1:
        raise ValueError(f"images must be [N, ...], got shape {tuple(im.shape)}")
    A.check_contiguous_out(im, "images")
    A.check_dtype(d, "dst", (torch.int64,))
    A.check_dtype(s, "src", (torch.int64,))
    A.check_ndim(d, "dst", 1, "[L]")
    A.check_ndim(s, "src", 1, "[L]")
    A.check_ndim(e, "eps", 1, "[L]")
    if not e.is_floating_point():
        raise TypeError(f"eps must be a floating dtype, got {A.dtype_name(e)}")
    if not (d.shape == s.shape == e.shape):
        raise ValueError(f"dst {tuple(d.shape)}, src {tuple(s.shape)} and eps {tuple(e.shape)} must all be [L]")
    device = A.check_same_device([("images", im), ("dst", d), ("src", s), ("eps", e)])
    d, s, e = d.contiguous(), s.contiguous(), e.to(torch.float64).contiguous()
    if d.shape[0] == 0:
        return images
    if device.type == "cpu":
        _cpu.blend(A.capsule(im), A.capsule(d), A.capsule(s), A.capsule(e))
        return images
    if check is None or check:
        _check_pairs_torch(im.shape[0], d, s, e)
    errors = torch.zeros(1, dtype=torch.int64, device=device)
    cuda_module().blend(A.capsule(im), A.capsule(d), A.capsule(s), A.capsule(e), A.capsule(errors), A.stream_of(im))
    A.order_back((im, images))
    if check is False:  # the kernel's bounds guard skipped and counted bad pairs: report them (one sync)
        bad = int(errors.item())
        if bad:
            raise IndexError(
                f"{bad} summary pair(s) had a point outside [0, {im.shape[0]}) or a weight outside [0, 1]; "
                "they were skipped (the other pairs were blended)"
            )
    return images


def blend_pairs_async_(images: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, eps: torch.Tensor, errors) -> None:
    """:func:`blend_` on the device without any host synchronisation, for callers that launch
    many blends and read the bounds guard's count once: ``errors`` (``[1]`` int64 on the
    images' device) gains the number of pairs skipped. Arguments as checked by ``blend_``:
    ``images`` ``[N, ...]`` uint8 contiguous CUDA, ``dst`` / ``src`` ``[L]`` int64 and ``eps``
    ``[L]`` float64, contiguous, on its device. Raises ``ValueError`` for a CPU tensor."""
    if images.device.type != "cuda":
        raise ValueError(f"blend_pairs_async_ blends device images; got images on {images.device} (use blend_)")
    if dst.shape[0] == 0:
        return
    cuda_module().blend(
        A.capsule(images), A.capsule(dst), A.capsule(src), A.capsule(eps), A.capsule(errors), A.stream_of(images)
    )


def blend_image_(dst, src, eps: float):
    """In-place VAKS summary of one pair held in two buffers: ``dst = round(eps * dst +
    (1 - eps) * src)`` per byte (round half up, clamp to [0, 255]): the same bytes as
    :func:`blend_` on ``images = stack([dst, src])``, without copying the two images into
    one array (the folder overlay blends each decoded pair with it).

    Args:
        dst: ``[...]`` uint8 on the CPU, contiguous and writeable (updated in place).
        src: uint8 on the CPU, the shape of ``dst``.
        eps: the weight of ``dst``, a float in [0, 1] (or a 0-d tensor or array holding one).

    Raises ``ValueError`` when dst and src overlap in memory (other than being the same buffer).

    Returns ``dst``.
    """
    d, _ = A.as_torch(dst, "dst", writable=True)
    s, _ = A.as_torch(src, "src")
    A.check_dtype(d, "dst", (torch.uint8,))
    A.check_dtype(s, "src", (torch.uint8,))
    A.check_contiguous_out(d, "dst")
    if d.shape != s.shape:
        raise ValueError(f"src must have dst's shape {tuple(d.shape)}, got {tuple(s.shape)}")
    device = A.check_same_device([("dst", d), ("src", s)])
    if device.type != "cpu":
        raise ValueError(f"dst and src must be on the CPU (use blend_ for device images), got {device}")
    if isinstance(eps, (torch.Tensor, np.ndarray)) and eps.ndim == 0:
        eps = eps.item()  # a 0-d tensor or array holding the weight (a bool one is refused below)
    if isinstance(eps, bool) or not isinstance(eps, (float, int, np.floating, np.integer)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be a float in [0, 1], got {eps!r}")
    s = s.contiguous()
    d0, s0, nb = d.data_ptr(), s.data_ptr(), d.numel()
    if nb and d0 != s0 and d0 < s0 + nb and s0 < d0 + nb:  # the same buffer is fine: each byte reads itself
        raise ValueError(
            f"dst and src overlap in memory (offset {s0 - d0:+d} bytes): a byte would read a value already "
            "blended; pass a copy of src"
        )
    _cpu.blend_image(A.capsule(d), A.capsule(s), float(eps))
    return dst


def _check_pairs_torch(n: int, d: torch.Tensor, s: torch.Tensor, e: torch.Tensor) -> None:
    for name, t in (("dst", d), ("src", s)):
        bad = (t < 0) | (t >= n)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise IndexError(f"{name}[{j}] = {int(t[j])} is outside [0, {n})")
    bad = ~((e >= 0) & (e <= 1))
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"eps[{j}] = {float(e[j])} is outside [0, 1]")
    if torch.unique(d).numel() != d.numel():
        raise ValueError("dst holds a point twice; each kept point is summarised at most once")
    if bool(torch.isin(s, d).any()):
        raise ValueError("src and dst overlap: a summary pair may not read an image another pair writes")
