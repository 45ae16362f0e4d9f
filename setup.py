"""Builds diffrl._C: the C++/OpenMP kernels always, the CUDA kernels when nvcc is found.

Environment:
  DIFFRL_CUDA=auto|0|1     auto (default): build the CUDA kernels if nvcc is found; 1: require them; 0: skip.
  DIFFRL_CUDA_ARCHS="80;90" SM architectures to compile for (SASS); PTX is added for the newest.
  DIFFRL_NVCC_THREADS=N    nvcc --threads (parallel compilation of the archs), default 4.
  CUDA_HOME                where to look for nvcc if it is not on the PATH.
The build never queries a GPU and never links libtorch: the extension takes raw pointers and a stream.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def find_nvcc() -> str | None:
    mode = os.environ.get("DIFFRL_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    if nvcc is None and mode in ("1", "on", "true", "yes"):
        sys.exit("DIFFRL_CUDA=1 but nvcc was not found (put it on the PATH or set CUDA_HOME)")
    return nvcc


def cuda_home(nvcc: str) -> Path:
    """The toolkit root (include/, lib64/) of this nvcc; nvcc may be a wrapper script elsewhere."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    try:  # nvcc reports its own root as TOP=... in a dry run
        out = subprocess.run([nvcc, "--dryrun", "-v", "--version"], capture_output=True, text=True).stderr
        cands += [line.split("TOP=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line]
    except OSError:
        pass
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c).resolve()
    sys.exit(f"found nvcc at {nvcc} but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


def cuda_archs() -> list[str]:
    raw = os.environ.get("DIFFRL_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        sys.exit(f"DIFFRL_CUDA_ARCHS must look like '80;90', got {raw!r}")
    return sorted(set(archs), key=int)


NVCC = find_nvcc()
# every op adds <op>.cpp, <op>.cu and <op>_bindings.cpp to csrc/; bindings.cpp registers them
CPP_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
# No contraction into FMAs anywhere: sampling and scoring must round every element the same way.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]

define_macros = []
if NVCC:
    ARCHS = cuda_archs()
    CUDA_HOME = cuda_home(NVCC)
    define_macros += [("DIFFRL_WITH_CUDA", "1"), ("DIFFRL_CUDA_ARCHS", f'"{";".join(ARCHS)}"')]


# CPU kernels are also compiled for AVX2 from <op>_avx2.cpp (same source, chosen at run time by
# csrc/cpu_isa.cpp); other architectures build only the baseline.
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
if not X86_64:
    CPP_SOURCES = [s for s in CPP_SOURCES if not s.endswith("_avx2.cpp")]


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc into objects that the C++ link step picks up, and the
    *_avx2.cpp files with -mavx2."""

    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith("_avx2.cpp"):
                extra_postargs = list(extra_postargs) + ["-mavx2"]
            return compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()

    def build_extension(self, ext):
        if NVCC:
            objects = self.compile_cuda(ext)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)

    def compile_cuda(self, ext) -> list[str]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for a in ARCHS:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}"]
        flags = [
            "-std=c++17", "-O3", "--fmad=false", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
            f"--threads={os.environ.get('DIFFRL_NVCC_THREADS', '4')}", f"-I{CSRC}",
        ] + [f"-D{k}={v}" for k, v in define_macros] + gencode
        objects = []
        for src in CUDA_SOURCES:
            obj = out_dir / (Path(src).stem + ".cu.o")
            deps = [ROOT / src] + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
            if not obj.exists() or obj.stat().st_mtime < max(d.stat().st_mtime for d in deps):
                cmd = [NVCC, *flags, "-c", str(ROOT / src), "-o", str(obj)]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


class BuildPy(build_py):
    """Ships the kernel headers as diffrl/_csrc/: the cupy backend compiles them at run time (NVRTC),
    so a wheel built without nvcc still carries its CUDA kernels. Editable installs read csrc/."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "diffrl" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for p in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")):
            shutil.copy2(p, dst / p.name)


def cuda_link_args() -> tuple[list[str], list[str]]:
    if not NVCC:
        return [], []
    home = CUDA_HOME
    lib_dirs = [str(p) for p in (home / "lib64", home / "lib", home / "targets/x86_64-linux/lib") if p.exists()]
    # static runtime: the wheel needs only the driver at run time
    return lib_dirs, ["cudart_static", "rt", "dl", "pthread"]


lib_dirs, libs = cuda_link_args()
ext = Pybind11Extension(
    "diffrl._C",
    CPP_SOURCES,
    include_dirs=[str(CSRC)] + ([str(CUDA_HOME / "include")] if NVCC else []),
    define_macros=define_macros,
    extra_compile_args=CXX_FLAGS,
    extra_link_args=["-fopenmp"],
    library_dirs=lib_dirs,
    libraries=libs,
    cxx_std=17,
)

setup(
    packages=["diffrl", "diffrl.ops", "diffrl.kernels"]
    + [f"diffrl.{p.name}" for p in sorted((ROOT / "py" / "diffrl").iterdir()) if (p / "__init__.py").exists() and p.name != "ops"],
    package_dir={"diffrl": "py/diffrl", "diffrl.kernels": "kernels"},
    # the packaged shapes models (safetensors + configs, ~9 MB each) and their model cards
    package_data={"diffrl.models": [f"{m}/{pat}" for m in ("shapes_base", "shapes_swapped")
                                    for pat in ("*.json", "*.md", "*.png", "*/*.json", "*/*.safetensors")]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
