"""``python -m kcd_fast.kd``: the KD trainer's command line (:mod:`kcd_fast.kd.cli`)."""

from .cli import main

main()
