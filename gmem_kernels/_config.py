"""Launch configuration: autotuned on a GPU, one small fixed configuration in the interpreter."""
from __future__ import annotations

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
