# --- gmem_kernels / triton backend (issue 6): keep this block at the top of the file ----------------
# Triton picks its CPU interpreter when a @triton.jit function is *defined*, reading TRITON_INTERPRET
# then; gmem_kernels defines its kernels when the "triton" backend first loads. pytest imports this
# file before any test module, so setting the variable here (only when no CUDA GPU is present, and
# never overriding an explicit value) makes the Triton tests run under the interpreter on CPU
# machines whichever test file loads Triton first. torch itself does not import Triton on import, and
# torch.compile's CPU (C++) backend ignores the variable.
import os as _os


def _cuda_gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no usable torch: nothing Triton-related will run anyway
        return False


if not _cuda_gpu_present():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
# --- end of the triton block --------------------------------------------------------------------


# --- self-check verdicts (issue 17): tests never read or write the user's cache ------------------
# gmem.ops.selfcheck caches its verdicts under GMEM_CACHE_DIR; a fresh directory per session (set
# before gmem is imported, inherited by subprocesses) makes every session check its backends once.
import atexit as _atexit
import shutil as _shutil
import tempfile as _tempfile

_os.environ["GMEM_CACHE_DIR"] = _tempfile.mkdtemp(prefix="gmem-test-cache-")
_atexit.register(_shutil.rmtree, _os.environ["GMEM_CACHE_DIR"], True)
# --- end of the self-check block -----------------------------------------------------------------


# --- one torch thread for modules of small ops (restored afterwards) -----------------------------
import pytest as _pytest


@_pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module (small ops, where thread start-up dominates); the
    previous count comes back after the module. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
