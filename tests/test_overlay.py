"""The image-folder overlay's storage (kcd_fast/loader/backends/dali_overlay.py, no DALI needed):
lossless formats read back the blend exactly, JPEG within a tolerance and at about a photo's
size, the memory budget spills to a private directory that goes with the overlay, replays
give the same bytes."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kcd_fast.data.folders import load_rgb
from kcd_fast.loader.backends.dali_overlay import FolderOverlay


def _photos(root: Path, n: int = 12, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus fine texture), 60..90 x 50..80 pixels."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(50, 80, 1).tolist() + rng.integers(60, 90, 1).tolist())
        base = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        img = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        p = root / f"{i}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


LOG = [
    {
        "epoch": 1,
        "dst": torch.tensor([1, 4, 7]),
        "src": torch.tensor([9, 10, 11]),
        "eps": torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64),
    },
    {
        "epoch": 2,
        "dst": torch.tensor([9, 2]),
        "src": torch.tensor([1, 3]),
        "eps": torch.tensor([0.85, 0.7], dtype=torch.float64),
    },
]  # the second summary reads point 1, which the first summarised


def _reference(paths: list[str]) -> dict[int, np.ndarray]:
    cur: dict[int, np.ndarray] = {}
    for s in LOG:
        new = {}
        for d, r, e in zip(s["dst"].tolist(), s["src"].tolist(), s["eps"].tolist(), strict=True):
            a = cur.get(d, np.asarray(load_rgb(paths[d])))
            b = cur.get(r, np.asarray(load_rgb(paths[r])))
            if b.shape != a.shape:
                b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
            new[d] = np.clip(np.floor(e * a.astype(np.float64) + (1 - e) * b.astype(np.float64) + 0.5), 0, 255)
        cur.update({k: v.astype(np.uint8) for k, v in new.items()})
    return cur


def test_lossless_formats_read_back_the_blend_exactly(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    for fmt in ("pnm", "png"):
        ov = FolderOverlay(paths, overlay_format=fmt, num_threads=2)
        ov.sync(LOG)
        assert ov.points == sorted(want)
        for i in want:
            np.testing.assert_array_equal(ov.image(i), want[i])


def test_jpeg_is_close_to_the_blend_and_about_a_photos_size(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=2)
    ov.sync(LOG)
    for i in want:
        err = np.abs(ov.image(i).astype(int) - want[i].astype(int))
        assert err.mean() < 2.0 and err.max() <= 40, (i, err.mean(), err.max())
    src_bytes = np.mean([os.path.getsize(paths[i]) for i in want])
    per_point = ov.nbytes / len(want)
    assert per_point <= 2.5 * src_bytes  # about the size of the photos they replace (PPM: ~7x)
    again = FolderOverlay(paths, overlay_format="jpeg")
    again.sync(LOG)  # a replay (resume) gives the same bytes: the encoder is deterministic
    assert all(np.array_equal(again.entries[i], ov.entries[i]) for i in want)


def test_memory_budget_spills_to_a_private_directory_that_goes_with_the_overlay(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    ov = FolderOverlay(paths, overlay_format="pnm", budget=30_000)
    ov.sync(LOG)
    assert ov.memory_bytes <= 30_000 and ov.directory is not None
    files = os.listdir(ov.directory)
    assert files and ov.nbytes == ov.memory_bytes + sum(os.path.getsize(os.path.join(ov.directory, f)) for f in files)
    for i in want:
        np.testing.assert_array_equal(ov.image(i), want[i])  # the same pixels, in memory or in a file
    folder = ov.directory
    del ov
    gc.collect()
    assert not os.path.exists(folder)  # owned and removed
    with pytest.raises(ValueError, match="budget must be an int >= 0"):
        FolderOverlay(paths, budget=-1)
    with pytest.raises(ValueError, match="overlay_format must be 'pnm', 'png' or 'jpeg', got 'webp'"):
        FolderOverlay(paths, overlay_format="webp")


def test_scale_benchmark_reports_bytes_rates_and_the_imagenet_extrapolation(tmp_path: Path) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    out = tmp_path / "scale.json"
    r = scale.main(["--k", "30", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["k"] == 30 and set(data["formats"]) == {"jpeg", "pnm"}
    for f in data["formats"].values():
        assert f["summarised_points"] > 0 and f["bytes_per_point"] > 0 and f["pairs_per_s_per_core"] > 0
    # lossless PPM is several times the JPEG it replaces; the JPEG overlay is not
    assert (
        data["formats"]["pnm"]["bytes_per_point_over_source_jpeg"]
        > 2 * data["formats"]["jpeg"]["bytes_per_point_over_source_jpeg"]
    )
    e = r["imagenet_extrapolation"]
    assert e["summarised_points_at_most"] == sum(e["pairs_per_condensation"]) > 0
