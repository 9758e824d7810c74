"""The gmem ops as ``torch.library`` custom ops: schema, fake implementation, autograd.

Each op takes the concrete backend name as its last argument and forwards to that backend, so one
op definition serves every backend; autograd, fake tensors (torch.compile, opcheck) and the
backward wiring are written once, here.

Two ways in, one set of autograd rules. Under torch.compile (and for ``opcheck``) the public
functions call the custom ops, which compile treats as opaque calls with fake implementations. In
eager mode they call the backend inside a ``torch.autograd.Function`` built from the same setup and
backward functions: the custom-op boundary costs ~25 us a call (measured on the 2-core CPU machine
at a forward+backward), which is most of the time of a small layer. A backend whose methods dynamo
can trace (``Backend.traceable``, e.g. Triton through ``torch.library.triton_op``) takes the
``autograd.Function`` under torch.compile too, so that compile sees its kernels. Two eager
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

from . import reference
from .backends import get_backend

__all__ = [
    "madafm_weight", "modulated_conv2d", "modulated_conv2d_lowrank", "modulated_linear",
    "madafm_weight_op", "modulated_conv2d_op", "modulated_conv2d_lowrank_op", "modulated_linear_op",
]


def _empty(like: Tensor) -> Tensor:
    # custom ops cannot return None: a gradient that was not asked for is an empty tensor
    return like.new_empty((0,))


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return _empty(like) if grad is None else grad


def _or_none(grad: Tensor, wanted: bool) -> Optional[Tensor]:
    return grad if wanted else None


def _fake_grads(x, gamma, beta, bias, output_mask):
    """Fake ``(dx, dgamma, dbeta, dbias)`` of a backward op: input shapes, or empty where not asked."""
    need_x, need_gamma, need_beta, need_bias = output_mask
    return (
        torch.empty_like(x) if need_x else _empty(x),
        torch.empty_like(gamma) if need_gamma else _empty(gamma),
        torch.empty_like(beta) if need_beta else _empty(beta),
        torch.empty_like(bias) if (need_bias and bias is not None) else _empty(x),
    )


def _direct(backend: str) -> bool:
    """Whether the public op calls ``backend`` through an autograd.Function (True) or its custom op."""
    if not torch.compiler.is_compiling():
        return True
    return get_backend(backend).traceable


def _backward_of(ctx, custom_op, method: str, *args, **direct_kwargs):
    """First-order gradients from the backend: directly on the autograd.Function path (with
    ``direct_kwargs``, what only that path has, e.g. the linear's ``x_wn``), else its op."""
    if getattr(ctx, "direct", False):
        return getattr(get_backend(ctx.backend), method)(*args, **direct_kwargs)
    return custom_op(*args, ctx.backend)


def _eager_function(name: str, forward, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` with the forward, setup and backward of a custom op.

    ``forward(ctx, *inputs)`` style on purpose: with a separate ``setup_context`` staticmethod,
    ``Function.apply`` binds its arguments through ``inspect.signature`` on every call (~20 us).
    """

    def forward_with_setup(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.direct = True
        return output

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"The autograd.Function path of {name} (see the module docstring).",
        "forward": staticmethod(forward_with_setup),
        "backward": staticmethod(backward),
        "forward_only": staticmethod(forward),
    })


def _call(function: type, custom_op, *args):
    """The public op on canonical ``args`` (backend name last), by the path :func:`_direct` picks:
    the custom op, the autograd.Function, or with grad mode off (sampling, replay) the backend's
    forward alone, since there is no autograd node to record."""
    if not _direct(args[-1]):
        return custom_op(*args)
    if not torch.is_grad_enabled():
        return function.forward_only(*args)
    return function.apply(*args)


# ---------------------------------------------------------------------------------------------
# madafm_weight
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gmem::madafm_weight", mutates_args=())
def madafm_weight_op(weight_norm: Tensor, gamma: Tensor, beta: Tensor, backend: str) -> Tensor:
    return get_backend(backend).madafm_weight(weight_norm, gamma, beta)


@madafm_weight_op.register_fake
def _(weight_norm, gamma, beta, backend):
    return weight_norm.new_empty((*gamma.shape[:-2], *weight_norm.shape))


@torch.library.custom_op("gmem::madafm_weight_backward", mutates_args=())
def madafm_weight_backward_op(grad_weight: Tensor, weight_norm: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dgamma, dbeta = get_backend(backend).madafm_weight_backward(grad_weight, weight_norm)
    return dgamma, dbeta


@madafm_weight_backward_op.register_fake
def _(grad_weight, weight_norm, backend):
    shape = grad_weight.shape[:-2]
    return grad_weight.new_empty(shape), grad_weight.new_empty(shape)


def _madafm_setup(ctx, inputs, output):
    weight_norm, gamma, beta, backend = inputs
    ctx.save_for_backward(weight_norm)
    ctx.backend = backend


def _madafm_backward(ctx, grad_weight):
    (weight_norm,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        dgamma, dbeta = reference.madafm_weight_backward(grad_weight, weight_norm)
    else:
        dgamma, dbeta = _backward_of(
            ctx, madafm_weight_backward_op, "madafm_weight_backward", grad_weight.contiguous(), weight_norm
        )
    return None, dgamma, dbeta, None


madafm_weight_op.register_autograd(_madafm_backward, setup_context=_madafm_setup)
_MadafmWeight = _eager_function(
    "madafm_weight", lambda wn, g, b, backend: get_backend(backend).madafm_weight(wn, g, b),
    _madafm_setup, _madafm_backward,
)


def madafm_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor, backend: str) -> Tensor:
    """gmem::madafm_weight on canonical arguments, by the path :func:`_direct` picks."""
    impl = get_backend(backend)
    if "madafm_weight" in impl.native_autograd and not torch.compiler.is_compiling():
        return impl.madafm_weight(weight_norm, gamma, beta)  # records its own (C++) autograd node
    return _call(_MadafmWeight, madafm_weight_op, weight_norm, gamma, beta, backend)


# ---------------------------------------------------------------------------------------------
# modulated_conv2d
# ---------------------------------------------------------------------------------------------
def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.custom_op("gmem::modulated_conv2d", mutates_args=())
def modulated_conv2d_op(
    x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], backend: str,
) -> Tensor:
    return get_backend(backend).modulated_conv2d(
        x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation
    )


@modulated_conv2d_op.register_fake
def _(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, backend):
    kh, kw = weight_norm.shape[-2:]
    h = _conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = _conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight_norm.shape[0], h, w))


@torch.library.custom_op("gmem::modulated_conv2d_backward", mutates_args=())
def modulated_conv2d_backward_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
    output_mask: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dgamma, dbeta, dbias = get_backend(backend).modulated_conv2d_backward(
        grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
    )
    return _or_empty(dx, x), _or_empty(dgamma, gamma), _or_empty(dbeta, beta), _or_empty(dbias, x)


@modulated_conv2d_backward_op.register_fake
def _(grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask, backend):
    return _fake_grads(x, gamma, beta, bias, output_mask)


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
        grads = _backward_of(
            ctx, modulated_conv2d_backward_op, "modulated_conv2d_backward", grad_out.contiguous(), x,
            weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, mask,
        )
        dx, dgamma, dbeta, dbias = (_or_none(g, m) for g, m in zip(grads, mask))
    return dx, None, dgamma, dbeta, dbias, None, None, None, None, None


modulated_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)
_ModulatedConv2d = _eager_function(
    "modulated_conv2d", lambda *args: get_backend(args[-1]).modulated_conv2d(*args[:-1]),
    _conv_setup, _conv_backward,
)


def modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, backend: str) -> Tensor:
    """gmem::modulated_conv2d on canonical arguments, by the path :func:`_direct` picks."""
    return _call(_ModulatedConv2d, modulated_conv2d_op, x, weight_norm, gamma, beta, bias, task_ids, stride,
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


@modulated_linear_op.register_fake
def _(x, weight_norm, gamma, beta, bias, task_ids, backend):
    return x.new_empty((x.shape[0], weight_norm.shape[0]))


@torch.library.custom_op("gmem::modulated_linear_backward", mutates_args=())
def modulated_linear_backward_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor], output_mask: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dgamma, dbeta, dbias = get_backend(backend).modulated_linear_backward(
        grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask
    )
    return _or_empty(dx, x), _or_empty(dgamma, gamma), _or_empty(dbeta, beta), _or_empty(dbias, x)


@modulated_linear_backward_op.register_fake
def _(grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask, backend):
    return _fake_grads(x, gamma, beta, bias, output_mask)


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
        grads = _backward_of(
            ctx, modulated_linear_backward_op, "modulated_linear_backward", grad_out.contiguous(), x, weight_norm,
            gamma, beta, bias, task_ids, mask, x_wn=x_wn,
        )
        dx, dgamma, dbeta, dbias = (_or_none(g, m) for g, m in zip(grads, mask))
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
    """gmem::modulated_linear on canonical arguments, by the path :func:`_direct` picks."""
    return _call(_ModulatedLinear, modulated_linear_op, x, weight_norm, gamma, beta, bias, task_ids, backend)


# ---------------------------------------------------------------------------------------------
# modulated_conv2d_lowrank: gamma/beta as LowRank factors (u [*, O, r], s [*, r], v [*, I, r]),
# taken only for backends with ``supports_lowrank = True`` (see functional.modulated_conv2d), whose
# kernels rebuild the style blocks from the factors instead of densifying every task.
# ---------------------------------------------------------------------------------------------
def _lowrank_dense(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    return (u * s.unsqueeze(-2)) @ v.transpose(-1, -2)


def lowrank_factor_grads(dense_grad: Tensor, u: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(du, ds, dv)`` of ``G = u diag(s) v^T`` from ``dG`` (docs/design.md, section 4; differentiable)."""
    dg_v = dense_grad @ v  # [*, O, r]
    du = dg_v * s.unsqueeze(-2)
    dv = (dense_grad.transpose(-1, -2) @ u) * s.unsqueeze(-2)
    ds = (dg_v * u).sum(-2)
    return du, ds, dv


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


@modulated_conv2d_lowrank_op.register_fake
def _(x, weight_norm, gamma_u, gamma_s, gamma_v, beta_u, beta_s, beta_v, bias, task_ids, stride, padding, dilation, backend):
    kh, kw = weight_norm.shape[-2:]
    h = _conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = _conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight_norm.shape[0], h, w))


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
        _or_empty(dx, x),
        *(_or_empty(g, like) for g, like in zip(dgamma, gamma)),
        *(_or_empty(g, like) for g, like in zip(dbeta, beta)),
        _or_empty(dbias, x),
    )


@modulated_conv2d_lowrank_backward_op.register_fake
def _(grad_out, x, weight_norm, gamma_u, gamma_s, gamma_v, beta_u, beta_s, beta_v, bias, task_ids,
      stride, padding, dilation, output_mask, backend):
    need_x, need_gamma, need_beta, need_bias = output_mask
    return (
        torch.empty_like(x) if need_x else _empty(x),
        *(torch.empty_like(f) if need_gamma else _empty(f) for f in (gamma_u, gamma_s, gamma_v)),
        *(torch.empty_like(f) if need_beta else _empty(f) for f in (beta_u, beta_s, beta_v)),
        torch.empty_like(bias) if (need_bias and bias is not None) else _empty(x),
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
            grad_out, x, weight_norm, _lowrank_dense(gu, gs, gv), _lowrank_dense(bu, bs, bv), bias,
            task_ids, stride, padding, dilation, mask,
        )
        g_grads = lowrank_factor_grads(dgamma, gu, gs, gv) if mask[1] else (None,) * 3
        b_grads = lowrank_factor_grads(dbeta, bu, bs, bv) if mask[2] else (None,) * 3
    elif getattr(ctx, "direct", False):
        dx, g_grads, b_grads, dbias = get_backend(ctx.backend).modulated_conv2d_lowrank_backward(
            grad_out.contiguous(), x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids,
            stride, padding, dilation, mask,
        )
        dx, dbias = _or_none(dx, mask[0]), _or_none(dbias, mask[3])
        g_grads = g_grads if (mask[1] and g_grads is not None) else (None,) * 3
        b_grads = b_grads if (mask[2] and b_grads is not None) else (None,) * 3
    else:
        grads = modulated_conv2d_lowrank_backward_op(
            grad_out.contiguous(), x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids,
            stride, padding, dilation, mask, ctx.backend,
        )
        dx = _or_none(grads[0], mask[0])
        g_grads = tuple(_or_none(g, mask[1]) for g in grads[1:4])
        b_grads = tuple(_or_none(g, mask[2]) for g in grads[4:7])
        dbias = _or_none(grads[7], mask[3])
    return (dx, None, *g_grads, *b_grads, dbias, None, None, None, None, None)


modulated_conv2d_lowrank_op.register_autograd(_conv_lowrank_backward, setup_context=_conv_lowrank_setup)
_ModulatedConv2dLowRank = _eager_function(
    "modulated_conv2d_lowrank",
    lambda x, wn, gu, gs, gv, bu, bs, bv, *rest: get_backend(rest[-1]).modulated_conv2d_lowrank(
        x, wn, (gu, gs, gv), (bu, bs, bv), *rest[:-1]
    ),
    _conv_lowrank_setup, _conv_lowrank_backward,
)


def modulated_conv2d_lowrank(x, weight_norm, gamma_u, gamma_s, gamma_v, beta_u, beta_s, beta_v, bias, task_ids,
                             stride, padding, dilation, backend: str) -> Tensor:
    """gmem::modulated_conv2d_lowrank on canonical arguments, by the path :func:`_direct` picks."""
    return _call(_ModulatedConv2dLowRank, modulated_conv2d_lowrank_op, x, weight_norm, gamma_u, gamma_s, gamma_v,
                 beta_u, beta_s, beta_v, bias, task_ids, stride, padding, dilation, backend)


# ---------------------------------------------------------------------------------------------
# Autocast: the forward ops cast their floating-point inputs (not float64) to the autocast dtype of
# the device *at call time* (torch.library.register_autocast fixes one dtype per device, which would
# turn a bfloat16 autocast on CUDA into float16), then run below the Autocast dispatch key. The
# public functions in gmem.ops.functional apply the same cast before calling in.
# ---------------------------------------------------------------------------------------------
def _autocast_kernel(op, device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def cast(value, dtype):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device_type:
            return value.to(dtype)
        return value

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op._opoverload(*(cast(a, dtype) for a in args))

    op._lib.impl(op._name, kernel, "Autocast" + torch._C._dispatch_key_for_device(device_type), with_keyset=True)


for _op in (madafm_weight_op, modulated_conv2d_op, modulated_conv2d_lowrank_op, modulated_linear_op):
    for _device_type in ("cpu", "cuda"):
        _autocast_kernel(_op, _device_type)
