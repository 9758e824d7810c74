"""Launch configuration: autotuned on a GPU, one small fixed configuration in the interpreter; and
the registration of every launch as a ``gmem::triton_`` op (:func:`kernel_op`, :func:`wrap_triton`)."""
from __future__ import annotations

import functools
import os

import torch
import triton

#: True when the kernels run in Triton's CPU interpreter (read once, when this package is imported:
#: ``triton.jit`` picks the interpreter at definition time, so the value cannot change later).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_allows_tf32() -> bool:
    """Whether torch's float32 matmul setting allows TF32 (new ``fp32_precision`` API first).

    Reading the legacy ``allow_tf32`` raises in recent torch once both APIs were used, hence the
    order and the fallback.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: tf32 for float32 only where torch's setting allows it
    (fp16/bf16 operands ignore it; the interpreter computes exactly)."""
    if dtype == torch.float32 and not INTERPRET and torch_allows_tf32():
        return "tf32"
    return "ieee"


class _Fixed:
    """``kernel[grid](...)`` with one fixed configuration, for the interpreter (autotuning there
    would run every configuration at interpreter speed)."""

    def __init__(self, fn, config: triton.Config):
        self.fn, self.config = fn, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(kwargs, **self.config.kwargs)
            g = grid(meta) if callable(grid) else grid
            return self.fn[g](*args, **meta)

        return launch


def tuned(configs: list[triton.Config], key: list[str], interpret_config: triton.Config):
    """Decorator: ``triton.autotune(configs, key)`` on a GPU, ``interpret_config`` in the interpreter."""

    def wrap(fn):
        if INTERPRET:
            return _Fixed(fn, interpret_config)
        return triton.autotune(configs=configs, key=key)(fn)

    return wrap


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------
# kernel launches as torch.library ops, so that torch.compile sees them
# ---------------------------------------------------------------------------------------------
class _InterpretedLaunch:
    """``kernel[grid](...)`` in the interpreter, skipping launches on fake tensors.

    torch's ``wrap_triton`` hands interpreted kernels back unwrapped (they lack the JIT metadata its
    tracing needs), so under the interpreter the ops stay opaque custom ops whose fake
    implementation is the op body itself: there the launch must do nothing (the outputs are
    already allocated with torch ops, which is all shape propagation needs).
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            if any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
                return None
            return launch(*args, **kwargs)

        return run


def wrap_triton(kernel):
    """``wrap_triton(kernel)[grid](...)``: the launch form every ``kernel_op`` body uses.

    Traced (a dispatch mode is active: fake tensors, functionalization, make_fx): torch's
    ``torch.library.wrap_triton``, which records the launch as a triton-kernel HOP node. Eager with
    real tensors: the kernel itself (torch's own note puts the HOP dispatch at ~1 ms a launch). The name
    matters: ``torch.library.triton_op`` finds an op's kernels by reading ``wrap_triton(name)``
    calls in its source.
    """
    if INTERPRET:
        return _InterpretedLaunch(kernel)
    if torch._C._len_torch_dispatch_stack() == 0:
        return kernel
    return torch.library.wrap_triton(kernel)


def kernel_op(name: str):
    """Decorator: ``fn`` (allocates outputs with torch ops, launches with ``wrap_triton``) becomes
    the operator ``name``, registered with ``torch.library.triton_op``.

    Calling the decorated function runs ``fn`` directly in eager mode (the custom-op dispatch would
    add ~8 us a call on the 2-core CPU machine: 3.5 vs 11.4 us for an empty conv forward), and the
    operator when torch.compile traces or a dispatch mode is active, so that compile
    records ``gmem::triton_...`` nodes that AOT autograd decomposes into the kernel launches.

    Under the interpreter ``torch.library.wrap_triton`` cannot trace interpreted kernels, so the op
    is an opaque ``custom_op`` whose fake implementation is ``fn`` with launches skipped (see
    :class:`_InterpretedLaunch`): torch.compile still captures one graph, the kernels stay opaque.
    """

    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
        else:
            op = torch.library.triton_op(name, fn, mutates_args=())

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
                return op(*args)
            return fn(*args)

        call.op = op
        return call

    return register
