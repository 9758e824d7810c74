"""Output shapes of the gmem ops, written once: the fake (meta) implementations that torch.compile
and ``opcheck`` use, for the public ``gmem::`` ops (:mod:`gmem.ops.library`) and the compiled
``gmem_ext::`` ops (:mod:`gmem.ops._cpp_backend`) alike.

Both op families take the same leading arguments; a ``gmem::`` op adds the backend name last and
``gmem_ext::modulated_linear_backward`` an optional ``x_wn``. Neither changes a shape, so each fake
takes them as ``*_``.

Gradients of a backward op that were not asked for (``output_mask``) are empty ``[0]`` tensors (a
custom op cannot return None). ``contiguous`` says how the gradients are laid out: ``True`` (the
compiled kernels) gives fresh contiguous tensors, ``False`` (the public ops, whose backend may hand
back autograd's gradients) tensors laid out like the inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one spatial axis of a convolution (as ``F.conv2d`` computes it)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _like(t: Tensor, wanted: bool, empty_of: Tensor, contiguous: bool) -> Tensor:
    # an unwanted gradient is empty like what the op itself returns: the public ops' or_empty takes
    # the input it stands for, the kernels take x (same dtype and device either way: both check it)
    if not wanted:
        return empty_of.new_empty((0,))
    return torch.empty_like(t, memory_format=torch.contiguous_format) if contiguous else torch.empty_like(t)


# ---------------------------------------------------------------------------------------------
# One fake per op. Shapes: weight_norm [O, I, kh, kw] (conv) or [O, I] (linear), gamma/beta
# [(T,) O, I], x [N, I, H, W] or [N, I].
# ---------------------------------------------------------------------------------------------
def madafm_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor, *_) -> Tensor:
    """``[(T,) O, I, kh, kw]``."""
    return weight_norm.new_empty((*gamma.shape[:-2], *weight_norm.shape))


def madafm_weight_backward(grad_weight: Tensor, weight_norm: Tensor, *_) -> tuple[Tensor, Tensor]:
    """``dgamma, dbeta``: ``[(T,) O, I]`` each."""
    shape = grad_weight.shape[:-2]
    return grad_weight.new_empty(shape), grad_weight.new_empty(shape)


def modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, *_) -> Tensor:
    """``[N, O, H_out, W_out]``."""
    kh, kw = weight_norm.shape[-2:]
    h = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight_norm.shape[0], h, w))


def modulated_conv2d_lowrank(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation,
                             *_) -> Tensor:
    """``[N, O, H_out, W_out]``, as :func:`modulated_conv2d`."""
    return modulated_conv2d(x, weight_norm, None, None, bias, task_ids, stride, padding, dilation)


def modulated_linear(x, weight_norm, gamma, beta, bias, task_ids, *_) -> Tensor:
    """``[N, O]``."""
    return x.new_empty((x.shape[0], weight_norm.shape[0]))


def modulated_linear_forward(x, weight_norm, gamma, beta, bias, task_ids, *_) -> tuple[Tensor, Tensor]:
    """``out, x_wn``: ``[N, O]`` each."""
    shape = (x.shape[0], weight_norm.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def grads(x: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor], output_mask: Sequence[bool],
          contiguous: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta, dbias)`` of a dense backward op, shaped like the inputs or empty."""
    need_x, need_gamma, need_beta, need_bias = output_mask
    return (
        _like(x, need_x, x, contiguous),
        _like(gamma, need_gamma, gamma if not contiguous else x, contiguous),
        _like(beta, need_beta, beta if not contiguous else x, contiguous),
        _like(bias, True, x, contiguous) if (need_bias and bias is not None) else x.new_empty((0,)),
    )


def lowrank_grads(x: Tensor, gamma: Sequence[Tensor], beta: Sequence[Tensor], bias: Optional[Tensor],
                  output_mask: Sequence[bool], contiguous: bool) -> tuple[Tensor, ...]:
    """``(dx, du, ds, dv of gamma, du, ds, dv of beta, dbias)`` of the low-rank backward op."""
    need_x, need_gamma, need_beta, need_bias = output_mask
    return (
        _like(x, need_x, x, contiguous),
        *(_like(f, need_gamma, f if not contiguous else x, contiguous) for f in gamma),
        *(_like(f, need_beta, f if not contiguous else x, contiguous) for f in beta),
        _like(bias, True, x, contiguous) if (need_bias and bias is not None) else x.new_empty((0,)),
    )


def modulated_conv2d_backward(contiguous: bool):
    """The fake of a ``modulated_conv2d_backward`` op (see the module docstring for ``contiguous``)."""
    def fake(grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask, *_):
        return grads(x, gamma, beta, bias, output_mask, contiguous)
    return fake


def modulated_linear_backward(contiguous: bool):
    """The fake of a ``modulated_linear_backward`` op."""
    def fake(grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask, *_):
        return grads(x, gamma, beta, bias, output_mask, contiguous)
    return fake


def modulated_conv2d_lowrank_backward(contiguous: bool):
    """The fake of a ``modulated_conv2d_lowrank_backward`` op."""
    def fake(grad_out, x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation,
             output_mask, *_):
        return lowrank_grads(x, (gu, gs, gv), (bu, bs, bv), bias, output_mask, contiguous)
    return fake
