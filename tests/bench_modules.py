"""The benchmark scripts as modules for the tests.

Each ``benchmarks/<name>.py`` is loaded by path under the name ``kcd_bench_<name>``, with
``benchmarks/`` on ``sys.path`` only while the script's top level runs (it imports its siblings
``_common`` and ``fileopens`` by plain name, as it does when run as a script). ``benchmarks/`` is
never left on ``sys.path``: a script such as ``kernels.py`` must not shadow an installed package of
the same name (transformers imports the ``kernels`` package from PyPI when it is there).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PREFIX = "kcd_bench_"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``kcd_bench_<name>`` (loaded once per process)."""
    key = PREFIX + name
    if key in sys.modules:
        return sys.modules[key]
    path = BENCH / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark script {path}")
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses look their module up while the top level runs
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(key, None)
        raise
    finally:
        while str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))
    return mod
