"""The KD command line as a user meets it (``python -m kcd_fast.kd``): argument errors are one
argparse line and exit code 2, progress is plain lines when stderr is a pipe, teachers are cached
in the user's cache folder and never in the current one, numbers are formatted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kcd_fast.kd.teacher import default_cache_dir

TINY = ["--data", "digits", "--epochs", "2", "--period", "1", "--teacher-epochs", "1", "--batch-size", "256"]


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("KCD_FAST_CACHE_DIR", "XDG_CACHE_HOME")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "kcd_fast.kd", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "10", "--period", "4"], r"--epochs/--period/--rho/--decay/--warmup: .*multiple of"),
        (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
        (["--num-workers", "-1"], r"--num-workers must be >= 0, got -1"),
        (["--data", "no/such/file.npz"], r"--data 'no/such/file.npz': "),
        (["--data", "digits", "--teacher", "resnet9000"], r"--teacher 'resnet9000': "),
        (["--rho", "1.5"], r"--epochs/--period/--rho/--decay/--warmup: .*rho"),
        (["--mode", "fast"], r"argument --mode: invalid choice: 'fast'"),
        (["--data", "digits", "--lr", "-1"], r"--lr: lr must be a finite number > 0, got -1.0"),
        (["--data", "digits", "--momentum", "2"], r"--momentum: momentum must be in \[0, 1\), got 2.0"),
        (["--data", "digits", "--cache-dir", "/proc/no-such-dir"], r"--cache-dir '/proc/no-such-dir' cannot hold"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = run_cli(args, tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), r.stderr
    assert r.stderr.startswith("usage: python -m kcd_fast.kd [options]") and len(r.stderr.splitlines()) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_a_run_caches_its_teacher_in_the_user_cache_and_logs_lines(tmp_path: Path) -> None:
    work, cache = tmp_path / "work", tmp_path / "xdg"
    work.mkdir()
    r = run_cli([*TINY, "--mode", "both"], work, XDG_CACHE_HOME=str(cache))
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == []  # nothing in the current folder (no ./benchmarks/cache)
    cached = list((cache / "kcd_fast").glob("teacher-*.pt"))
    assert len(cached) == 1, list(cache.rglob("*"))
    # stderr is a pipe: no progress bars (no carriage returns), a plain line per epoch
    assert "\r" not in r.stderr and "it/s" not in r.stderr
    assert re.search(r"^teacher mlp_t: trained in \d+\.\d s, accuracy \d+\.\d\d%$", r.stderr, re.M)
    assert re.search(r"^teacher mlp_t epoch 1/1: 1347 samples in \d+\.\d s, loss \d+\.\d{4}$", r.stderr, re.M)
    assert re.search(r"^kcd epoch 1/2: \d+ samples in \d+\.\d s, loss \d+\.\d{4}, ~\d+ s left$", r.stderr, re.M)
    # numbers formatted: accuracies as percentages with two decimals
    for mode in ("kd", "kcd"):
        assert re.search(
            rf"^ *{mode}: \d+ samples in \d+\.\d\d s, accuracy \d+\.\d\d% \(teacher \d+\.\d\d%\)$", r.stdout, re.M
        )
    # the second run finds the teacher there; KCD_FAST_CACHE_DIR overrides the folder
    again = run_cli([*TINY, "--mode", "kd"], work, XDG_CACHE_HOME=str(cache))
    assert again.returncode == 0 and "training for" not in again.stderr, again.stderr
    own = tmp_path / "own"
    r3 = run_cli([*TINY, "--mode", "kd"], work, XDG_CACHE_HOME=str(cache), KCD_FAST_CACHE_DIR=str(own))
    assert r3.returncode == 0 and len(list(own.glob("teacher-*.pt"))) == 1, r3.stderr
    assert list(work.iterdir()) == []


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KCD_FAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "kcd_fast"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert default_cache_dir() == Path.home() / ".cache" / "kcd_fast"
    monkeypatch.setenv("KCD_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
