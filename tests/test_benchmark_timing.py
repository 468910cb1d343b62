"""The benchmarks' helpers: contenders interleaved in a random order with setups untimed, and
the numpy baseline the condense benchmark times against."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_modules import load_benchmark

import kcd_fast

interleaved_median_ms = load_benchmark("_common").interleaved_median_ms
numpy_select = load_benchmark("kernels").numpy_select


def test_no_contender_always_follows_the_same_one_and_setups_run_right_before() -> None:
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    setups = {"b": lambda: calls.append("setup-b")}
    ms = interleaved_median_ms(fns, repeats=60, warmup=0, setups=setups, seed=3)
    assert set(ms) == set("abcd") and all(t >= 0.0 for t in ms.values())
    runs = [c for c in calls if not c.startswith("setup")]
    assert sorted(runs) == sorted(list("abcd") * 60)
    for i, c in enumerate(calls):  # each setup is immediately followed by its contender
        if c == "setup-b":
            assert calls[i + 1] == "b"
    for name in "abcd":  # rounds that only rotate give each contender one predecessor 3 times in 4
        before = [runs[i - 1] for i in range(1, len(runs)) if runs[i] == name]
        top = max(before.count(p) for p in set(before))
        assert top / len(before) < 0.6, (name, before)


def test_order_is_reproducible_from_the_seed() -> None:
    def order(seed: int) -> list[str]:
        calls: list[str] = []
        interleaved_median_ms({n: (lambda n=n: calls.append(n)) for n in "abcde"}, 5, warmup=0, seed=seed)
        return calls

    assert order(1) == order(1) and order(1) != order(2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_numpy_select_baseline_is_condense(seed: int, n: int) -> None:
    """The numpy baseline of benchmarks/kernels.py returns condense's keep / dropped / dst
    (ties included), so its timing is a like-for-like comparison."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 5, n).astype(np.float64)  # many ties
    values[rng.random(n) < 0.1] = np.inf
    for n_prev in sorted({n, max(1, n - n // 3)}):
        for n_keep in sorted({1, n_prev // 2 or 1, n_prev}):
            got = numpy_select(values, n_keep, n_prev)
            want = kcd_fast.condense(torch.from_numpy(values), n_keep, n_prev)
            for name in ("keep", "dropped", "dst"):
                assert np.array_equal(got[name], getattr(want, name).numpy()), (name, n_keep, n_prev)
