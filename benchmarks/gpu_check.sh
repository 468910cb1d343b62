#!/usr/bin/env bash
# One prepared GPU check: build with CUDA (sm_90 for Hopper, or KCD_FAST_CUDA_ARCHS),
# run the needs_cuda tests and the CPU core tests, then the kernel benchmark on the GPU.
# Everything it measures goes into the folder given as $1 (JSON + logs).
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -1
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
} 2>&1 | tee "$out/env.txt"

export KCD_FAST_CUDA_ARCHS=${KCD_FAST_CUDA_ARCHS:-90-real}
archs=$KCD_FAST_CUDA_ARCHS
start=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $py)" \
  -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/kcd_fast" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DKCD_VERSION="$($py -c 'exec(open("kcd_fast/_version.py").read()); print(__version__)')" \
  >"$out/build.log" 2>&1 && cmake --build build/gpu --parallel >>"$out/build.log" 2>&1
rc_build=$?
echo "build rc=$rc_build in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
[ $rc_build -eq 0 ] || { tail -40 "$out/build.log"; exit 1; }
$py -c "import kcd_fast, json; print(json.dumps(kcd_fast.build_info()))" | tee -a "$out/summary.txt"

# CUDA kernels + the CPU core, then the GPU paths of the loader and trainer (DALI tests skip
# where DALI is absent, as on the lent machines).
$py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py tests/test_condense.py tests/test_schedule.py \
  tests/test_bank.py tests/test_loader.py tests/test_train.py tests/test_dali.py tests/test_sequence_scores.py \
  tests/test_tensor_backend.py tests/test_correctness.py tests/test_rtc.py tests/test_cuda_streams.py \
  --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log" | tail -15
echo "pytest rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"

$py benchmarks/kernels.py --device cuda --json "$out/kernels_cuda.json" 2>&1 | tee "$out/kernels_cuda.log"
echo "kernels rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"

# The tensor back end on the device: 32x32 CIFAR recipe, B = 512, CUDA storage (img/s).
$py - "$out/tensor_feed.json" <<'PY' 2>&1 | tee "$out/tensor_feed.log"
import json, sys, time
import numpy as np, torch
from kcd_fast import ArrayDataset, KCDLoader
from kcd_fast.kd import full_schedule
n = 200_000
x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
ds = ArrayDataset(x, np.zeros(n, dtype=np.int64), device="cuda")
loader = KCDLoader(ds, full_schedule(20), batch_size=512, shuffle=True, backend="tensor", augment="cifar")
rates = []
for epoch in range(5):
    torch.cuda.synchronize(); t = time.perf_counter(); seen = 0
    for images, labels, idx in loader:
        seen += images.shape[0]
    torch.cuda.synchronize(); rates.append(seen / (time.perf_counter() - t))
res = {"tensor_feed_img_per_s": float(np.median(rates[1:])), "runs": rates, "batch": 512, "n": n}
print(json.dumps(res)); json.dump(res, open(sys.argv[1], "w"), indent=2)
PY
echo "tensor feed rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"

# A/B: the opt-in kernel variants (more bytes in flight per thread), tested and measured
# the same way; whichever reaches the larger fraction of copy bandwidth should be the default.
variants="entropy_batch=4,blend_per_thread=4"
KCD_FAST_CUDA_VARIANTS=$variants $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$out/pytest_variants.log" | tail -3
echo "pytest variants rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
KCD_FAST_CUDA_VARIANTS=$variants $py benchmarks/kernels.py --device cuda --json "$out/kernels_cuda_variants.json" \
  2>&1 | tee "$out/kernels_cuda_variants.log"
echo "kernels variants ($variants) rc=${PIPESTATUS[0]}" | tee -a "$out/summary.txt"
cat "$out/summary.txt"
