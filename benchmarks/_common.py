"""Shared helpers of the benchmarks: timing (median of repeats, CUDA events on GPU) and
the machine description recorded next to every result."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def median_ms(
    fn: Callable[[], Any], repeats: int, warmup: int = 2, device: str = "cpu", setup: Callable[[], Any] | None = None
) -> float:
    """Median wall time of fn() in milliseconds; setup() runs untimed before each call."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def interleaved_median_ms(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 2,
    device: str = "cpu",
    setups: dict[str, Callable[[], Any]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall time (ms) of each fn, timed round-robin so that a burst of load on a
    shared machine slows every contender alike instead of one of them. Each round runs the
    contenders in a fresh random order (seeded), so none always runs right after the same
    one: the state a call leaves (caches flushed, a core idle, memory just returned to the
    OS) changes the next call's time. setups[name], where given, runs untimed right before
    that contender's call (e.g. to time a call right after a given other job)."""
    rng = np.random.default_rng(seed)
    setups = setups or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for k in rng.permutation(len(names)):
            name = names[int(k)]
            ms = median_ms(fns[name], 1, warmup=0, device=device, setup=setups.get(name))
            if i >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import kcd_fast

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "kcd_fast": kcd_fast.build_info(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
