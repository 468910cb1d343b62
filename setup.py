"""Build driver: setuptools hands the compiled modules to CMake (see CMakeLists.txt).

Environment:
  KCD_FAST_NO_CUDA=1      build the CPU module only
  KCD_FAST_CUDA_ARCHS     CMake CUDA architectures (default "75-real;80-real;90-real;90-virtual")
  CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: all cores)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def _version() -> str:
    text = (ROOT / "kcd_fast" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cuda_wanted() -> bool:
    """The same test as CMake's check_language(CUDA): nvcc via CUDACXX, PATH or the
    default toolkit folder, unless KCD_FAST_NO_CUDA=1."""
    if os.environ.get("KCD_FAST_NO_CUDA") == "1":
        return False
    return bool(os.environ.get("CUDACXX") or shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists())


class CMakeBuild(build_ext):
    """One CMake build produces every module; later extensions only check their file."""

    def build_extension(self, ext: Extension) -> None:
        if getattr(self, "_cmake_done", False):
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"CMake did not produce {ext.name}; see the CMake output above")
            return
        self._cmake_done = True
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DKCD_VERSION={_version()}",
            f"-DKCD_REQUIRE_CUDA={'ON' if _cuda_wanted() else 'OFF'}",
        ]
        if shutil.which("ninja") or _has_ninja_module():
            args.append("-GNinja")
        _drop_stale_cache(build_temp, args)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


def _drop_stale_cache(build_temp: Path, args: list[str]) -> None:
    """Removes a CMake cache that this build cannot reuse: made with other arguments (another
    Python, pybind11 or generator), or naming tools that no longer exist (pip builds in a
    temporary environment: a second ``pip install .`` or ``pip wheel .`` found the first one's
    deleted ``ninja`` in ``build/`` and failed). CMake then configures afresh."""
    cache, stamp = build_temp / "CMakeCache.txt", build_temp / "kcd_configure_args.txt"
    if not cache.exists():
        return
    want = "\n".join(args)
    stale = not stamp.exists() or stamp.read_text() != want
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.split(":")[0] in ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND", "CMAKE_CXX_COMPILER") and value:
            stale |= not Path(value).exists()
    if stale:
        cache.unlink()
        shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)
    stamp.write_text(want)


class BuildPy(build_py):
    """Ships the kernel headers (csrc/include) as package data ``kcd_fast/include``: the
    run-time compiled CUDA fallback (kcd_fast/_rtc.py) compiles them with NVRTC where no nvcc
    built the CUDA module. One copy in the repository; the wheel carries a copy made here."""

    def run(self) -> None:
        super().run()
        shutil.copytree(ROOT / "csrc" / "include", Path(self.build_lib) / "kcd_fast" / "include", dirs_exist_ok=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(
    version=_version(),
    ext_modules=[CMakeExtension("kcd_fast._cpu")] + ([CMakeExtension("kcd_fast._cuda")] if _cuda_wanted() else []),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
)
