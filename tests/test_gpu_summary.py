"""benchmarks/gpu_summary.py: the GPU check's outputs (in the formats benchmarks/kernels.py,
loader.py, throughput.py, pytest's JUnit XML and nvidia-smi write) become summary.json's fields;
a missing output leaves its fields null and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_summary():
    return load_benchmark("gpu_summary")


def _write(out: Path) -> None:
    (out / "env.txt").write_text(
        "name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.159.04, 143771 MiB\nBuild cuda_13.0\n"
    )
    (out / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="120" failures="1" errors="1" '
        'skipped="8"></testsuite></testsuites>'
    )
    kernels = {
        "observe_entropy": {"ours_GBps": 3500.0, "fraction_of_copy_bw": 0.83},
        "blend": {"ours_GBps": 3400.0, "fraction_of_copy_bw": 0.81},
        "condense": {"n": 1281167, "first_ms": 0.12, "torch_argsort_ms": 0.26},
        "copy_GBps": 4200.0,
    }
    (out / "kernels_cuda.json").write_text(json.dumps(kernels))
    (out / "tensor_feed.json").write_text(json.dumps({"tensor_feed_img_per_s": 1.5e6}))
    loader = {
        "results": [
            {"num_workers": 4, "full_keep": {"dali_images_per_s": 9e3, "dataloader_pil_images_per_s": 3e3, "ratio": 3}},
            {
                "num_workers": 16,
                "full_keep": {"dali_images_per_s": 3e4, "dataloader_pil_images_per_s": 5e3, "ratio": 6},
            },
        ]
    }
    (out / "loader_jpeg_gpu.json").write_text(json.dumps(loader))
    job = {
        "config": {"backend": "tensor"},
        "measured_ratio": 0.83,
        "theoretical_C": 0.821,
        "goal_within_0.02": True,
        "vanilla": {"seconds": 100.0, "accuracy": 91.0},
        "kcd": {"seconds": 83.0, "accuracy": 91.2},
    }
    (out / "throughput_tensor.json").write_text(json.dumps(job))
    jpeg = {"pairs_per_s": 2400.0, "pairs_per_s_per_core": 150.0, "pairs_per_s_device": {"median": 5000.0}}
    (out / "scale_gpu.json").write_text(json.dumps({"formats": {"jpeg": jpeg}}))


def test_every_field_comes_from_its_output(tmp_path: Path, gpu_summary) -> None:
    _write(tmp_path)
    s = gpu_summary.summarise(tmp_path, commit="abc123")
    assert s["commit"] == "abc123" and s["gpu"] == "NVIDIA H200"
    assert s["cuda_tests"] == {"passed": 110, "failed": 2, "skipped": 8}
    assert (s["entropy_bandwidth_fraction"], s["blend_bandwidth_fraction"]) == (0.83, 0.81)
    assert (s["condense_ms"], s["torch_argsort_ms"], s["condense_n"]) == (0.12, 0.26, 1281167)
    assert s["tensor_feed_img_per_s"] == 1.5e6
    assert (s["dali_gpu_img_per_s"], s["dataloader_img_per_s"]) == (3e4, 5e3)  # the most workers
    assert s["main_job"] == {
        "backend": "tensor",
        "measured_ratio": 0.83,
        "theoretical_C": 0.821,
        "vanilla_seconds": 100.0,
        "kcd_seconds": 83.0,
        "accuracy": {"vanilla": 91.0, "kcd": 91.2},
        "within_C_plus_0.02": True,
    }
    assert s["summary_pairs_per_s"] == {"cpu_threads": 2400.0, "cpu_per_core": 150.0, "gpu": 5000.0}
    assert s["main_job_dali"] is None and s["missing"] == ["throughput_dali.json: FileNotFoundError"]
    assert json.loads((tmp_path / "summary.json").read_text()) == s


def test_missing_outputs_leave_null_fields_and_say_why(tmp_path: Path, gpu_summary) -> None:
    (tmp_path / "kernels_cuda.json").write_text("{not json")
    s = gpu_summary.summarise(tmp_path, commit=None)
    assert s["commit"] and len(s["commit"]) == 40  # this checkout's HEAD
    assert s["entropy_bandwidth_fraction"] is None and s["cuda_tests"] is None and s["gpu"] is None
    assert "kernels_cuda.json: JSONDecodeError" in s["missing"] and "pytest.xml: FileNotFoundError" in s["missing"]
