"""Alias of :mod:`kcd_fast.kd` kept for code and command lines written against kcd_fast 0.1:
``from kcd_fast.train import KDTrainer, ...`` and ``python -m kcd_fast.train`` work as before."""

from .kd import *  # noqa: F403
from .kd import __all__ as _kd_all
from .kd.cli import build_parser, main, prepare_data

__all__ = [*_kd_all, "build_parser", "main", "prepare_data"]

if __name__ == "__main__":
    main()
