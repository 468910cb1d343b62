"""The benchmarks' timing helper: contenders interleaved in a random order, setups untimed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import interleaved_median_ms  # noqa: E402


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
