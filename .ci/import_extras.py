"""CI: every extra's top-level packages import next to kcd_fast, with the folders the tests and
scripts put on sys.path in front, and none of them resolves to a file of this repository.

A module of ours that shadows an installed package (benchmarks/kernels.py shadowed PyPI's
``kernels``, which transformers imports) shows up here at once, naming both.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# what pytest (rootdir-relative tests/) and the example scripts put in front of sys.path
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

import kcd_fast  # noqa: E402


def top_level_modules(dist_name: str) -> list[str]:
    dist = md.distribution(dist_name)
    names = {n for n in (dist.read_text("top_level.txt") or "").split() if n}
    if not names:  # wheels without top_level.txt: the first part of each file's path
        for f in dist.files or []:
            head = f.parts[0]
            if head.endswith((".dist-info", ".data")) or head in ("..", "__pycache__") or head.startswith("_"):
                continue
            names.add(head.removesuffix(".py") if head.endswith(".py") else head)
    return sorted(n for n in names if n.isidentifier() and not n.startswith("_"))


def main() -> int:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    failures: list[str] = []
    seen: set[str] = set()
    for extra, reqs in extras.items():
        for req in reqs:
            dist_name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
            try:
                modules = top_level_modules(dist_name)
            except md.PackageNotFoundError:
                failures.append(f"[{extra}] {dist_name}: not installed")
                continue
            for mod in modules:
                if mod in seen:
                    continue
                seen.add(mod)
                try:
                    m = importlib.import_module(mod)
                except ModuleNotFoundError as err:
                    if err.name and err.name != mod and importlib.util.find_spec(err.name.partition(".")[0]) is None:
                        # a tool script of the distribution that needs a package nobody installs (DALI's rec2idx: mxnet)
                        print(f"[{extra}] {dist_name}: {mod} skipped (needs {err.name}, not installed)")
                        continue
                    failures.append(f"[{extra}] import {mod} ({dist_name}): {type(err).__name__}: {err}")
                    continue
                except Exception as err:  # noqa: BLE001 - report every failure, then fail
                    failures.append(f"[{extra}] import {mod} ({dist_name}): {type(err).__name__}: {err}")
                    continue
                where = Path(getattr(m, "__file__", None) or sys.prefix).resolve()
                if where.is_relative_to(ROOT) and not where.is_relative_to(Path(sys.prefix).resolve()):
                    failures.append(f"[{extra}] {mod} resolves to {where}, a file of this repository")
                    continue
                print(f"[{extra}] {dist_name}: import {mod} ok")
    print(f"kcd_fast {kcd_fast.__version__} from {kcd_fast.__file__}")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
