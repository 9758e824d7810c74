"""gmem_kernels: Triton kernels behind the ``"triton"`` backend of :mod:`gmem.ops`.

Reached only through ``gmem.ops`` (``backend="triton"``); see ``NOTES.md`` for the design.

* :mod:`.conv`: mAdaFM convolution as an implicit GEMM whose weight tiles are built in registers
  (forward, input gradient, style and bias gradients), mixed-task batches in one launch;
* :mod:`.linear`: mFiLM linear, shared GEMM plus per-sample epilogue (forward and backward);
* :mod:`.weight`: the modulated weight itself and its backward (elementwise);
* :mod:`.grouping`: the device-side stable grouping of samples by task (no host synchronisation).

Each kernel launch is a ``gmem::triton_`` operator (``torch.library.triton_op`` + ``wrap_triton``,
see :func:`._config.kernel_op`), so torch.compile traces through these functions into the kernels;
``python -m gmem_kernels.trace_check`` checks that without a GPU.

Importing this package needs Triton; running the kernels needs a CUDA GPU, or ``TRITON_INTERPRET=1``
in the environment *before* this package is imported (the CPU interpreter, for tests only).
"""
from ._config import INTERPRET
from .conv import conv2d_backward, conv2d_forward
from .grouping import TaskGroups, group_by_task, single_group
from .linear import linear_backward, linear_forward
from .lowrank import conv2d_lowrank_backward, conv2d_lowrank_forward
from .weight import madafm_weight, madafm_weight_backward

__all__ = [
    "INTERPRET",
    "TaskGroups",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_lowrank_backward",
    "conv2d_lowrank_forward",
    "group_by_task",
    "linear_backward",
    "linear_forward",
    "madafm_weight",
    "madafm_weight_backward",
    "single_group",
]
