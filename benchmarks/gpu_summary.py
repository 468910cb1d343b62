"""Gathers what benchmarks/gpu_check.sh measured into one summary.json (issue: GPU checks).

    python benchmarks/gpu_summary.py OUT [--commit SHA]

Reads, from OUT (each optional; a missing one leaves its fields null with the reason in
"missing"): env.txt (nvidia-smi's GPU name), pytest.xml (the CUDA test run, JUnit XML),
kernels_cuda.json (benchmarks/kernels.py --device cuda), tensor_feed.json, loader_jpeg_gpu.json
(benchmarks/loader.py --workload jpeg with DALI on the GPU), throughput_tensor.json /
throughput_dali.json (the main job), scale_gpu.json (benchmarks/scale.py --device cuda: folder
summaries per second on the CPU threads and the GPU). Writes OUT/summary.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(path: Path, missing: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        missing.append(f"{path.name}: {type(err).__name__}")
        return None


def cuda_tests(xml_path: Path, missing: list[str]) -> dict[str, int] | None:
    """{passed, failed, skipped} of a JUnit XML report (errors count as failed)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as err:
        missing.append(f"{xml_path.name}: {type(err).__name__}")
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def gpu_name(env_path: Path, missing: list[str]) -> str | None:
    try:
        lines = env_path.read_text().splitlines()
    except OSError as err:
        missing.append(f"{env_path.name}: {type(err).__name__}")
        return None
    # nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv: a header, then rows
    for i, line in enumerate(lines):
        if line.startswith("name,") and i + 1 < len(lines):
            return lines[i + 1].split(",")[0].strip()
    missing.append("env.txt: no nvidia-smi row")
    return None


def main_job(data: dict[str, Any] | None, backend: str) -> dict[str, Any] | None:
    if data is None:
        return None
    return {
        "backend": data.get("config", {}).get("backend", backend),
        "measured_ratio": data.get("measured_ratio"),
        "theoretical_C": data.get("theoretical_C"),
        "vanilla_seconds": data.get("vanilla", {}).get("seconds"),
        "kcd_seconds": data.get("kcd", {}).get("seconds"),
        "accuracy": {"vanilla": data.get("vanilla", {}).get("accuracy"), "kcd": data.get("kcd", {}).get("accuracy")},
        "within_C_plus_0.02": data.get("goal_within_0.02"),
    }


def summarise(out: Path, commit: str | None = None) -> dict[str, Any]:
    missing: list[str] = []
    kernels = _load(out / "kernels_cuda.json", missing)
    feed = _load(out / "tensor_feed.json", missing)
    loader = _load(out / "loader_jpeg_gpu.json", missing)
    main_tensor = _load(out / "throughput_tensor.json", missing)
    main_dali = _load(out / "throughput_dali.json", missing)
    scale = _load(out / "scale_gpu.json", missing)
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    summary: dict[str, Any] = {
        "commit": commit,
        "gpu": gpu_name(out / "env.txt", missing),
        "cuda_tests": cuda_tests(out / "pytest.xml", missing),
        "entropy_bandwidth_fraction": None,
        "blend_bandwidth_fraction": None,
        "condense_ms": None,
        "torch_argsort_ms": None,
        "tensor_feed_img_per_s": None if feed is None else feed.get("tensor_feed_img_per_s"),
        "dali_gpu_img_per_s": None,
        "dataloader_img_per_s": None,
        "main_job": main_job(main_tensor, "tensor"),
        "main_job_dali": main_job(main_dali, "dali"),
    }
    if kernels is not None:
        summary["entropy_bandwidth_fraction"] = kernels.get("observe_entropy", {}).get("fraction_of_copy_bw")
        summary["blend_bandwidth_fraction"] = kernels.get("blend", {}).get("fraction_of_copy_bw")
        summary["condense_ms"] = kernels.get("condense", {}).get("first_ms")
        summary["torch_argsort_ms"] = kernels.get("condense", {}).get("torch_argsort_ms")
        summary["condense_n"] = kernels.get("condense", {}).get("n")
    if loader is not None and loader.get("results"):
        best = max(loader["results"], key=lambda r: r["num_workers"])
        fk = best["full_keep"]
        summary["dali_device"] = best.get("dali_device")  # "cuda:0 (mixed)"-like on a GPU machine
        summary["dali_gpu_img_per_s"] = fk.get("dali_images_per_s")
        summary["dataloader_img_per_s"] = fk.get("dataloader_pil_images_per_s")
        summary["dali_over_dataloader"] = fk.get("ratio")
    if scale is not None:  # folder summaries (benchmarks/scale.py --device cuda): pairs per second
        jp = scale.get("formats", {}).get("jpeg", {})
        summary["summary_pairs_per_s"] = {
            "cpu_threads": jp.get("pairs_per_s"),
            "cpu_per_core": jp.get("pairs_per_s_per_core"),
            "gpu": jp.get("pairs_per_s_device", {}).get("median"),
        }
    summary["missing"] = missing
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder gpu_check.sh wrote")
    p.add_argument("--commit", default=None, help="the commit measured (default: this checkout's HEAD)")
    a = p.parse_args(argv)
    s = summarise(a.out, a.commit)
    print(json.dumps(s, indent=2))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
