"""Markers: needs_cuda (compiled CUDA module + a device) and needs_dali (NVIDIA DALI
importable) skip cleanly where the machine lacks them."""

from __future__ import annotations

import importlib.util

import pytest

import kcd_fast

# benchmarks/ is never put on sys.path (its scripts' names, kernels.py among them, would shadow
# installed packages): tests load a script with bench_modules.load_benchmark(name).


def _has_dali() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and kcd_fast built with CUDA")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
    cuda, dali = kcd_fast.has_cuda(), _has_dali()
    for item in items:
        if "needs_cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)
        if "needs_dali" in item.keywords and not dali:
            item.add_marker(skip_dali)
