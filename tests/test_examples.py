"""Every script in examples/ runs end to end in its --tiny mode (as a user would start it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kcd_fast import CondensationSchedule

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
TINY = CondensationSchedule(epochs=4, period=2, rho=0.7)  # what every --tiny run uses


def _run(args: list[str], timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _says_it_is_a_smoke_run(stdout: str) -> None:
    """A --tiny run says, first and last, that its accuracies mean nothing."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    note = "--tiny: a smoke run"
    assert lines[0].startswith(note) or lines[1].startswith(note), stdout[:500]
    assert lines[-1].startswith(note) and "accuracies mean nothing" in lines[-1], stdout[-500:]


def _condensations(stdout: str, n: int) -> None:
    expected = [(e, TINY.epoch_sizes(n)[e]) for e in TINY.condensation_epochs]
    assert f"condensations: {expected}" in stdout, stdout[-1500:]


@pytest.mark.parametrize("script", ["cifar_kd.py", "custom_loader.py"])
def test_image_loop_examples(script: str) -> None:
    out = _run([sys.executable, str(EXAMPLES / script), "--tiny"])
    _condensations(out, 400)
    _says_it_is_a_smoke_run(out)
    points = [int(m) for m in re.findall(r"epoch \d+: (?:trained on )?(\d+)", out)]
    assert points == TINY.epoch_sizes(400)


def test_lightning_example() -> None:
    pytest.importorskip("lightning")
    out = _run([sys.executable, str(EXAMPLES / "lightning_kd.py"), "--tiny"])
    _condensations(out, 400)
    steps, total = re.search(r"steps (\d+) \(loader.total_steps\(\) = (\d+)\)", out).groups()
    assert steps == total
    _says_it_is_a_smoke_run(out)


def test_hf_example() -> None:
    pytest.importorskip("transformers")
    out = _run([sys.executable, str(EXAMPLES / "hf_text_kd.py"), "--tiny"])
    _condensations(out, 200)
    _says_it_is_a_smoke_run(out)


@pytest.mark.parametrize(
    "script, missing, extra",
    [
        ("lightning_kd.py", "lightning", "lightning"),
        ("hf_text_kd.py", "transformers", "hf"),
        ("accelerate_kd.py", "accelerate", "accelerate"),
        ("torchdistill_kd.py", "torchdistill", "torchdistill"),
    ],
)
def test_an_example_without_its_extra_names_the_install_command(tmp_path: Path, script, missing, extra) -> None:
    """With the package absent (a stub first on the path raises what a missing package raises),
    the example exits with one message naming the extra to install, no traceback."""
    (tmp_path / f"{missing}.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {missing!r}'!r}, name={missing!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert f"{script} needs {missing}, which is not installed here" in r.stderr
    assert f'pip install -e ".[{extra}]"' in r.stderr


@pytest.mark.slow
def test_ddp_torchrun_example() -> None:
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "ddp_torchrun.py"),
            "--tiny",
        ]
    )
    _condensations(out, 400)
    # every rank trains its shard: ceil(n_e / 2) per rank, padded points counted twice
    points = [int(m) for m in re.findall(r"epoch \d+: (\d+) points over 2 ranks", out)]
    assert points == [2 * -(-n // 2) for n in TINY.epoch_sizes(400)]


def _points_over(out: str, world: int) -> list[int]:
    return [int(m) for m in re.findall(rf"epoch \d+: (\d+) points over {world} process", out)]


def test_accelerate_example() -> None:
    pytest.importorskip("accelerate")
    out = _run([sys.executable, str(EXAMPLES / "accelerate_kd.py"), "--tiny"])
    _condensations(out, 400)
    assert _points_over(out, 1) == TINY.epoch_sizes(400)
    _says_it_is_a_smoke_run(out)


@pytest.mark.slow
def test_accelerate_example_two_processes() -> None:
    pytest.importorskip("accelerate")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = _run([*torchrun, str(EXAMPLES / "accelerate_kd.py"), "--tiny"])
    _condensations(out, 400)
    assert _points_over(out, 2) == [2 * -(-n // 2) for n in TINY.epoch_sizes(400)]  # ceil(n_e / 2) per process


def _trained(out: str, world: int) -> list[int]:
    return [int(m) for m in re.findall(rf"epoch \d+: trained (\d+) points over {world} rank", out)]


DIGITS_TRAIN, TD_SCHEDULE = 1347, CondensationSchedule(epochs=6, period=2, rho=0.7)  # examples/torchdistill_kd.yaml


def test_torchdistill_example() -> None:
    pytest.importorskip("kcd_fast.integrations.torchdistill", exc_type=ImportError)
    out = _run([sys.executable, str(EXAMPLES / "torchdistill_kd.py"), "--tiny"])
    assert _trained(out, 1) == TD_SCHEDULE.epoch_sizes(DIGITS_TRAIN)
    assert f"schedule: {TD_SCHEDULE.epoch_sizes(DIGITS_TRAIN)}" in out
    _says_it_is_a_smoke_run(out)


@pytest.mark.slow
def test_torchdistill_example_two_ranks() -> None:
    pytest.importorskip("kcd_fast.integrations.torchdistill", exc_type=ImportError)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = _run([*torchrun, str(EXAMPLES / "torchdistill_kd.py"), "--tiny"])
    assert _trained(out, 2) == [2 * -(-n // 2) for n in TD_SCHEDULE.epoch_sizes(DIGITS_TRAIN)]  # ceil(n_e / 2) per rank
