"""The ``"triton"`` backend: fused Triton kernels from :mod:`gmem_kernels`.

Available when Triton imports and either a CUDA GPU is present or ``TRITON_INTERPRET=1`` was set in
the environment before this module was imported (the CPU interpreter: correct but very slow, so
``backend="auto"`` never picks it on the CPU; ask for ``backend="triton"`` explicitly, as the tests do).

Covered: every op, float32 (tf32 where ``torch.backends.cuda.matmul.allow_tf32`` allows), bfloat16
and float16 (fp32 accumulation). float64 is not: :meth:`supports` says so, and ``gmem.ops`` then
raises a ValueError naming the backend and dtype (``"auto"`` falls back to another backend).
Tensors must be on CUDA, or on the CPU under the interpreter; anything else raises
NotImplementedError. Nothing falls back to the reference silently.

torch.compile: ``traceable = True``. Every method is plain torch ops (the device-side task grouping
included, no host synchronisation) around ``gmem::triton_`` ops, one per kernel launch, registered
with ``torch.library.triton_op``; so ``gmem.ops`` calls these methods inside an autograd.Function
that dynamo traces (``fullgraph=True`` works), and AOT autograd decomposes each op into its Triton
kernel launch. Under the interpreter the ``gmem::triton_`` ops stay opaque (see gmem_kernels/NOTES.md).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import Backend, Grads, in_float32, register_backend

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_kernels = None
_import_error: Optional[str] = None
if torch.cuda.is_available() or _INTERPRET:
    try:
        import gmem_kernels as _kernels  # noqa: F811  (defines the @triton.jit kernels)
    except ImportError as err:  # no Triton here: the backend stays registered but unavailable
        _import_error = str(err)
else:
    _import_error = "no CUDA GPU and TRITON_INTERPRET=1 was not set before import"


# The interpreter runs kernels through numpy, which has no bfloat16: low precision is computed in
# float32 there (CUDA runs the kernels in the low precision with float32 accumulation).
_interpreter_in_float32 = in_float32(lambda backend, x: x is not None and x.device.type == "cpu")


def import_error() -> Optional[str]:
    """Why the Triton kernels are unavailable here (None when they loaded)."""
    return _import_error


class TritonBackend(Backend):
    """Fused implicit-GEMM Triton kernels (``gmem_kernels``); see the module docstring."""

    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    #: takes LowRank gamma/beta factors directly (``gmem::modulated_conv2d_lowrank``)
    supports_lowrank = True
    #: every method is traceable by dynamo: host code is torch ops (the task grouping included) and
    #: each launch is a ``gmem::triton_`` op (``torch.library.triton_op``, see gmem_kernels/NOTES.md)
    traceable = True

    def is_available(self) -> bool:
        return _kernels is not None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        if device.type == "cpu" and not _INTERPRET:
            return False
        return super().supports(device, dtype)

    def auto_eligible(self, device: torch.device) -> bool:
        return device.type == "cuda"  # the CPU interpreter is far too slow to be picked by "auto"

    # -- helpers -----------------------------------------------------------------------------
    def _check(self, op: str, *tensors: Optional[Tensor]) -> None:
        if _kernels is None:
            raise NotImplementedError(f"{op}: the triton backend is unavailable here ({_import_error})")
        for t in tensors:
            if t is None:
                continue
            if t.device.type == "cuda" or (t.device.type == "cpu" and _INTERPRET):
                continue
            raise NotImplementedError(
                f"{op}: the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 "
                f"set before import), got a tensor on {t.device}"
            )
        dtype = tensors[0].dtype
        if dtype not in self.dtypes:
            raise NotImplementedError(
                f"{op}: the triton backend computes in float16/bfloat16/float32, not {dtype}"
            )

    @staticmethod
    def _groups(task_ids: Optional[Tensor], num_tasks: int, n: int, device: torch.device):
        if task_ids is None:
            return _kernels.single_group(n, device)
        return _kernels.group_by_task(task_ids, num_tasks)

    @staticmethod
    def _stacked(gamma: Tensor, beta: Tensor, bias: Optional[Tensor], task_ids: Optional[Tensor]):
        """Single-task styles as stacks of one task (views), so one kernel serves both cases."""
        if task_ids is not None:
            return gamma, beta, bias
        return gamma.unsqueeze(0), beta.unsqueeze(0), None if bias is None else bias.unsqueeze(0)

    @staticmethod
    def _unstacked(grads: Grads, task_ids: Optional[Tensor]) -> Grads:
        if task_ids is not None:
            return grads
        dx, *styles = grads
        return (dx, *(None if g is None else g.squeeze(0) for g in styles))

    # -- weight modulation -------------------------------------------------------------------
    @_interpreter_in_float32
    def madafm_weight(self, weight_norm: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        self._check("madafm_weight", weight_norm, gamma, beta)
        return _kernels.madafm_weight(weight_norm, gamma, beta)

    @_interpreter_in_float32
    def madafm_weight_backward(self, grad_weight: Tensor, weight_norm: Tensor) -> tuple[Tensor, Tensor]:
        self._check("madafm_weight_backward", grad_weight, weight_norm)
        return _kernels.madafm_weight_backward(grad_weight, weight_norm)

    # -- convolution -------------------------------------------------------------------------
    @_interpreter_in_float32
    def modulated_conv2d(
        self, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
        task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    ) -> Tensor:
        self._check("modulated_conv2d", x, weight_norm, gamma, beta, bias, task_ids)
        g, b, c = self._stacked(gamma, beta, bias, task_ids)
        groups = self._groups(task_ids, g.shape[0], x.shape[0], x.device)
        return _kernels.conv2d_forward(x, weight_norm, g, b, c, groups, list(stride), list(padding), list(dilation))

    @_interpreter_in_float32
    def modulated_conv2d_backward(
        self, grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor,
        bias: Optional[Tensor], task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], output_mask: Sequence[bool],
    ) -> Grads:
        self._check("modulated_conv2d_backward", grad_out, x, weight_norm, gamma, beta, bias, task_ids)
        g, b, c = self._stacked(gamma, beta, bias, task_ids)
        groups = self._groups(task_ids, g.shape[0], x.shape[0], x.device)
        grads = _kernels.conv2d_backward(
            grad_out, x, weight_norm, g, b, c, groups, list(stride), list(padding), list(dilation),
            list(output_mask),
        )
        return self._unstacked(grads, task_ids)

    # -- convolution with low-rank styles (gmem::modulated_conv2d_lowrank) ------------------
    @staticmethod
    def _stacked_factors(factors, task_ids):
        """Single-task factors ``u [O, r], s [r], v [I, r]`` as stacks of one task (views)."""
        return tuple(factors) if task_ids is not None else tuple(f.unsqueeze(0) for f in factors)

    @_interpreter_in_float32
    def modulated_conv2d_lowrank(
        self, x: Tensor, weight_norm: Tensor, gamma: tuple, beta: tuple, bias: Optional[Tensor],
        task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    ) -> Tensor:
        """``gamma, beta = (u, s, v)`` factors (``[(T,) O, r], [(T,) r], [(T,) I, r]``), rebuilt in-kernel."""
        self._check("modulated_conv2d", x, weight_norm, *gamma, *beta, bias, task_ids)
        g, b = self._stacked_factors(gamma, task_ids), self._stacked_factors(beta, task_ids)
        c = bias if (task_ids is not None or bias is None) else bias.unsqueeze(0)
        groups = self._groups(task_ids, g[0].shape[0], x.shape[0], x.device)
        return _kernels.conv2d_lowrank_forward(x, weight_norm, g, b, c, groups, list(stride), list(padding),
                                               list(dilation))

    @_interpreter_in_float32
    def modulated_conv2d_lowrank_backward(
        self, grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: tuple, beta: tuple,
        bias: Optional[Tensor], task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], output_mask: Sequence[bool],
    ):
        """``(dx, (du, ds, dv) | None, (du, ds, dv) | None, dbias)`` shaped like the inputs."""
        self._check("modulated_conv2d_backward", grad_out, x, weight_norm, *gamma, *beta, bias, task_ids)
        g, b = self._stacked_factors(gamma, task_ids), self._stacked_factors(beta, task_ids)
        c = bias if (task_ids is not None or bias is None) else bias.unsqueeze(0)
        groups = self._groups(task_ids, g[0].shape[0], x.shape[0], x.device)
        dx, dg, db, dc = _kernels.conv2d_lowrank_backward(
            grad_out, x, weight_norm, g, b, c, groups, list(stride), list(padding), list(dilation),
            list(output_mask),
        )
        if task_ids is None:
            dg = None if dg is None else tuple(t.squeeze(0) for t in dg)
            db = None if db is None else tuple(t.squeeze(0) for t in db)
            dc = None if dc is None else dc.squeeze(0)
        return dx, dg, db, dc

    # -- linear (mFiLM) ----------------------------------------------------------------------
    @_interpreter_in_float32
    def modulated_linear(
        self, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
        task_ids: Optional[Tensor],
    ) -> Tensor:
        self._check("modulated_linear", x, weight_norm, gamma, beta, bias, task_ids)
        g, b, c = self._stacked(gamma, beta, bias, task_ids)
        return _kernels.linear_forward(x, weight_norm, g, b, c, task_ids)

    @_interpreter_in_float32
    def modulated_linear_backward(
        self, grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor,
        bias: Optional[Tensor], task_ids: Optional[Tensor], output_mask: Sequence[bool],
        x_wn: Optional[Tensor] = None,  # never produced here: the fused kernel recomputes its tiles
    ) -> Grads:
        self._check("modulated_linear_backward", grad_out, x, weight_norm, gamma, beta, bias, task_ids)
        g, b, c = self._stacked(gamma, beta, bias, task_ids)
        groups = self._groups(task_ids, g.shape[0], x.shape[0], x.device)
        grads = _kernels.linear_backward(grad_out, x, weight_norm, g, b, c, task_ids, groups, list(output_mask))
        return self._unstacked(grads, task_ids)


register_backend(TritonBackend(), priority=30)
