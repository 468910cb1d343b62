"""The value bank: per-point accumulators S_i (sum of scores) and n_i (observations)
over the whole run, on a chosen device (docs/algorithm.md section 1)."""

from __future__ import annotations

import warnings
from enum import unique
from typing import Any

import numpy as np
import torch

from . import distributed as D
from . import ops
from ._checks import OptionEnum, is_finite_number, is_int


@unique
class Measure(OptionEnum):
    """How a point's value is scored from the training step's logits."""

    ENTROPY = "entropy"  # student prediction entropy (default)
    KL = "kl"  # KL(teacher || student) at the distillation temperature
    RANDOM = "random"  # uniform random values, seeded (an ablation)

    @classmethod
    def option_name(cls) -> str:
        return "value"


class ValueBank:
    """Running value statistics of N knowledge points.

    ``sums`` ``[N]`` float64 and ``counts`` ``[N]`` int32 live on ``device`` (or, when
    ``device`` is None, on the device of the first observed logits). On CUDA a batch is
    scored without any host synchronisation: bad rows (index outside [0, N), non-finite
    logits) are skipped on the device and counted, and ``check()`` (called by
    ``values()``) raises them. ``strict=True`` validates every batch before it is scored.

    Under ``torch.distributed`` (``local=True``), ``sums`` / ``counts`` hold the GLOBAL
    totals as of the last :meth:`all_reduce_`, identical on every rank, and this rank's
    observations since then accumulate in ``local_sums`` ``[N]`` float64 /
    ``local_counts`` ``[N]`` int32. ``all_reduce_(group)`` (a collective) adds every
    rank's local accumulators to the totals and zeroes them, so each observation is in
    the totals exactly once; ``values()`` ranks the totals. ``state_dict(group)`` is then
    a collective too: it holds the global totals including everything observed since the
    last reduce (without changing the bank), the same on every rank, so it resumes at
    any world size.

    Example::

        bank = ValueBank(len(dataset), period=40)
        bank.observe(indices, student_logits)           # every training step
        cond = kcd_fast.condense(bank.values(), n_keep)  # at a condensation point

        bank = ValueBank(len(dataset), period=40, local=True)   # under DDP
        bank.observe(indices, student_logits)           # this rank's points, no communication
        bank.all_reduce_()                              # at a condensation point, on every rank
        cond = kcd_fast.condense(bank.values(), n_keep)  # identical on every rank
    """

    def __init__(
        self,
        n: int,
        *,
        period: int,
        alpha: float = 0.03,
        measure: str | Measure = "entropy",
        temperature: float = 4.0,
        device: str | torch.device | None = "cpu",
        strict: bool = False,
        seed: int = 0,
        local: bool = False,
    ):
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be an int >= 1 (the number of points), got {n!r}")
        if not is_finite_number(period) or not period > 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        if not is_finite_number(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not (is_finite_number(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.n = int(n)
        self.period = int(period) if is_int(period) else float(period)
        self.alpha = float(alpha)
        self.measure = Measure.parse(measure)
        self.temperature = float(temperature)
        if not isinstance(local, (bool, np.bool_)):
            raise TypeError(f"local must be a bool, got {type(local).__name__} {local!r}")
        self.strict = bool(strict)
        self.seed = int(seed)
        self.local = bool(local)
        self._random_draws = 0
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.local_sums: torch.Tensor | None = None  # [N] float64, local=True only
        self.local_counts: torch.Tensor | None = None  # [N] int32, local=True only
        self._errors: torch.Tensor | None = None
        self._warned_teacher = False
        self.classes: int | None = None  # logit columns (classes, or a vocabulary) of the first observe
        self.last_rows = 0
        self._follow = device is None  # placed on the first observed logits' device
        self._placed = not self._follow
        if device is not None:
            self._allocate(torch.device(device))

    @property
    def device(self) -> torch.device | None:
        return None if self.sums is None else self.sums.device

    def _allocate(self, device: torch.device) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.sums = torch.zeros(self.n, dtype=torch.float64, device=device)
        self.counts = torch.zeros(self.n, dtype=torch.int32, device=device)
        if self.local:
            self.local_sums = torch.zeros_like(self.sums)
            self.local_counts = torch.zeros_like(self.counts)
        self._errors = torch.zeros(2, dtype=torch.int64, device=device) if device.type == "cuda" else None
        # the CUDA stream the accumulators were last used on (made and zeroed on the current one)
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def to(self, device: str | torch.device) -> ValueBank:
        """Moves the accumulators (pending device errors are checked first)."""
        device = torch.device(device)
        if self.sums is None:
            self._allocate(device)
            return self
        self.check()  # also orders the current stream after the bank's
        old = (self.sums, self.counts, self.local_sums, self.local_counts)
        self._allocate(device)
        for new, t in zip((self.sums, self.counts, self.local_sums, self.local_counts), old, strict=True):
            if new is not None:
                new.copy_(t)
        return self

    def observe(self, indices, logits, teacher_logits=None, *, mask=None) -> None:
        """Scores one training batch: ``indices`` ``[B]`` int64 (any device; moved to the
        bank's), ``logits`` ``[B, C]`` student logits on the bank's device,
        ``teacher_logits`` ``[B, C]`` (needed for ``measure="kl"``). A bank made with
        ``device=None`` moves to the first observed logits' device (again after
        ``load_state_dict``). The arguments are converted and checked once here, then the
        kernel runs on the bank's own accumulators.

        Sequences: with ``mask`` ``[B, L]`` (bool or 0/1, an HF ``attention_mask``),
        ``logits`` are ``[B, L, V]`` token logits and a sequence's score is the mean entropy
        of its unmasked tokens, counted once per sequence (``measure="entropy"``; the
        ``"random"`` measure counts the sequences)."""
        if mask is not None:
            self._observe_sequences(indices, logits, teacher_logits, mask)
            return
        if self.measure is Measure.KL:
            if teacher_logits is None:
                raise ValueError(
                    "measure 'kl' needs teacher_logits, got None: call observe(indices, student_logits, teacher_logits)"
                )
            lg, te = ops.student_teacher_args(logits, teacher_logits)
        else:
            if teacher_logits is not None:
                self._unused_teacher()
            if getattr(logits, "ndim", 2) == 3:
                raise ValueError(
                    f"logits have shape {tuple(logits.shape)}: [B, L, V] token logits need mask=[B, L] (1 for each "
                    "token that counts, e.g. the attention mask; all ones if every token does)"
                )
            lg, te = ops.logits_arg(logits, "logits"), None
        idx = ops.indices_arg(indices, lg.shape[0], "student_logits" if te is not None else "logits")
        self._check_classes(lg, "student_logits" if te is not None else "logits")
        self._place(lg.device)
        self._follow_stream()
        if te is not None and te.device != lg.device:
            raise ValueError(
                f"teacher_logits is on {te.device} but student_logits is on {lg.device}; pass them on one device"
            )
        idx = self._on_device(idx)
        sums, counts = self._targets()
        self.last_rows = int(lg.shape[0])  # rows of the last accepted batch (KCDLoader counts them)
        if self.measure is Measure.RANDOM:
            self._count_only(idx, lg, counts)
            self.classes = int(lg.shape[-1])
            return
        ops.launch_observe(
            self.device,
            lg.detach(),
            None if te is None else te.detach(),
            idx,
            sums,
            counts,
            self.temperature,
            self._errors,
            self.strict,
        )
        self.classes = int(lg.shape[-1])  # accepted: later observes must match it

    def _observe_sequences(self, indices, logits, teacher_logits, mask) -> None:
        if self.measure is Measure.KL:
            raise ValueError(
                "measure 'kl' scores [B, C] rows and takes no mask; for sequences use measure 'entropy' (the mean "
                "token entropy under the mask), or compute a per-sequence score and call observe_scores"
            )
        if teacher_logits is not None:
            self._unused_teacher()
        lg = ops.sequence_logits_arg(logits)
        idx = ops.indices_arg(indices, lg.shape[0], "logits")
        self._check_classes(lg, "logits")
        self._place(lg.device)
        self._follow_stream()
        idx = self._on_device(idx)
        sums, counts = self._targets()
        if self.measure is Measure.RANDOM:  # counts the sequences; the mask is checked all the same
            ops.mask_arg(mask, idx, lg.shape[0], lg.shape[1], lg.device, True)
            self._count_only(idx, lg.detach().flatten(1), counts)
        else:
            ops.launch_observe_seq(self.device, lg.detach(), mask, idx, sums, counts, self._errors, self.strict)
        self.last_rows = int(lg.shape[0])
        self.classes = int(lg.shape[-1])

    def _check_classes(self, logits: torch.Tensor, name: str) -> None:
        """The number of logit columns is fixed by the first observe: a batch with another
        count (a head that changed, logits sliced by mistake) is refused before anything
        changes, since its entropies are on another scale (ln C bounds them)."""
        c = int(logits.shape[-1])
        if self.classes is not None and c != self.classes:
            raise ValueError(
                f"{name} have {c} columns (shape {tuple(logits.shape)}) but the first observed logits had "
                f"{self.classes}: every observe must score the same classes (values over different class counts "
                "are not comparable)"
            )

    def observe_scores(self, indices, scores) -> None:
        """Records a score per sample that the caller computed (a detection loss, any
        measure; higher = more valuable): ``S_i += score``, ``n_i += 1``. ``indices`` ``[B]``
        int64, ``scores`` ``[B]`` real numbers (converted to float64) on the bank's device
        (a bank made with ``device=None`` follows them). Non-finite scores and bad indices
        raise before anything changes (on CUDA without ``strict``: at the next ``check``).
        Do not mix with ``observe`` in one run: the values would mix two scales."""
        sc = ops.scores_arg(scores)
        idx = ops.indices_arg(indices, sc.shape[0], "scores")
        self._place(sc.device)
        self._follow_stream()
        idx = self._on_device(idx)
        sums, counts = self._targets()
        if self.measure is Measure.RANDOM:
            self._count_only(idx, sc[:, None], counts)
        else:
            ops.launch_observe_scores(self.device, sc, idx, sums, counts, self._errors, self.strict)
        self.last_rows = int(sc.shape[0])

    def _follow_stream(self) -> None:
        """CUDA: the bank's accumulators were last written on the stream recorded here; work
        on another current stream (a side stream, another thread's) first waits for it (an
        event, no host sync), then becomes the recorded one. So observing on stream A and
        reading values, checking or saving on stream B never sees stale sums, and B's
        ``check()`` cannot zero the error counters under A's atomics. One bank is used from one
        host thread at a time (two threads observing at once on two streams can race)."""
        if self.sums is None or self.sums.device.type != "cuda":
            return
        current = torch.cuda.current_stream(self.sums.device)
        last = self._stream
        if last is not None and last != current and not torch.cuda.is_current_stream_capturing():
            current.wait_stream(last)  # (inside a CUDA graph capture the graph's own order holds)
        self._stream = current

    def _place(self, device: torch.device) -> None:
        """Moves a ``device=None`` bank to the first observed data's device; ``ValueError``
        when the data are elsewhere than the bank."""
        if not self._placed and self.device != device:
            self.to(device)
        self._placed = True
        if device != self.device:
            raise ValueError(
                f"logits are on {device} but the value bank is on {self.device}; "
                "create the bank with device=None to follow the logits"
            )

    def _on_device(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if idx.device == self.device else idx.to(self.device, non_blocking=True)

    def _targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The accumulators observations go to: this rank's local ones under DDP."""
        return (self.local_sums, self.local_counts) if self.local else (self.sums, self.counts)

    def _unused_teacher(self) -> None:
        """Teacher logits given to a measure that does not read them: an error with
        ``strict``, else a warning (once per bank)."""
        msg = (
            f"teacher_logits were passed to observe, but measure {self.measure.value!r} does not use them (only "
            "'kl' does); pass value='kl' to score by KL(teacher || student), or drop the argument"
        )
        if self.strict:
            raise ValueError(msg)
        if not self._warned_teacher:
            self._warned_teacher = True
            warnings.warn(msg, stacklevel=3)

    def _count_only(self, idx: torch.Tensor, lg: torch.Tensor, counts: torch.Tensor) -> None:
        """``measure="random"``: only counts observations (checked arguments on the bank's
        device), with the same input rules as the scoring ops (bad rows raise on CPU or
        with ``strict``; on CUDA they are skipped and counted without a host sync)."""
        if idx.numel() == 0:
            return
        if self._errors is None or self.strict:
            ops.strict_check(idx, self.n, [("logits", lg)])
        valid = (idx >= 0) & (idx < self.n)
        finite = torch.isfinite(lg.detach()).all(dim=1)
        if self._errors is not None:
            self._errors[0] += (~valid).sum()
            self._errors[1] += (valid & ~finite).sum()
        counts.index_add_(0, idx.clamp(0, self.n - 1), (valid & finite).to(torch.int32))

    def check(self) -> None:
        """Raises (and clears) rows the CUDA kernels skipped since the last check.
        A host synchronisation; free on CPU, where bad batches raise at once."""
        if self._errors is None:
            return
        self._follow_stream()
        bad_index, non_finite = (int(v) for v in self._errors.tolist())
        if bad_index or non_finite:
            self._errors.zero_()
            self._raise_errors(bad_index, non_finite)

    def _raise_errors(self, bad_index: int, non_finite: int) -> None:
        if bad_index or non_finite:
            raise ValueError(
                f"{bad_index} observed row(s) had an index outside [0, {self.n}) and {non_finite} row(s) had "
                "non-finite logits or scores (a KL that overflows and a score beyond +-1e298 included); they were "
                "skipped (nothing else changed)"
            )

    def _reduce_local(self, group: Any, in_place: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Collective: ``(Σ_ranks local_sums, Σ_ranks local_counts, bad indices, non-finite
        rows)``; reduced in the local accumulators themselves when ``in_place``. The CUDA
        error counters are reduced with them, so every rank raises together."""
        if not self.local:
            raise ValueError(
                "this bank was made with local=False: its sums already hold every observation; "
                "make it with ValueBank(..., local=True) to all-reduce across ranks"
            )
        if self.sums is None:
            self._allocate(D.comm_device(group, None))
        self._follow_stream()
        sums = self.local_sums if in_place else self.local_sums.clone()
        counts = self.local_counts if in_place else self.local_counts.clone()
        errors = torch.zeros(2, dtype=torch.int64, device=self.device) if self._errors is None else self._errors.clone()
        D.all_reduce_sum_([sums, counts, errors], group)
        bad_index, non_finite = (int(v) for v in errors.tolist())
        if self._errors is not None:
            self._errors.zero_()
        return sums, counts, bad_index, non_finite

    def all_reduce_(self, group: Any = None) -> None:
        """Collective over ``group`` (None: the default process group; call it on every
        rank): adds every rank's ``local_sums`` / ``local_counts`` to ``sums`` / ``counts``
        and zeroes them. Afterwards every rank holds the same global totals (the reduced
        tensor is the same bits on every rank), each observation counted exactly once.
        Communicates ``N * (8 + 4)`` bytes (plus 16). Rows the CUDA kernels skipped on any
        rank raise ``ValueError`` on every rank (the good rows are folded in first)."""
        sums, counts, bad_index, non_finite = self._reduce_local(group, in_place=True)
        self.sums.add_(sums)
        self.counts.add_(counts)
        sums.zero_()
        counts.zero_()
        self._raise_errors(bad_index, non_finite)

    def values(self, draw: int | None = None) -> torch.Tensor:
        """``[N]`` float64 values on the bank's device (+inf for unobserved points); with
        ``local=True``, of the totals as of the last :meth:`all_reduce_`.

        ``measure="random"`` draws uniform values from ``(seed, draw)``; ``draw=None`` takes
        the bank's own counter and advances it. KCDLoader passes the condensation's epoch,
        so looking at the values in between changes nothing it does."""
        if draw is not None and not (isinstance(draw, (int, np.integer)) and not isinstance(draw, bool) and draw >= 0):
            raise ValueError(f"draw must be an int >= 0 or None, got {draw!r}")
        if self.sums is None:
            self._allocate(torch.device("cpu"))
        self.check()
        if self.measure is Measure.RANDOM:
            if draw is None:
                draw = self._random_draws
                self._random_draws += 1
            rng = np.random.default_rng([self.seed, int(draw)])
            return torch.from_numpy(rng.random(self.n)).to(self.device)
        self._follow_stream()
        return ops.values(self.sums, self.counts, self.period, self.alpha)

    def state_dict(self, group: Any = None) -> dict[str, Any]:
        """Everything that changes during training, as CPU tensors. With ``local=True`` a
        collective over ``group`` (call it on every rank): ``sums`` / ``counts`` are the
        global totals including every rank's observations since the last ``all_reduce_``,
        the same on every rank; the bank itself does not change. ``group`` is unused
        otherwise."""
        if self.local:
            red_sums, red_counts, bad_index, non_finite = self._reduce_local(group, in_place=False)
            self._raise_errors(bad_index, non_finite)
            total_sums = (self.sums + red_sums).detach().to("cpu")
            total_counts = (self.counts + red_counts).detach().to("cpu")
        else:
            self.check()
            # copies: a kept state must not follow later observations
            total_sums = None if self.sums is None else self.sums.detach().to("cpu", copy=True)
            total_counts = None if self.counts is None else self.counts.detach().to("cpu", copy=True)
        return {
            "n": self.n,
            "period": self.period,
            "alpha": self.alpha,
            "measure": self.measure.value,
            "temperature": self.temperature,
            "seed": self.seed,
            "random_draws": self._random_draws,
            "classes": self.classes,
            "sums": total_sums,
            "counts": total_counts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict``; the accumulators stay on this bank's device. With
        ``local=True`` the state's (global) totals become ``sums`` / ``counts`` and the
        local accumulators are zeroed: load the same state on every rank."""
        required = ("n", "sums", "counts", "random_draws")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"value bank state is missing {missing}")
        if state["n"] != self.n:
            raise ValueError(f"value bank state holds {state['n']} points but this bank has {self.n}")
        for key in ("measure", "period", "alpha"):
            mine = getattr(self, key).value if key == "measure" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"value bank state has {key} = {state[key]!r} but this bank has {mine!r}")
        sums, counts = state["sums"], state["counts"]
        # validate everything first: a malformed state changes nothing
        if (sums is None) != (counts is None):
            raise ValueError("value bank state: sums and counts must both be tensors or both be None")
        if sums is not None and not (
            isinstance(sums, torch.Tensor)
            and isinstance(counts, torch.Tensor)
            and sums.shape == (self.n,)
            and sums.dtype == torch.float64
            and counts.shape == (self.n,)
            and counts.dtype == torch.int32
        ):
            raise ValueError("value bank state: sums must be float64 [n] and counts int32 [n]")
        draws, seed = state["random_draws"], state.get("seed", self.seed)
        classes = state.get("classes")  # absent in states written before it was recorded
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1
        ):
            raise ValueError(f"value bank state: classes must be None or an int >= 1, got {classes!r}")
        for name, v in (("random_draws", draws), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"value bank state: {name} must be an int >= 0, got {v!r}")
        if sums is not None:
            if self.sums is None:
                self._allocate(torch.device("cpu"))
            self._follow_stream()  # CUDA: after the observes still queued on the bank's stream
            self.sums.copy_(sums)
            self.counts.copy_(counts)
        elif self.sums is not None:  # a state made before any observation: nothing observed
            self._follow_stream()
            self.sums.zero_()
            self.counts.zero_()
        if self.local_sums is not None:
            self.local_sums.zero_()
            self.local_counts.zero_()
        self._random_draws = int(draws)
        self.classes = None if classes is None else int(classes)
        self.seed = int(seed)  # the run's seed: "random" values continue the same stream
        self._placed = not self._follow

    def __repr__(self) -> str:
        local = ", local=True" if self.local else ""
        return f"ValueBank(n={self.n}, measure={self.measure.value!r}, device={self.device}{local})"
