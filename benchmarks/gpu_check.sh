#!/usr/bin/env bash
# Every GPU check as one prepared script, in stages that can run one device call each:
#
#   bash benchmarks/gpu_check.sh OUT [STAGES]
#
# STAGES, a comma list (default: all, in this order):
#   build     cmake build of both modules for KCD_FAST_CUDA_ARCHS (default 90-real), incremental
#   tests     the needs_cuda tests + the CPU core tests (OUT/pytest.xml, OUT/pytest.log)
#   kernels   benchmarks/kernels.py --device cuda (bandwidth fractions, condense vs torch.argsort)
#   feed      the tensor back end's feed on the device: 32x32, B = 512, the cifar recipe (img/s)
#   main      the main job, benchmarks/throughput.py on the GPU with the tensor back end
#   dali      DALI on the GPU: its tests (mixed decoder, corrupt-file fuzz), benchmarks/loader.py
#             --workload jpeg (DALI vs the DataLoader on every CPU core) and the main job with
#             --backend dali. A machine without DALI: the parts a DALI kit packer (dali_kit.sh) makes,
#             .gpu_kit/1..4, carried one per device call, are unpacked into /tmp/site first
#             (a torchcodec wheel put in .gpu_kit/1/, for the GPU summariser, at the start). Then
#             benchmarks/scale.py --device cuda: folder summaries on the CPU threads and the GPU.
#   variants  the opt-in kernel variants: tests and kernel benchmark again
# Every stage appends to OUT (JSON + logs) and OUT/summary.txt; at the end
# benchmarks/gpu_summary.py writes OUT/summary.json (commit it as benchmarks/results/gpu/).
# QUICK=1 runs the main job and the loader benchmark at their --quick sizes (a tight budget).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT [STAGES]}
stages=${2:-build,tests,kernels,feed,main,dali,variants}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
has() { [[ ",$stages," == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$out/summary.txt"; }

# torchcodec (the folder overlay's GPU summariser: nvJPEG decode/encode): a wheel carried in .gpu_kit/1/
# (pip download torchcodec --no-deps -d .gpu_kit/1), unpacked into /tmp/site; without it those tests skip
if ! $py -c "import torchcodec" 2>/dev/null && ls .gpu_kit/*/torchcodec-*.whl >/dev/null 2>&1; then
  [ -d /tmp/site/torchcodec ] || { mkdir -p /tmp/site && $py -m zipfile -e "$(ls .gpu_kit/*/torchcodec-*.whl | head -1)" /tmp/site; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH

if [ ! -s "$out/env.txt" ]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvcc --version | tail -1
    $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    $py -c "import torchcodec.decoders as t, torchcodec; print('torchcodec', torchcodec.__version__)" 2>&1 | tail -1
    git rev-parse HEAD
  } 2>&1 | tee "$out/env.txt"
fi

if has build; then
  export KCD_FAST_CUDA_ARCHS=${KCD_FAST_CUDA_ARCHS:-90-real}
  start=$(date +%s)
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$py")" \
    -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/kcd_fast" \
    -DCMAKE_CUDA_ARCHITECTURES="$KCD_FAST_CUDA_ARCHS" \
    -DKCD_VERSION="$($py -c 'exec(open("kcd_fast/_version.py").read()); print(__version__)')" \
    >"$out/build.log" 2>&1 && cmake --build build/gpu --parallel >>"$out/build.log" 2>&1
  rc=$?
  note "build rc=$rc in $(($(date +%s) - start)) s"
  [ $rc -eq 0 ] || { tail -40 "$out/build.log"; exit 1; }
  $py -c "import kcd_fast, json; print(json.dumps(kcd_fast.build_info()))" | tee -a "$out/summary.txt"
fi

if has tests; then
  # CUDA kernels (compiled and NVRTC fallback), ordering and scale, the CPU core, the GPU paths of
  # the loader and trainer (DALI tests skip where DALI is absent: the dali stage runs them)
  $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_streams.py tests/test_rtc.py tests/test_cuda_review.py \
    tests/test_ops.py tests/test_condense.py tests/test_schedule.py tests/test_bank.py tests/test_loader.py \
    tests/test_train.py tests/test_sequence_scores.py tests/test_tensor_backend.py tests/test_correctness.py \
    tests/test_image_codec.py tests/test_overlay.py --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log" | tail -15
  note "pytest rc=${PIPESTATUS[0]}"
fi

if has kernels; then
  $py benchmarks/kernels.py --device cuda --json "$out/kernels_cuda.json" 2>&1 | tee "$out/kernels_cuda.log"
  note "kernels rc=${PIPESTATUS[0]}"
fi

if has feed; then
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
  note "tensor feed rc=${PIPESTATUS[0]}"
fi

if has main; then
  $py benchmarks/throughput.py --device cuda --backend tensor "${quick[@]}" --no-progress \
    --json "$out/throughput_tensor.json" --plot "$out/throughput_tensor.png" 2>&1 | tee "$out/throughput_tensor.log"
  note "main job (tensor) rc=${PIPESTATUS[0]}"
fi

if has dali; then
  if ! $py -c "import nvidia.dali" 2>/dev/null; then
    parts=$(ls .gpu_kit/*/dali.tar.xz.part-* 2>/dev/null | wc -l)
    if [ "$parts" -gt 0 ]; then
      mkdir -p /tmp/site && cat .gpu_kit/*/dali.tar.xz.part-* | xz -dc | tar x -C /tmp/site
      export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
  fi
  if $py -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tee -a "$out/summary.txt"; then
    $py -m pytest -q -p no:cacheprovider tests/test_dali.py tests/test_bad_data.py tests/test_overlay.py \
      --junitxml="$out/pytest_dali.xml" 2>&1 | tee "$out/pytest_dali.log" | tail -8
    note "pytest dali rc=${PIPESTATUS[0]}"
    $py benchmarks/loader.py --workload jpeg --workers "$(nproc)" "${quick[@]}" --json "$out/loader_jpeg_gpu.json" \
      2>&1 | tee "$out/loader_jpeg_gpu.log"
    note "loader jpeg rc=${PIPESTATUS[0]}"
    $py benchmarks/throughput.py --device cuda --backend dali "${quick[@]}" --no-progress \
      --json "$out/throughput_dali.json" --plot "$out/throughput_dali.png" 2>&1 | tee "$out/throughput_dali.log"
    note "main job (dali) rc=${PIPESTATUS[0]}"
    # folder summaries: the CPU threads and the tensor summariser on the GPU (pairs/s)
    $py benchmarks/scale.py --repeats 2 --device cuda --json "$out/scale_gpu.json" 2>&1 | tee "$out/scale_gpu.log"
    note "scale (summaries) rc=${PIPESTATUS[0]}"
  else
    note "dali: not importable and no .gpu_kit parts here: skipped"
  fi
fi

if has variants; then
  # A/B: the opt-in kernel variants (more bytes in flight per thread), tested and measured the
  # same way; whichever reaches the larger fraction of copy bandwidth should be the default.
  variants="entropy_batch=4,blend_per_thread=4"
  KCD_FAST_CUDA_VARIANTS=$variants $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 |
    tee "$out/pytest_variants.log" | tail -3
  note "pytest variants rc=${PIPESTATUS[0]}"
  KCD_FAST_CUDA_VARIANTS=$variants $py benchmarks/kernels.py --device cuda --json "$out/kernels_cuda_variants.json" \
    2>&1 | tee "$out/kernels_cuda_variants.log"
  note "kernels variants ($variants) rc=${PIPESTATUS[0]}"
fi

$py benchmarks/gpu_summary.py "$out" --commit "$(git rev-parse HEAD 2>/dev/null || echo unknown)" >/dev/null
cat "$out/summary.txt"
echo "summary: $out/summary.json"
