"""The gmem ops as ``torch.library`` custom ops: schema, fake implementation, autograd.

Each op takes the concrete backend name as its last argument and forwards to that backend, so one
op definition serves every backend; autograd, fake tensors (torch.compile, opcheck) and the
backward wiring are written once, here.

How a public function reaches its backend (the custom op under torch.compile, a
``torch.autograd.Function`` in eager mode) and the Autocast kernels: :mod:`gmem.ops._op_paths`. The
low-rank conv: :mod:`gmem.ops._lowrank_op`. Output shapes (fakes): :mod:`gmem.ops._fakes`. Two eager
refinements: where a backend's op carries its own autograd (``Backend.native_autograd``, e.g. the
C++ ``madafm_weight``) it is called with no Python node at all; and the linear keeps what the
backend's forward hands over for its backward (``x_wn = x @ Wn^T``, one GEMM fewer).

Backward: first-order gradients go through the backward of the same backend (a fused kernel where
the backend has one). When autograd records the backward itself (``create_graph=True``, e.g. the
R1 penalty of GAN training), the gradients are computed with the differentiable reference formulas
instead, so double backward works with every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _fakes, reference
from ._lowrank_op import _ModulatedConv2dLowRank, modulated_conv2d_lowrank, modulated_conv2d_lowrank_op  # noqa: F401
from ._op_paths import backward_of, call, eager_function, or_empty, or_none, register_autocast
from .backends import get_backend
from .lowrank import lowrank_factor_grads  # noqa: F401  (defined here before; kept importable)

__all__ = [
    "madafm_weight", "modulated_conv2d", "modulated_conv2d_lowrank", "modulated_linear",
    "madafm_weight_op", "modulated_conv2d_op", "modulated_conv2d_lowrank_op", "modulated_linear_op",
]


# ---------------------------------------------------------------------------------------------
# madafm_weight
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gmem::madafm_weight", mutates_args=())
def madafm_weight_op(weight_norm: Tensor, gamma: Tensor, beta: Tensor, backend: str) -> Tensor:
    return get_backend(backend).madafm_weight(weight_norm, gamma, beta)


@torch.library.custom_op("gmem::madafm_weight_backward", mutates_args=())
def madafm_weight_backward_op(grad_weight: Tensor, weight_norm: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dgamma, dbeta = get_backend(backend).madafm_weight_backward(grad_weight, weight_norm)
    return dgamma, dbeta


def _madafm_setup(ctx, inputs, output):
    weight_norm, gamma, beta, backend = inputs
    ctx.save_for_backward(weight_norm)
    ctx.backend = backend


def _madafm_backward(ctx, grad_weight):
    (weight_norm,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        dgamma, dbeta = reference.madafm_weight_backward(grad_weight, weight_norm)
    else:
        dgamma, dbeta = backward_of(
            ctx, madafm_weight_backward_op, "madafm_weight_backward", grad_weight.contiguous(), weight_norm
        )
    return None, dgamma, dbeta, None


madafm_weight_op.register_autograd(_madafm_backward, setup_context=_madafm_setup)
_MadafmWeight = eager_function(
    "madafm_weight", lambda wn, g, b, backend: get_backend(backend).madafm_weight(wn, g, b),
    _madafm_setup, _madafm_backward,
)


def madafm_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor, backend: str) -> Tensor:
    """gmem::madafm_weight on canonical arguments, by the path :func:`gmem.ops._op_paths.direct` picks."""
    impl = get_backend(backend)
    if "madafm_weight" in impl.native_autograd and not torch.compiler.is_compiling():
        return impl.madafm_weight(weight_norm, gamma, beta)  # records its own (C++) autograd node
    return call(_MadafmWeight, madafm_weight_op, weight_norm, gamma, beta, backend)


# ---------------------------------------------------------------------------------------------
# modulated_conv2d
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gmem::modulated_conv2d", mutates_args=())
def modulated_conv2d_op(
    x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], backend: str,
) -> Tensor:
    return get_backend(backend).modulated_conv2d(
        x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation
    )


@torch.library.custom_op("gmem::modulated_conv2d_backward", mutates_args=())
def modulated_conv2d_backward_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
    output_mask: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dgamma, dbeta, dbias = get_backend(backend).modulated_conv2d_backward(
        grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
    )
    return or_empty(dx, x), or_empty(dgamma, gamma), or_empty(dbeta, beta), or_empty(dbias, x)


def _conv_setup(ctx, inputs, output):
    x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, weight_norm, gamma, beta, bias, task_ids)
    ctx.conv_args = (stride, padding, dilation)
    ctx.backend = backend


def _conv_backward(ctx, grad_out):
    x, weight_norm, gamma, beta, bias, task_ids = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need = ctx.needs_input_grad
    mask = [need[0], need[2], need[3], bias is not None and need[4]]
    if torch.is_grad_enabled():  # double backward: differentiable formulas
        dx, dgamma, dbeta, dbias = reference.modulated_conv2d_backward(
            grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, mask
        )
    else:
        grads = backward_of(
            ctx, modulated_conv2d_backward_op, "modulated_conv2d_backward", grad_out.contiguous(), x,
            weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, mask,
        )
        dx, dgamma, dbeta, dbias = (or_none(g, m) for g, m in zip(grads, mask))
    return dx, None, dgamma, dbeta, dbias, None, None, None, None, None


modulated_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)
_ModulatedConv2d = eager_function(
    "modulated_conv2d", lambda *args: get_backend(args[-1]).modulated_conv2d(*args[:-1]),
    _conv_setup, _conv_backward,
)


def modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, backend: str) -> Tensor:
    """gmem::modulated_conv2d on canonical arguments, by the path :func:`gmem.ops._op_paths.direct` picks."""
    return call(_ModulatedConv2d, modulated_conv2d_op, x, weight_norm, gamma, beta, bias, task_ids, stride,
                padding, dilation, backend)


# ---------------------------------------------------------------------------------------------
# modulated_linear
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gmem::modulated_linear", mutates_args=())
def modulated_linear_op(
    x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], backend: str,
) -> Tensor:
    return get_backend(backend).modulated_linear(x, weight_norm, gamma, beta, bias, task_ids)


@torch.library.custom_op("gmem::modulated_linear_backward", mutates_args=())
def modulated_linear_backward_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], output_mask: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dgamma, dbeta, dbias = get_backend(backend).modulated_linear_backward(
        grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask
    )
    return or_empty(dx, x), or_empty(dgamma, gamma), or_empty(dbeta, beta), or_empty(dbias, x)


def _linear_setup(ctx, inputs, output, x_wn: Optional[Tensor] = None):
    x, weight_norm, gamma, beta, bias, task_ids, backend = inputs
    # x_wn = x @ weight_norm^T from the forward, if the backend handed it over (eager path only)
    ctx.save_for_backward(x, weight_norm, gamma, beta, bias, task_ids, x_wn)
    ctx.backend = backend


def _linear_backward(ctx, grad_out):
    x, weight_norm, gamma, beta, bias, task_ids, x_wn = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[2], need[3], bias is not None and need[4]]
    if torch.is_grad_enabled():
        dx, dgamma, dbeta, dbias = reference.modulated_linear_backward(
            grad_out, x, weight_norm, gamma, beta, bias, task_ids, mask
        )
    else:
        grads = backward_of(
            ctx, modulated_linear_backward_op, "modulated_linear_backward", grad_out.contiguous(), x, weight_norm,
            gamma, beta, bias, task_ids, mask, x_wn=x_wn,
        )
        dx, dgamma, dbeta, dbias = (or_none(g, m) for g, m in zip(grads, mask))
    return dx, None, dgamma, dbeta, dbias, None, None


modulated_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


class _ModulatedLinear(torch.autograd.Function):
    """The autograd.Function path of modulated_linear (see the module docstring). Unlike the other
    ops it keeps what the backend's forward hands over for the backward (``x_wn``, saving a GEMM)."""

    @staticmethod
    def forward(ctx, *inputs):
        output, x_wn = get_backend(inputs[-1]).modulated_linear_forward(*inputs[:-1])
        _linear_setup(ctx, inputs, output, x_wn)
        ctx.direct = True
        return output

    backward = staticmethod(_linear_backward)

    @staticmethod
    def forward_only(*inputs):
        return get_backend(inputs[-1]).modulated_linear(*inputs[:-1])


def modulated_linear(x, weight_norm, gamma, beta, bias, task_ids, backend: str) -> Tensor:
    """gmem::modulated_linear on canonical arguments, by the path :func:`gmem.ops._op_paths.direct` picks."""
    return call(_ModulatedLinear, modulated_linear_op, x, weight_norm, gamma, beta, bias, task_ids, backend)


# The fakes, one per op, shared with the compiled gmem_ext ops (gmem.ops._fakes)
madafm_weight_op.register_fake(_fakes.madafm_weight)
madafm_weight_backward_op.register_fake(_fakes.madafm_weight_backward)
modulated_conv2d_op.register_fake(_fakes.modulated_conv2d)
modulated_conv2d_backward_op.register_fake(_fakes.modulated_conv2d_backward(contiguous=False))
modulated_linear_op.register_fake(_fakes.modulated_linear)
modulated_linear_backward_op.register_fake(_fakes.modulated_linear_backward(contiguous=False))

for _op in (madafm_weight_op, modulated_conv2d_op, modulated_conv2d_lowrank_op, modulated_linear_op):
    register_autocast(_op)
