"""gmem's compiled extension; everything else (metadata, packages, scripts) is in pyproject.toml.

`pip install --no-build-isolation .` (build isolation would download a torch of its own).
`python setup.py build_ext --inplace` builds only the extension, next to the sources (what
`make install` does for a clone).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _compiled_extensions():
    """``gmem._C``: the C++ CPU ops always, plus the CUDA ops when torch has CUDA and nvcc is found
    (or GMEM_FORCE_CUDA=1). GMEM_NO_EXT=1 builds none (the ops then JIT-build on first use)."""
    if os.environ.get("GMEM_NO_EXT") == "1":
        return [], {}
    spec = importlib.util.spec_from_file_location("_gmem_ext_build", Path(__file__).parent / "gmem/ops/_ext_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.prepare_cuda_env()  # before torch.utils.cpp_extension reads CUDA_HOME
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = build.want_cuda(torch)
    sources = build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else [])
    make = CUDAExtension if with_cuda else CppExtension
    args = {"cxx": build.cxx_flags(True), "nvcc": build.NVCC_FLAGS} if with_cuda else build.cxx_flags(False)
    ext = make("gmem._C", sources, extra_compile_args=args, extra_link_args=build.LINK_FLAGS)
    return [ext], {"build_ext": BuildExtension}


_ext_modules, _cmdclass = _compiled_extensions()

setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
