"""gmem::modulated_conv2d_lowrank: the conv with gamma/beta as LowRank factors (u [*, O, r],
s [*, r], v [*, I, r]), taken only for backends with ``supports_lowrank = True`` (see
functional.modulated_conv2d), whose kernels rebuild the style blocks from the factors instead of
densifying every task. Called as the dense ops are (:mod:`gmem.ops._op_paths`); its double backward
goes through the dense reference formulas and :func:`gmem.ops.lowrank.lowrank_factor_grads`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _fakes, reference
from ._op_paths import call, eager_function, or_empty, or_none
from .backends import get_backend
from .lowrank import lowrank_dense, lowrank_factor_grads

__all__ = ["modulated_conv2d_lowrank", "modulated_conv2d_lowrank_op", "modulated_conv2d_lowrank_backward_op"]


@torch.library.custom_op("gmem::modulated_conv2d_lowrank", mutates_args=())
def modulated_conv2d_lowrank_op(
    x: Tensor, weight_norm: Tensor, gamma_u: Tensor, gamma_s: Tensor, gamma_v: Tensor,
    beta_u: Tensor, beta_s: Tensor, beta_v: Tensor, bias: Optional[Tensor], task_ids: Optional[Tensor],
    stride: list[int], padding: list[int], dilation: list[int], backend: str,
) -> Tensor:
    return get_backend(backend).modulated_conv2d_lowrank(
        x, weight_norm, (gamma_u, gamma_s, gamma_v), (beta_u, beta_s, beta_v), bias, task_ids,
        stride, padding, dilation,
    )


@torch.library.custom_op("gmem::modulated_conv2d_lowrank_backward", mutates_args=())
def modulated_conv2d_lowrank_backward_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma_u: Tensor, gamma_s: Tensor, gamma_v: Tensor,
    beta_u: Tensor, beta_s: Tensor, beta_v: Tensor, bias: Optional[Tensor], task_ids: Optional[Tensor],
    stride: list[int], padding: list[int], dilation: list[int], output_mask: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, du, ds, dv of gamma, du, ds, dv of beta, dbias)``; ``output_mask = (x, gamma, beta, bias)``."""
    gamma, beta = (gamma_u, gamma_s, gamma_v), (beta_u, beta_s, beta_v)
    dx, dgamma, dbeta, dbias = get_backend(backend).modulated_conv2d_lowrank_backward(
        grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
    )
    dgamma = dgamma if dgamma is not None else (None, None, None)
    dbeta = dbeta if dbeta is not None else (None, None, None)
    return (
        or_empty(dx, x),
        *(or_empty(g, like) for g, like in zip(dgamma, gamma)),
        *(or_empty(g, like) for g, like in zip(dbeta, beta)),
        or_empty(dbias, x),
    )


def _conv_lowrank_setup(ctx, inputs, output):
    x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids)
    ctx.conv_args = (stride, padding, dilation)
    ctx.backend = backend


def _conv_lowrank_backward(ctx, grad_out):
    x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need = ctx.needs_input_grad
    mask = [need[0], any(need[2:5]), any(need[5:8]), bias is not None and need[8]]
    if torch.is_grad_enabled():  # double backward: differentiable formulas through the dense value
        dx, dgamma, dbeta, dbias = reference.modulated_conv2d_backward(
            grad_out, x, weight_norm, lowrank_dense(gu, gs, gv), lowrank_dense(bu, bs, bv), bias,
            task_ids, stride, padding, dilation, mask,
        )
        g_grads = lowrank_factor_grads(dgamma, gu, gs, gv) if mask[1] else (None,) * 3
        b_grads = lowrank_factor_grads(dbeta, bu, bs, bv) if mask[2] else (None,) * 3
    elif getattr(ctx, "direct", False):
        dx, g_grads, b_grads, dbias = get_backend(ctx.backend).modulated_conv2d_lowrank_backward(
            grad_out.contiguous(), x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids,
            stride, padding, dilation, mask,
        )
        dx, dbias = or_none(dx, mask[0]), or_none(dbias, mask[3])
        g_grads = g_grads if (mask[1] and g_grads is not None) else (None,) * 3
        b_grads = b_grads if (mask[2] and b_grads is not None) else (None,) * 3
    else:
        grads = modulated_conv2d_lowrank_backward_op(
            grad_out.contiguous(), x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids,
            stride, padding, dilation, mask, ctx.backend,
        )
        dx = or_none(grads[0], mask[0])
        g_grads = tuple(or_none(g, mask[1]) for g in grads[1:4])
        b_grads = tuple(or_none(g, mask[2]) for g in grads[4:7])
        dbias = or_none(grads[7], mask[3])
    return (dx, None, *g_grads, *b_grads, dbias, None, None, None, None, None)


modulated_conv2d_lowrank_op.register_fake(_fakes.modulated_conv2d_lowrank)
modulated_conv2d_lowrank_backward_op.register_fake(_fakes.modulated_conv2d_lowrank_backward(contiguous=False))
modulated_conv2d_lowrank_op.register_autograd(_conv_lowrank_backward, setup_context=_conv_lowrank_setup)
_ModulatedConv2dLowRank = eager_function(
    "modulated_conv2d_lowrank",
    lambda x, wn, gu, gs, gv, bu, bs, bv, *rest: get_backend(rest[-1]).modulated_conv2d_lowrank(
        x, wn, (gu, gs, gv), (bu, bs, bv), *rest[:-1]
    ),
    _conv_lowrank_setup, _conv_lowrank_backward,
)


def modulated_conv2d_lowrank(x, weight_norm, gamma_u, gamma_s, gamma_v, beta_u, beta_s, beta_v, bias, task_ids,
                             stride, padding, dilation, backend: str) -> Tensor:
    """gmem::modulated_conv2d_lowrank on canonical arguments, by the path :func:`gmem.ops._op_paths.direct` picks."""
    return call(_ModulatedConv2dLowRank, modulated_conv2d_lowrank_op, x, weight_norm, gamma_u, gamma_s, gamma_v,
                beta_u, beta_s, beta_v, bias, task_ids, stride, padding, dilation, backend)

