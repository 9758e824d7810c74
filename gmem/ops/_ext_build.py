"""How the compiled extension is built: sources, flags, CUDA detection (shared by setup.py and the
JIT fallback of :mod:`gmem.ops._cpp_backend`).

Imports nothing from gmem (setup.py loads this file by path) and imports torch only inside functions.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = REPO_ROOT / "csrc"

# Relative to the repository root: one file per op with its body and registrations (csrc/*.cpp), the
# element kernels per device (csrc/cpu/<op>_cpu.cpp over the torch-free <op>_kernels.h; csrc/cuda/
# <op>_cuda.cpp over the torch-free <op>_kernels.cu, which CMake compiles alone). Basenames are unique:
# a JIT build names its objects by basename.
CPU_SOURCES = [
    "csrc/module.cpp", "csrc/checks.cpp", "csrc/madafm.cpp", "csrc/conv.cpp", "csrc/conv_lowrank.cpp",
    "csrc/linear.cpp", "csrc/cpu/device_cpu.cpp", "csrc/cpu/madafm_cpu.cpp", "csrc/cpu/linear_cpu.cpp",
    "csrc/cpu/conv_lowrank_cpu.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/device_cuda.cpp", "csrc/cuda/madafm_cuda.cpp", "csrc/cuda/linear_cuda.cpp",
    "csrc/cuda/conv_lowrank_cuda.cpp", "csrc/cuda/madafm_kernels.cu", "csrc/cuda/linear_kernels.cu",
    "csrc/cuda/lowrank_kernels.cu",
]

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"  # Ampere and Hopper; TORCH_CUDA_ARCH_LIST overrides

CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]  # -fopenmp: at::parallel_for is inline OpenMP code; -g0: build time
CUDA_CXX_FLAGS = ["-DGMEM_WITH_CUDA"]  # the op files then register their CUDA kernels too
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit of the nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime_api.h").exists():
            return str(home)
    return None


def prepare_cuda_env() -> str | None:
    """Set CUDA_HOME (torch.utils.cpp_extension reads it at import) and the default arch list."""
    home = find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    return home


def want_cuda(torch_module) -> bool:
    """Build the CUDA part: GMEM_FORCE_CUDA=1, or torch is a CUDA build and nvcc is found."""
    if os.environ.get("GMEM_FORCE_CUDA") == "1":
        return True
    home = find_cuda_home()
    return bool(torch_module.version.cuda) and home is not None and Path(home, "bin", "nvcc").exists()


def cxx_flags(with_cuda: bool) -> list[str]:
    """The host compiler's flags for a build with or without the CUDA part."""
    return CXX_FLAGS + (CUDA_CXX_FLAGS if with_cuda else [])


def sources_hash(with_cuda: bool) -> str:
    """Hash of every file under csrc/ (headers included) plus the build flavour and torch version."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cu"}):
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    digest.update(f"cuda={with_cuda} torch={torch.__version__} flags={cxx_flags(with_cuda)}{NVCC_FLAGS}".encode())
    return digest.hexdigest()[:16]
