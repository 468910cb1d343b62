"""Correctness at the edges (issue: CUDA and in-place correctness), the CPU side: read-only
in-place arguments refused, extreme but finite logits scored at their true value, the CUDA
variants switch forgiving typos, and which GPUs the CUDA module can run on. The GPU side of
the same checks is in tests/test_cuda.py (needs_cuda)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import _reference as R
from kcd_fast import ops
from kcd_fast._ext import runs_on


@pytest.mark.parametrize("which", ["sums", "counts"])
def test_read_only_accumulators_are_refused_and_nothing_changes(which: str) -> None:
    sums, counts = np.zeros(4), np.zeros(4, dtype=np.int32)
    {"sums": sums, "counts": counts}[which].setflags(write=False)
    with pytest.raises(ValueError, match=f"{which} is a read-only numpy array, but the op updates it in place"):
        ops.observe_entropy(np.ones((2, 3), np.float32), np.array([0, 1]), sums, counts)
    assert not sums.any() and not counts.any()
    with pytest.raises(ValueError, match=f"{which} is a read-only numpy array"):
        ops.observe_scores(np.ones(2), np.array([0, 1]), sums, counts)


def test_read_only_images_are_refused_and_read_only_inputs_are_fine() -> None:
    images = np.arange(4 * 3, dtype=np.uint8).reshape(4, 3)
    images.setflags(write=False)
    with pytest.raises(ValueError, match="images is a read-only numpy array"):
        ops.blend_(images, np.array([0]), np.array([1]), np.array([0.5]))
    logits = np.ones((2, 3), np.float32)
    logits.setflags(write=False)  # only read: copied, scored
    sums, counts = np.zeros(4), np.zeros(4, dtype=np.int32)
    ops.observe_entropy(logits, np.array([0, 3]), sums, counts)
    assert counts.tolist() == [1, 0, 0, 1] and sums[0] == pytest.approx(np.log(3))


@pytest.mark.parametrize(
    "row",
    [[3e38, -3e38], [1e37, -1e37], [-3e38, 3e38, 0.0], [3.4e38, 3.4e38], [1e30, 0.0, -1e30, 5.0]],
)
def test_extreme_finite_logits_score_their_true_entropy(row: list[float]) -> None:
    logits = torch.tensor([row], dtype=torch.float32)
    sums, counts = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32)
    ops.observe_entropy(logits, torch.tensor([0]), sums, counts)
    want = R.entropy(logits.numpy())[0]  # float64: the extreme terms vanish
    assert counts.item() == 1 and sums.item() == pytest.approx(want, abs=1e-6)
    seq_s, seq_c = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32)
    ops.observe_entropy_seq(logits[:, None, :], torch.ones(1, 1), torch.tensor([0]), seq_s, seq_c)
    assert seq_s.item() == pytest.approx(want, abs=1e-6)


def test_extreme_kl_rows_are_finite_or_refused_never_nan() -> None:
    s = torch.tensor([[3e38, -3e38], [1.0, 2.0]], dtype=torch.float32)
    t = torch.tensor([[-3e38, 3e38], [2.0, 1.0]], dtype=torch.float32)
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int32)
    try:
        ops.observe_kl(s, t, torch.tensor([0, 1]), sums, counts, temperature=1.0)
    except ValueError as err:  # an infinite KL is refused as a non-finite row, before anything changes
        assert "non-finite" in str(err) and not counts.any()
    else:
        assert bool(torch.isfinite(sums).all()) and counts.tolist() == [1, 1]


def test_runs_on_machine_code_of_the_same_major_or_older_ptx() -> None:
    info = kcd_fast.build_info()
    if not info["cuda_compiled"]:
        pytest.skip("built without CUDA")
    assert 75 in info["cuda_native_archs"]  # T4 / RTX 20xx
    assert runs_on((7, 5)) and runs_on((8, 0)) and runs_on((8, 6)) and runs_on((9, 0)) and runs_on((12, 0))
    assert not runs_on((7, 0)) and not runs_on((6, 1))


def test_a_typo_in_the_variants_switch_warns_and_keeps_the_defaults() -> None:
    if not kcd_fast.build_info()["cuda_compiled"]:
        pytest.skip("built without CUDA")
    code = "import warnings, kcd_fast; print('imported')"
    env = {**os.environ, "KCD_FAST_CUDA_VARIANTS": "entropy_batch=3", "PYTHONWARNINGS": "always"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr
    assert "KCD_FAST_CUDA_VARIANTS='entropy_batch=3' ignored" in out.stderr
