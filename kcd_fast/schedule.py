"""The condensation schedule and the cost model (docs/algorithm.md section 2)."""

from __future__ import annotations

import math
from enum import unique
from typing import Any

import numpy as np

from ._checks import OptionEnum, check_int, is_finite_number, is_int


@unique
class Decay(OptionEnum):
    """How the keep fraction falls from stage to stage."""

    EXP = "exp"  # tau_s = rho ** (s / S), the paper
    LINEAR = "linear"  # tau_s = 1 - (1 - rho) * s / S
    REFERENCE = "reference"  # tau_s = 1 - (1 - rho) * (s - 1) / S, the released code


class CondensationSchedule:
    """I epochs in S = I / T stages of T epochs; stage s trains on
    ``n_s = max(1, floor(tau_s * N + 0.5))`` points.

    Stage 1 first trains ``warmup`` epochs on all N points (values are needed before the
    first condensation), then condenses; every later condensation happens before a
    stage's first epoch. Epochs are numbered from 0.

    Example: ``CondensationSchedule(epochs=240, period=40, rho=0.7)`` has 6 stages,
    ``paper_cost`` 0.8163 (the paper's 81.6%) and, with its 1-epoch warm-up,
    ``relative_cost(n)`` about 0.8166 for large n.
    """

    def __init__(self, epochs: int, period: int, rho: float = 0.7, decay: str | Decay = "exp", warmup: int = 1):
        self.epochs = check_int(epochs, "epochs", 1)
        self.period = check_int(period, "period", 1)
        epochs, period = self.epochs, self.period
        if epochs % period != 0:
            raise ValueError(f"epochs ({epochs}) must be a multiple of period ({period})")
        if (
            isinstance(rho, (bool, np.bool_))
            or not isinstance(rho, (int, float, np.integer, np.floating))
            or not (0.0 < rho <= 1.0)
        ):
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        self.rho = float(rho)
        self.decay = Decay.parse(decay)
        warmup = check_int(warmup, "warmup")
        if not 1 <= warmup <= period:
            raise ValueError(f"warmup must be in [1, period = {period}], got {warmup!r}")
        self.warmup = warmup

    # -- structure -----------------------------------------------------------------
    @property
    def stages(self) -> int:
        return self.epochs // self.period

    @property
    def keep_fractions(self) -> list[float]:
        """tau_s for s = 1..S."""
        S, rho = self.stages, self.rho
        if self.decay is Decay.EXP:
            return [rho ** (s / S) for s in range(1, S + 1)]
        if self.decay is Decay.LINEAR:
            return [1.0 - (1.0 - rho) * s / S for s in range(1, S + 1)]
        return [1.0 - (1.0 - rho) * (s - 1) / S for s in range(1, S + 1)]

    def keep_counts(self, n: int) -> list[int]:
        """n_s for s = 1..S on a set of n points."""
        n = check_int(n, "n", 1)
        return [max(1, math.floor(tau * n + 0.5)) for tau in self.keep_fractions]

    def stage_of(self, epoch: int) -> int:
        """The stage (1..S) that epoch (0-based) belongs to."""
        self._check_epoch(epoch)
        return epoch // self.period + 1

    @property
    def condensation_epochs(self) -> list[int]:
        """Epochs (0-based) that start right after a condensation."""
        first = [self.warmup] if self.warmup < self.period else []
        later = [s * self.period for s in range(1, self.stages)]
        return [e for e in first + later if e < self.epochs]

    def epoch_sizes(self, n: int) -> list[int]:
        """Points trained on in each epoch."""
        counts = self.keep_counts(n)
        first = self.condensation_epochs[0] if self.condensation_epochs else self.epochs
        return [n if e < first else counts[self.stage_of(e) - 1] for e in range(self.epochs)]

    def target_count(self, epoch: int, n: int) -> int:
        """Points trained on in ``epoch``."""
        self._check_epoch(epoch)
        return self.epoch_sizes(n)[epoch]

    # -- cost model ------------------------------------------------------------------
    def absolute_cost(self, n: int) -> int:
        """C_a: sample passes over the whole run (vanilla KD: n * epochs)."""
        return sum(self.epoch_sizes(n))

    def relative_cost(self, n: int) -> float:
        """The exact C of the integer schedule: sample passes / (n * epochs)."""
        return self.absolute_cost(n) / (n * self.epochs)

    @property
    def paper_cost(self) -> float:
        """The paper's closed form (Eq. 16), no warm-up, no rounding. For "exp":
        ``rho^(T/I) (1 - rho) / (1 - rho^(T/I)) * T / I``; for the other decays the same
        continuous quantity ``(T / I) * sum_s tau_s``."""
        q = self.rho ** (self.period / self.epochs)
        if self.decay is Decay.EXP and q < 1.0:
            return q * (1.0 - self.rho) / (1.0 - q) * self.period / self.epochs
        return self.period / self.epochs * sum(self.keep_fractions)

    def unix_computation(self, n: int) -> float:
        """UNIX's Computation (supplement Eq. 21): for KCD every pass is a full
        teacher + student step, so it equals ``relative_cost(n)``."""
        return self.relative_cost(n)

    def _check_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must be an int in [0, {self.epochs}), got {epoch!r}")

    def state(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "period": self.period,
            "rho": self.rho,
            "decay": self.decay.value,
            "warmup": self.warmup,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CondensationSchedule) and self.state() == other.state()

    def __hash__(self) -> int:
        return hash(tuple(self.state().items()))

    def __repr__(self) -> str:
        s = self.state()
        return (
            f"CondensationSchedule(epochs={s['epochs']}, period={s['period']}, rho={s['rho']}, "
            f"decay={s['decay']!r}, warmup={s['warmup']})"
        )


def unix_computation(n_t: float, n_s1: float, n_s2: float, f_t: float, f_s: float, b_s: float | None = None) -> float:
    """UNIX's computation E (supplement Eq. 17): ``N_t F_t + N_s1 F_s + N_s2 B_s``.

    n_t, n_s1, n_s2: samples through the teacher forward, student forward and student
    backward passes over the run; f_t, f_s, b_s: their FLOPs per sample (b_s defaults
    to f_s, UNIX's approximation of Eq. 19). Divide two such E for the relative
    Computation (Eq. 18).
    """
    vals = {"n_t": n_t, "n_s1": n_s1, "n_s2": n_s2, "f_t": f_t, "f_s": f_s, "b_s": f_s if b_s is None else b_s}
    for name, v in vals.items():
        if not is_finite_number(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(n_t * f_t + n_s1 * f_s + n_s2 * vals["b_s"])
