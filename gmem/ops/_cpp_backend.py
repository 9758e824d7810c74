"""The compiled backends ``"cpu"`` and ``"cuda"``: the C++/CUDA kernels of ``csrc/``, registered by
the extension on the ``gmem::`` ops for the ``CPU`` and ``CUDA`` dispatch keys. These backends call
the op below autograd (the Autograd kernel of :mod:`gmem.ops._ops` already runs around them), which
reaches those kernels. For ``madafm_weight`` the extension also registers a C++ Autograd kernel
(``csrc/madafm.cpp``): a public call that resolved to one of these backends tells it so
(:attr:`CppBackend.kernel_switch`, set by :func:`gmem.ops.backends.call_with`) and it runs the kernels
without Python; it hands every other call to :func:`gmem.ops._ops.python_autograd`.

Loading, once per process, on first use of :mod:`gmem.ops` backends:

1. ``import gmem._C`` (built by ``pip install --no-build-isolation -e .`` / setup.py);
2. else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` into
   ``$GMEM_EXT_CACHE`` (default ``~/.cache/gmem/ext``)/``<hash of the sources>``, under a file lock
   so that two processes never build into the same directory at once;
3. else one warning, and both backends report unavailable (``backend="auto"`` then picks another;
   no later call retries the build).

``GMEM_NO_JIT=1`` skips step 2.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import _ext_build, _ops
from ._ops import DeviceKernels
from .backends import register_backend

__all__ = ["CppBackend", "CudaBackend", "DeviceKernels", "extension_loaded", "load_error", "load_method"]

_state: dict = {"tried": False, "loaded": False, "error": None, "how": None, "module": None, "switch": None}
_load_lock = threading.Lock()  # one loader per process, even when threads ask at once



def _jit_build():
    """Build csrc/ into a cache directory keyed by the sources' hash and load it; returns its module."""
    if not (_ext_build.CSRC / "module.cpp").exists():
        raise RuntimeError(f"no C++ sources to build at {_ext_build.CSRC}")
    _ext_build.prepare_cuda_env()  # CUDA_HOME must be set before cpp_extension is imported
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and _ext_build.want_cuda(torch)
    key = _ext_build.sources_hash(with_cuda)
    root = Path(os.environ.get("GMEM_EXT_CACHE", Path.home() / ".cache" / "gmem" / "ext"))
    build_dir = root / key
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = _ext_build.CPU_SOURCES + (_ext_build.CUDA_SOURCES if with_cuda else [])
    with _file_lock(build_dir / ".lock"):
        # While we hold the lock nobody else builds here: a baton file torch left behind when a
        # build was killed is stale, and would make cpp_extension wait for it forever.
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name=f"gmem_ext_{key}",
            sources=[str(_ext_build.REPO_ROOT / s) for s in sources],
            extra_cflags=_ext_build.cxx_flags(with_cuda),
            extra_cuda_cflags=_ext_build.NVCC_FLAGS,
            extra_ldflags=_ext_build.LINK_FLAGS,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=False,
        )


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` for the duration of a build (POSIX flock; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> bool:
    """Load the extension once; on failure warn once and stay unavailable."""
    if _state["tried"]:
        return _state["loaded"]
    with _load_lock:
        if _state["tried"]:
            return _state["loaded"]
        try:
            loaded = _load_once()
        except Exception as err:  # e.g. the loaded library misbehaves: still one warning, no retry
            _state["error"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"gmem: the compiled extension failed to load: {_state['error']}", RuntimeWarning, 2)
            loaded = False
        _state["loaded"] = loaded
        _state["tried"] = True
        return loaded


def _load_once() -> bool:
    """gmem._C, else a JIT build; False (after one warning) when neither works."""
    errors = []
    try:
        _state["module"] = importlib.import_module("gmem._C")
        _state["how"] = "gmem._C"
    except (ImportError, OSError) as err:  # not built, or built against another torch
        errors.append(f"import gmem._C: {err}")
        if os.environ.get("GMEM_NO_JIT") == "1":
            errors.append("JIT build disabled by GMEM_NO_JIT=1")
        else:
            try:
                _state["module"] = _jit_build()
                _state["how"] = "jit"
            except Exception as jit_err:  # compiler missing, build failure, ...
                errors.append(f"JIT build: {type(jit_err).__name__}: {jit_err}")
    if _state["how"] is None:
        _state["error"] = "; ".join(errors)
        warnings.warn(
            "gmem: the compiled extension is unavailable, the 'cpu'/'cuda' backends are off "
            f"(reference ops are used instead): {_state['error']}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    # The C++ Autograd kernels call the Python one for the calls that are not theirs; call_with
    # tells them which are (CppBackend.kernel_switch)
    _state["module"].set_python_autograd(_ops.python_autograd)
    _state["switch"] = _state["module"].select_device_kernels
    return True


def extension_loaded() -> bool:
    """Whether the compiled kernels are loaded (loading them on the first call)."""
    return _load()


def load_method() -> Optional[str]:
    """How the extension was loaded: "gmem._C" (built in place or installed), "jit", or None."""
    return _state["how"]


def load_error() -> Optional[str]:
    """Why the extension could not be loaded (None when it loaded or was not tried yet)."""
    return _state["error"]


def _has_kernel(dispatch_key: str) -> bool:
    """Whether the loaded library registered its kernels for ``dispatch_key`` (asked once: it is slow)."""
    key = "kernels " + dispatch_key
    if key not in _state:
        _state[key] = torch._C._dispatch_has_kernel_for_dispatch_key("gmem::madafm_weight", dispatch_key)  # noqa: SLF001
    return _state[key]


# ---------------------------------------------------------------------------------------------
# The backends: the kernels registered on the ops (gmem.ops._ops.DeviceKernels), where built
# ---------------------------------------------------------------------------------------------


#: the public ops with a one-step entry in the extension (csrc/madafm.cpp: gmem._C.madafm_weight)
_ENTRY_OPS = ("madafm_weight",)


def _entry(op: str):
    """The extension's one-step entry of public op ``op`` (None: none, or the extension not loaded)."""
    module = _state["module"]
    return getattr(module, op, None) if module is not None and op in _ENTRY_OPS else None


class CppBackend(DeviceKernels):
    """C++ kernels on the CPU (float32, float64; bfloat16/float16 arguments computed in float32),
    ATen (oneDNN / BLAS) for convolutions and GEMMs."""

    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    @property
    def kernel_switch(self):
        return _state["switch"]

    def entry(self, op):
        return _entry(op)

    def is_available(self) -> bool:
        # a library built from other sources may lack the kernels (then the reference would answer)
        return _load() and _has_kernel("CPU")


class CudaBackend(DeviceKernels):
    """CUDA kernels (float32, float64, float16, bfloat16), cuDNN / cuBLAS through ATen."""

    name = "cuda"
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    @property
    def kernel_switch(self):
        return _state["switch"]

    def entry(self, op):
        return _entry(op)

    def is_available(self) -> bool:
        if not torch.cuda.is_available():
            return False
        if not _load():
            return False
        # a CPU-only build of the extension (no CUDA toolkit at build time) has no CUDA kernels
        return _has_kernel("CUDA")


register_backend(CppBackend(), priority=10)
register_backend(CudaBackend(), priority=20)
