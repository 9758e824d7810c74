"""How a public gmem op is called: the plumbing shared by every op of :mod:`gmem.ops.library`.

Two ways in, one set of autograd rules. Under torch.compile (and for ``opcheck``) the public
functions call the custom ops, which compile treats as opaque calls with fake implementations. In
eager mode they call the backend inside a ``torch.autograd.Function`` built from the same setup and
backward functions: the custom-op boundary costs ~25 us a call (measured on the 2-core CPU machine
at a forward+backward), which is most of the time of a small layer. A backend whose methods dynamo
can trace (``Backend.traceable``, e.g. Triton through ``torch.library.triton_op``) takes the
``autograd.Function`` under torch.compile too, so that compile sees its kernels.

Autocast: the forward ops cast their floating-point inputs (not float64) to the autocast dtype of
the device *at call time* (torch.library.register_autocast fixes one dtype per device, which would
turn a bfloat16 autocast on CUDA into float16), then run below the Autocast dispatch key
(:func:`register_autocast`). The public functions in gmem.ops.functional apply the same cast
before calling in.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend


def empty_grad(like: Tensor) -> Tensor:
    # custom ops cannot return None: a gradient that was not asked for is an empty tensor
    return like.new_empty((0,))


def or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return empty_grad(like) if grad is None else grad


def or_none(grad: Tensor, wanted: bool) -> Optional[Tensor]:
    return grad if wanted else None


def direct(backend: str) -> bool:
    """Whether the public op calls ``backend`` through an autograd.Function (True) or its custom op."""
    if not torch.compiler.is_compiling():
        return True
    return get_backend(backend).traceable


def backward_of(ctx, custom_op, method: str, *args, **direct_kwargs):
    """First-order gradients from the backend: directly on the autograd.Function path (with
    ``direct_kwargs``, what only that path has, e.g. the linear's ``x_wn``), else its op."""
    if getattr(ctx, "direct", False):
        return getattr(get_backend(ctx.backend), method)(*args, **direct_kwargs)
    return custom_op(*args, ctx.backend)


def eager_function(name: str, forward, setup_context, backward) -> type:
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


def call(function: type, custom_op, *args):
    """The public op on canonical ``args`` (backend name last), by the path :func:`direct` picks:
    the custom op, the autograd.Function, or with grad mode off (sampling, replay) the backend's
    forward alone, since there is no autograd node to record."""
    if not direct(args[-1]):
        return custom_op(*args)
    if not torch.is_grad_enabled():
        return function.forward_only(*args)
    return function.apply(*args)


def register_autocast(op) -> None:
    """Autocast kernels (cpu, cuda) for the forward custom op ``op`` (see the module docstring)."""
    for device_type in ("cpu", "cuda"):
        _autocast_kernel(op, device_type)


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

