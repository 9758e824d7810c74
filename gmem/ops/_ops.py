"""The gmem ops: one ``torch.library`` namespace ``gmem``, one schema per op, no backend argument.

Every op is defined here once (bitsandbytes' ``_ops.py`` layout), with, once per op:

* its **fake** (meta) implementation, for torch.compile and ``opcheck``;
* its **autograd** (an ``Autograd`` kernel, for forward ops): it picks the backend for the call
  (:func:`gmem.ops.backends.current_backend`, i.e. ``use_backend``/``backend=``/``GMEM_BACKEND``/
  ``"auto"``), runs that backend's forward, and its backward runs that same backend's backward;
* its **Autocast** kernels (cpu, cuda);
* its **reference** kernel (``CompositeExplicitAutograd``): the pure-PyTorch formulas of
  :mod:`gmem.ops.reference`, the kernel where nothing else is registered for a device.

The compiled extension (``csrc/``) registers its C++ kernels on the same schemas for the ``CPU`` and
``CUDA`` dispatch keys (``TORCH_LIBRARY_IMPL(gmem, CPU | CUDA)`` in one file per op:
``csrc/madafm.cpp``, ``csrc/conv.cpp``, ``csrc/conv_lowrank.cpp``, ``csrc/linear.cpp``), and for
``madafm_weight`` a C++ Autograd kernel (``csrc/madafm.cpp``, the ``AutogradCPU``/``AutogradCUDA``
keys, so it shadows the one here on those devices): it runs the compiled kernels itself when the
public call chose the ``"cpu"``/``"cuda"`` backend (:func:`gmem.ops.backends.call_with` says so) and
calls this module's kernel (:func:`python_autograd`) otherwise. :class:`DeviceKernels` (the
``"cpu"``/``"cuda"`` backends) calls the op below autograd, which reaches those kernels; the
``"reference"`` and ``"triton"`` backends run their Python implementations. Eager calls and
torch.compile take this one path: the public functions of :mod:`gmem.ops.functional` call
``torch.ops.gmem.*``, and compile traces the same op (AOT autograd runs its Autograd kernel with
fake tensors). See docs/design.md, "Op architecture".

Backward ops (``*_backward``) have no autograd: first-order gradients come from the backend's
backward (a fused kernel where there is one); when autograd records the backward itself
(``create_graph=True``, e.g. the R1 penalty) the gradients are computed with the differentiable
reference formulas instead, so double backward works with every backend. Gradients that
``output_mask`` does not ask for are empty ``[0]`` tensors (an op cannot return None).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backends import Backend, Grads, get_backend, in_float32, resolve_backend
from .lowrank import lowrank_dense, lowrank_factor_grads

__all__ = ["SCHEMAS", "FORWARD_OPS", "DeviceKernels", "conv_out_size", "kernel_for", "op_names", "python_autograd"]

_LIB = torch.library.Library("gmem", "DEF")  # noqa: TOR901 - the namespace is this module's own

#: every op of the namespace, ``name -> schema``
SCHEMAS = {
    # gamma * weight_norm + beta: weight_norm [O, I, kh, kw], gamma/beta [O, I] | [T, O, I]
    "madafm_weight": "madafm_weight(Tensor weight_norm, Tensor gamma, Tensor beta) -> Tensor",
    # (dgamma, dbeta) = window sums of grad_weight * weight_norm and of grad_weight
    "madafm_weight_backward": "madafm_weight_backward(Tensor grad_weight, Tensor weight_norm) -> (Tensor, Tensor)",
    "modulated_conv2d": (
        "modulated_conv2d(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, Tensor? task_ids, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor"),
    # output_mask over (x, gamma, beta, bias)
    "modulated_conv2d_backward": (
        "modulated_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, "
        "Tensor? bias, Tensor? task_ids, int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)"),
    # low-rank styles gamma = gamma_u diag(gamma_s) gamma_v^T (beta likewise): u [(T,) O, r], s [(T,) r], v [(T,) I, r]
    "modulated_conv2d_lowrank": (
        "modulated_conv2d_lowrank(Tensor x, Tensor weight_norm, Tensor gamma_u, Tensor gamma_s, Tensor gamma_v, "
        "Tensor beta_u, Tensor beta_s, Tensor beta_v, Tensor? bias, Tensor? task_ids, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor"),
    # (dx, du, ds, dv of gamma, du, ds, dv of beta, dbias); output_mask over (x, gamma, beta, bias)
    "modulated_conv2d_lowrank_backward": (
        "modulated_conv2d_lowrank_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma_u, "
        "Tensor gamma_s, Tensor gamma_v, Tensor beta_u, Tensor beta_s, Tensor beta_v, Tensor? bias, "
        "Tensor? task_ids, int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "modulated_linear": (
        "modulated_linear(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, "
        "Tensor? task_ids) -> Tensor"),
    # the output and x_wn = x @ weight_norm^T [M, O], which the backward would otherwise recompute
    "modulated_linear_forward": (
        "modulated_linear_forward(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, "
        "Tensor? task_ids) -> (Tensor, Tensor)"),
    "modulated_linear_backward": (
        "modulated_linear_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, "
        "Tensor? bias, Tensor? task_ids, bool[4] output_mask, Tensor? x_wn=None) -> (Tensor, Tensor, Tensor, Tensor)"),
}
#: the differentiable ops (the others are their backward halves)
FORWARD_OPS = ("madafm_weight", "modulated_conv2d", "modulated_conv2d_lowrank", "modulated_linear")

for _schema in SCHEMAS.values():
    _LIB.define(_schema)

# ---------------------------------------------------------------------------------------------
# The kernels registered for a device, called below autograd (the "cpu" and "cuda" backends)
# ---------------------------------------------------------------------------------------------
_OVERLOADS: dict = {}


def _call(op: str, *args):
    """``torch.ops.gmem.<op>`` below autograd: the kernel registered for the inputs' device (the
    op's Autograd kernel, below, is what called this)."""
    overload = _OVERLOADS.get(op)
    if overload is None:
        overload = _OVERLOADS[op] = getattr(torch.ops.gmem, op).default
    with torch._C._AutoDispatchBelowAutograd():  # noqa: SLF001
        return overload(*args)


def _none_unless(grads, mask) -> Grads:
    """The ops return empty tensors for gradients not asked for; the Backend API wants None."""
    return tuple(g if m else None for g, m in zip(grads, mask))  # type: ignore[return-value]


def _contiguous_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    # Mixed-task bias may be an expanded (stride-0) view of [O]
    return None if bias is None else bias.contiguous()


# the CPU kernels compute in float32/float64 (CUDA has its own low-precision kernels)
_cpu_in_float32 = in_float32(lambda backend, x: x is not None and x.device.type == "cpu")


class DeviceKernels(Backend):
    """The kernels registered on the ``gmem::`` ops for the device of the inputs, called below
    autograd: the C++/CUDA kernels where the extension registered them, else the reference.

    Also what a backend whose methods cannot be traced stands for under torch.compile (the op
    itself, in the graph; :mod:`gmem.ops._ops`). bfloat16/float16 arguments on the CPU are computed
    in float32 and rounded back (the CPU kernels compute in float32 and float64).
    """

    name = "device_kernels"
    #: LowRank gamma/beta of a conv go to the kernels as factors (gmem::modulated_conv2d_lowrank)
    supports_lowrank = True

    @_cpu_in_float32
    def madafm_weight(self, weight_norm, gamma, beta):
        return _call("madafm_weight", weight_norm, gamma, beta)

    @_cpu_in_float32
    def madafm_weight_backward(self, grad_weight, weight_norm):
        return tuple(_call("madafm_weight_backward", grad_weight, weight_norm))

    @_cpu_in_float32
    def modulated_conv2d(self, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation):
        return _call("modulated_conv2d",
            x, weight_norm, gamma, beta, _contiguous_bias(bias), task_ids, list(stride), list(padding), list(dilation)
        )

    @_cpu_in_float32
    def modulated_conv2d_backward(
        self, grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
    ):
        mask = [bool(m) for m in output_mask]
        mask[3] = mask[3] and bias is not None
        grads = _call("modulated_conv2d_backward",
            grad_out, x, weight_norm, gamma, beta, _contiguous_bias(bias), task_ids,
            list(stride), list(padding), list(dilation), mask,
        )
        return _none_unless(grads, mask)

    @_cpu_in_float32
    def modulated_conv2d_lowrank(self, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation):
        """``gamma, beta = (u, s, v)``: ``[(T,) O, r], [(T,) r], [(T,) I, r]``, rebuilt in the weight build."""
        return _call("modulated_conv2d_lowrank",
            x, weight_norm, *gamma, *beta, _contiguous_bias(bias), task_ids,
            list(stride), list(padding), list(dilation),
        )

    @_cpu_in_float32
    def modulated_conv2d_lowrank_backward(
        self, grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
    ):
        """``(dx, (du, ds, dv) | None, (du, ds, dv) | None, dbias)`` shaped like the inputs."""
        mask = [bool(m) for m in output_mask]
        mask[3] = mask[3] and bias is not None
        dx, *factor_grads, dbias = _call("modulated_conv2d_lowrank_backward",
            grad_out, x, weight_norm, *gamma, *beta, _contiguous_bias(bias), task_ids,
            list(stride), list(padding), list(dilation), mask,
        )
        return (
            dx if mask[0] else None,
            tuple(factor_grads[:3]) if mask[1] else None,
            tuple(factor_grads[3:]) if mask[2] else None,
            dbias if mask[3] else None,
        )

    @_cpu_in_float32
    def modulated_linear(self, x, weight_norm, gamma, beta, bias, task_ids):
        return _call("modulated_linear", x, weight_norm, gamma, beta, _contiguous_bias(bias), task_ids)

    @_cpu_in_float32
    def modulated_linear_forward(self, x, weight_norm, gamma, beta, bias, task_ids):
        return _call("modulated_linear_forward", x, weight_norm, gamma, beta, _contiguous_bias(bias), task_ids)

    @_cpu_in_float32
    def modulated_linear_backward(self, grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask,
                                  x_wn=None):
        mask = [bool(m) for m in output_mask]
        mask[3] = mask[3] and bias is not None
        grads = _call("modulated_linear_backward",
            grad_out, x, weight_norm, gamma, beta, _contiguous_bias(bias), task_ids, mask, x_wn
        )
        return _none_unless(grads, mask)


_DEVICE_KERNELS = DeviceKernels()


def _tracing() -> bool:
    """Whether the op runs on fake tensors (torch.compile tracing it, opcheck)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None  # noqa: SLF001


def _route(x: Tensor) -> Backend:
    """The backend that computes this call (see :func:`gmem.ops.backends.current_backend`).

    While the op is traced, a backend whose methods cannot be (``traceable = False``) is the op
    itself in the graph, computed by the kernel registered for the device (:class:`DeviceKernels`).
    Meta tensors have no values: their kernels are the ops' fakes (shapes only), whatever the backend.
    """
    if x.device.type == "meta":
        return _DEVICE_KERNELS
    impl = get_backend(resolve_backend(None, x.device, x.dtype, "gmem"))
    if not impl.traceable and _tracing():
        return _DEVICE_KERNELS
    return impl


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if grad is None else grad


def _or_none(grad: Optional[Tensor], wanted: bool) -> Optional[Tensor]:
    return grad if wanted else None


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# madafm_weight
# ---------------------------------------------------------------------------------------------
class _MadafmWeight(torch.autograd.Function):
    # forward(ctx, *inputs) with the context set inside: Function.apply then binds no signature
    @staticmethod
    def forward(ctx, impl, weight_norm, gamma, beta):
        ctx.impl = impl
        ctx.save_for_backward(weight_norm)
        return impl.madafm_weight(weight_norm, gamma, beta)

    @staticmethod
    def backward(ctx, grad_weight):
        (weight_norm,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable formulas
            dgamma, dbeta = reference.madafm_weight_backward(grad_weight, weight_norm)
        else:
            dgamma, dbeta = ctx.impl.madafm_weight_backward(grad_weight.contiguous(), weight_norm)
        return None, None, dgamma, dbeta


def _madafm_weight_autograd(weight_norm, gamma, beta):
    impl = _route(weight_norm)
    if _wants_grad(gamma, beta):
        return _MadafmWeight.apply(impl, weight_norm, gamma, beta)
    return impl.madafm_weight(weight_norm, gamma, beta)


# ---------------------------------------------------------------------------------------------
# modulated_conv2d
# ---------------------------------------------------------------------------------------------
class _ModulatedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation):
        ctx.impl, ctx.conv_args = impl, (stride, padding, dilation)
        ctx.save_for_backward(x, weight_norm, gamma, beta, bias, task_ids)
        return impl.modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_norm, gamma, beta, bias, task_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], need[3], need[4], bias is not None and need[5]]
        if torch.is_grad_enabled():
            grads = reference.modulated_conv2d_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids,
                                                        *ctx.conv_args, mask)
        else:
            grads = ctx.impl.modulated_conv2d_backward(grad_out.contiguous(), x, weight_norm, gamma, beta, bias,
                                                       task_ids, *ctx.conv_args, mask)
        dx, dgamma, dbeta, dbias = (_or_none(g, m) for g, m in zip(grads, mask))
        return None, dx, None, dgamma, dbeta, dbias, None, None, None, None


def _modulated_conv2d_autograd(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation):
    impl = _route(x)
    if _wants_grad(x, gamma, beta, bias):
        return _ModulatedConv2d.apply(impl, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation)
    return impl.modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# modulated_conv2d_lowrank
# ---------------------------------------------------------------------------------------------
class _ModulatedConv2dLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation):
        ctx.impl, ctx.conv_args = impl, (stride, padding, dilation)
        ctx.save_for_backward(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids)
        return impl.modulated_conv2d_lowrank(x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids, stride,
                                             padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], any(need[3:6]), any(need[6:9]), bias is not None and need[9]]
        if torch.is_grad_enabled():  # double backward: through the dense value
            dx, dgamma, dbeta, dbias = reference.modulated_conv2d_backward(
                grad_out, x, weight_norm, lowrank_dense(gu, gs, gv), lowrank_dense(bu, bs, bv), bias, task_ids,
                *ctx.conv_args, mask)
            g_grads = lowrank_factor_grads(dgamma, gu, gs, gv) if mask[1] else None
            b_grads = lowrank_factor_grads(dbeta, bu, bs, bv) if mask[2] else None
        else:
            dx, g_grads, b_grads, dbias = ctx.impl.modulated_conv2d_lowrank_backward(
                grad_out.contiguous(), x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids, *ctx.conv_args,
                mask)
        g_grads = g_grads if (mask[1] and g_grads is not None) else (None,) * 3
        b_grads = b_grads if (mask[2] and b_grads is not None) else (None,) * 3
        return (None, _or_none(dx, mask[0]), None, *g_grads, *b_grads, _or_none(dbias, mask[3]), None, None, None,
                None)


def _modulated_conv2d_lowrank_autograd(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding,
                                       dilation):
    impl = _route(x)
    if _wants_grad(x, gu, gs, gv, bu, bs, bv, bias):
        return _ModulatedConv2dLowRank.apply(impl, x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride,
                                             padding, dilation)
    return impl.modulated_conv2d_lowrank(x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids, stride,
                                         padding, dilation)


# ---------------------------------------------------------------------------------------------
# modulated_linear
# ---------------------------------------------------------------------------------------------
class _ModulatedLinear(torch.autograd.Function):
    """Keeps what the backend's forward hands over for its backward (``x_wn = x @ Wn^T``, one GEMM fewer)."""

    @staticmethod
    def forward(ctx, impl, x, weight_norm, gamma, beta, bias, task_ids):
        ctx.impl = impl
        out, x_wn = impl.modulated_linear_forward(x, weight_norm, gamma, beta, bias, task_ids)
        ctx.save_for_backward(x, weight_norm, gamma, beta, bias, task_ids, x_wn)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_norm, gamma, beta, bias, task_ids, x_wn = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], need[3], need[4], bias is not None and need[5]]
        if torch.is_grad_enabled():
            grads = reference.modulated_linear_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, mask)
        else:
            grads = ctx.impl.modulated_linear_backward(grad_out.contiguous(), x, weight_norm, gamma, beta, bias,
                                                       task_ids, mask, x_wn=x_wn)
        dx, dgamma, dbeta, dbias = (_or_none(g, m) for g, m in zip(grads, mask))
        return None, dx, None, dgamma, dbeta, dbias, None


def _modulated_linear_autograd(x, weight_norm, gamma, beta, bias, task_ids):
    impl = _route(x)
    if _wants_grad(x, gamma, beta, bias):
        return _ModulatedLinear.apply(impl, x, weight_norm, gamma, beta, bias, task_ids)
    return impl.modulated_linear(x, weight_norm, gamma, beta, bias, task_ids)


_AUTOGRAD = {
    "madafm_weight": _madafm_weight_autograd,
    "modulated_conv2d": _modulated_conv2d_autograd,
    "modulated_conv2d_lowrank": _modulated_conv2d_lowrank_autograd,
    "modulated_linear": _modulated_linear_autograd,
}


def python_autograd(name: str, *args):
    """The Python Autograd kernel of forward op ``name`` called with ``args``: what the compiled
    extension's C++ Autograd kernels (``csrc/madafm.cpp``, registered for the CPU/CUDA autograd
    keys, so they shadow this module's on those devices) call for every call that is not theirs
    (another backend chosen, torch.compile tracing, CPU float16/bfloat16)."""
    return _AUTOGRAD[name](*args)


# ---------------------------------------------------------------------------------------------
# The reference kernels (CompositeExplicitAutograd): what runs where no device kernel is registered
# (no extension built, other devices) and when an op is called below autograd there. Backward
# ops return contiguous gradients, as the compiled kernels do (one fake serves every kernel).
# ---------------------------------------------------------------------------------------------
def _contiguous(grads, likes):
    return tuple(_or_empty(None if g is None else g.contiguous(), like) for g, like in zip(grads, likes))


def _ref_madafm_weight_backward(grad_weight, weight_norm):
    return tuple(g.contiguous() for g in reference.madafm_weight_backward(grad_weight, weight_norm))


def _ref_conv_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, mask):
    grads = reference.modulated_conv2d_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride,
                                                padding, dilation, mask)
    return _contiguous(grads, (x, x, x, x))


def _ref_conv_lowrank(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation):
    return Backend().modulated_conv2d_lowrank(x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids, stride,
                                              padding, dilation)


def _ref_conv_lowrank_backward(grad_out, x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding,
                               dilation, mask):
    dx, dg, db, dc = Backend().modulated_conv2d_lowrank_backward(
        grad_out, x, weight_norm, (gu, gs, gv), (bu, bs, bv), bias, task_ids, stride, padding, dilation, mask)
    return _contiguous((dx, *(dg or (None,) * 3), *(db or (None,) * 3), dc), (x,) * 8)


def _ref_linear_forward(x, weight_norm, gamma, beta, bias, task_ids):
    out = reference.modulated_linear(x, weight_norm, gamma, beta, bias, task_ids)
    return out, torch.nn.functional.linear(x, weight_norm)


def _ref_linear_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, mask, x_wn=None):
    grads = reference.modulated_linear_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, mask)
    return _contiguous(grads, (x, x, x, x))


_REFERENCE = {
    "madafm_weight": reference.madafm_weight,
    "madafm_weight_backward": _ref_madafm_weight_backward,
    "modulated_conv2d": reference.modulated_conv2d,
    "modulated_conv2d_backward": _ref_conv_backward,
    "modulated_conv2d_lowrank": _ref_conv_lowrank,
    "modulated_conv2d_lowrank_backward": _ref_conv_lowrank_backward,
    "modulated_linear": reference.modulated_linear,
    "modulated_linear_forward": _ref_linear_forward,
    "modulated_linear_backward": _ref_linear_backward,
}


# ---------------------------------------------------------------------------------------------
# The fakes: output shapes. Shapes: weight_norm [O, I, kh, kw], gamma/beta [(T,) O, I], x [N, I, H, W]
# (conv) or [N, I] (linear). Gradients come back contiguous, or empty [0] where not asked for.
# ---------------------------------------------------------------------------------------------
def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one spatial axis of a convolution (as ``F.conv2d`` computes it)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _grad_like(t: Optional[Tensor], wanted: bool, x: Tensor) -> Tensor:
    if not wanted or t is None:
        return x.new_empty((0,))
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _fake_madafm_weight(weight_norm, gamma, beta):
    return weight_norm.new_empty((*gamma.shape[:-2], *weight_norm.shape))


def _fake_madafm_weight_backward(grad_weight, weight_norm):
    shape = grad_weight.shape[:-2]
    return grad_weight.new_empty(shape), grad_weight.new_empty(shape)


def _fake_conv(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation):
    kh, kw = weight_norm.shape[-2:]
    h = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight_norm.shape[0], h, w))


def _fake_conv_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, mask):
    return (_grad_like(x, mask[0], x), _grad_like(gamma, mask[1], x), _grad_like(beta, mask[2], x),
            _grad_like(bias, mask[3], x))


def _fake_conv_lowrank(x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding, dilation):
    return _fake_conv(x, weight_norm, None, None, bias, task_ids, stride, padding, dilation)


def _fake_conv_lowrank_backward(grad_out, x, weight_norm, gu, gs, gv, bu, bs, bv, bias, task_ids, stride, padding,
                                dilation, mask):
    return (_grad_like(x, mask[0], x), *(_grad_like(f, mask[1], x) for f in (gu, gs, gv)),
            *(_grad_like(f, mask[2], x) for f in (bu, bs, bv)), _grad_like(bias, mask[3], x))


def _fake_linear(x, weight_norm, gamma, beta, bias, task_ids):
    return x.new_empty((x.shape[0], weight_norm.shape[0]))


def _fake_linear_forward(x, weight_norm, gamma, beta, bias, task_ids):
    return _fake_linear(x, weight_norm, gamma, beta, bias, task_ids), _fake_linear(x, weight_norm, gamma, beta,
                                                                                   bias, task_ids)


def _fake_linear_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, mask, x_wn=None):
    return (_grad_like(x, mask[0], x), _grad_like(gamma, mask[1], x), _grad_like(beta, mask[2], x),
            _grad_like(bias, mask[3], x))


_FAKES = {
    "madafm_weight": _fake_madafm_weight,
    "madafm_weight_backward": _fake_madafm_weight_backward,
    "modulated_conv2d": _fake_conv,
    "modulated_conv2d_backward": _fake_conv_backward,
    "modulated_conv2d_lowrank": _fake_conv_lowrank,
    "modulated_conv2d_lowrank_backward": _fake_conv_lowrank_backward,
    "modulated_linear": _fake_linear,
    "modulated_linear_forward": _fake_linear_forward,
    "modulated_linear_backward": _fake_linear_backward,
}


# ---------------------------------------------------------------------------------------------
# Autocast: the forward ops cast their floating-point inputs (not float64) to the autocast dtype of
# the device *at call time* (torch.library.register_autocast fixes one dtype per device, which would
# turn a bfloat16 autocast on CUDA into float16), then run below the Autocast key. The public
# functions of gmem.ops.functional apply the same cast before they call in.
# ---------------------------------------------------------------------------------------------
def _autocast_kernel(name: str, device_type: str):
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)  # noqa: SLF001
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))  # noqa: SLF001
    op = getattr(torch.ops.gmem, name).default

    def cast(value, dtype):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                and value.device.type == device_type:
            return value.to(dtype)
        return value

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(key):  # noqa: SLF001
            return op(*(cast(a, dtype) for a in args))

    _LIB.impl(name, kernel, key_name, with_keyset=True)


for _name in SCHEMAS:
    _LIB.impl(_name, _REFERENCE[_name], "CompositeExplicitAutograd")
    torch.library.register_fake(f"gmem::{_name}", _FAKES[_name], lib=_LIB)
for _name in FORWARD_OPS:
    _LIB.impl(_name, _AUTOGRAD[_name], "Autograd")
    for _device_type in ("cpu", "cuda"):
        _autocast_kernel(_name, _device_type)


def op_names() -> list[str]:
    """``gmem::`` names of every op (what ``torch.ops.gmem`` holds)."""
    return [f"gmem::{name}" for name in SCHEMAS]


def kernel_for(name: str, dispatch_key: str) -> bool:
    """Whether ``gmem::name`` has a kernel of its own for ``dispatch_key`` (e.g. "CPU": the C++ kernel)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gmem::{name}", dispatch_key)  # noqa: SLF001

