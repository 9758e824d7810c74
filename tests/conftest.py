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
