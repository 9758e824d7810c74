"""mAdaFM for every convolution kind: ``gmem::modulated_conv`` and :func:`modulated_conv`.

One op covers 1-, 2- and 3-D kernels, grouped and depthwise convolutions and transposed ones
(docs/design.md, "Every convolution kind"). mAdaFM is defined per kernel slice, whatever its rank:

* a convolution's weight ``weight_norm [C_out, C_in/groups, *k]`` is modulated by
  ``gamma, beta [C_out, C_in/groups]`` broadcast over the kernel ``k``;
* a transposed convolution's weight ``[C_in, C_out/groups, *k]`` the same way, by
  ``gamma, beta [C_in, C_out/groups]``.

The op is composite (``CompositeImplicitAutograd``): the weight is built by ``gmem::madafm_weight``
(with the kernel flattened into its last-but-one axis, so its compiled kernel serves every rank)
and the convolution is ``aten::convolution``, which covers every rank, groups and transposition.
Autograd, double backward, fake tensors and torch.compile therefore come from those two ops.

Mixed-task batches take one of two equivalent paths:

* gathered: each sample's weight is built and the batch runs as one grouped convolution with the
  samples folded into the groups. Nothing depends on the ids' values, so this is the path on meta
  tensors, fake tensors and under torch.compile; eagerly it is also the faster one for small
  kernels (at most :data:`GATHER_MAX_GROUP_WEIGHT` values per group: depthwise, grouped, narrow);
* grouped (eager, real tensors, larger kernels): samples are grouped by task (a stable sort; one
  convolution per task present, as :func:`gmem.ops.reference.modulated_conv2d` does).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (defines the gmem namespace and gmem::madafm_weight)
from .backends import call_with, resolve_backend
from .functional import _autocast_dtype, _cast, _check_input, _check_tensor, _styles, values_known
from .lowrank import LowRank
from .reference import task_segments

__all__ = ["modulated_conv", "modulated_conv_reference"]

#: Mixed tasks with readable values: a kernel whose weight per group has at most this many values
#: takes the gathered path, a larger one the grouped path (docs/design.md, "Every convolution kind":
#: per-sample convolutions with small weights beat one convolution per task; large ones do not)
GATHER_MAX_GROUP_WEIGHT = 16384

_LIB = torch.library.Library("gmem", "FRAGMENT")  # noqa: TOR901 - gmem's own namespace
_LIB.define(
    "modulated_conv(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, Tensor? task_ids, "
    "int[] stride, int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups) -> Tensor"
)

Style = Union[Tensor, LowRank]
IntTuple = Union[int, Sequence[int]]


def _modulated_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``gamma * weight_norm + beta``: ``[(T,) A, B, *k]`` from ``weight_norm [A, B, *k]``, ``gamma [(T,) A, B]``.

    The kernel is flattened into a ``[A, B, K, 1]`` weight for ``gmem::madafm_weight`` (which
    broadcasts over its two last axes) and reshaped back.
    """
    a, b = weight_norm.shape[:2]
    flat = weight_norm.reshape(a, b, -1, 1)
    out = torch.ops.gmem.madafm_weight(flat, gamma, beta)
    return out.reshape(*gamma.shape[:-2], *weight_norm.shape)


def _conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    return torch.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


def _per_sample_bias(out: Tensor, bias: Optional[Tensor], task_ids: Tensor) -> Tensor:
    if bias is None:
        return out
    rows = bias.index_select(0, task_ids)  # [N, C_out]
    return out + rows.reshape(*rows.shape, *([1] * (out.ndim - 2)))


def _mixed_gathered(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, transposed,
                    output_padding, groups):
    """Each sample's weight, the batch as one convolution with ``N * groups`` groups (no data-dependent op)."""
    n = x.shape[0]
    weights = _modulated_weight(weight_norm, gamma.index_select(0, task_ids), beta.index_select(0, task_ids))
    folded = weights.reshape(n * weight_norm.shape[0], *weight_norm.shape[1:])  # [N*A, B, *k]
    out = _conv(x.reshape(1, n * x.shape[1], *x.shape[2:]), folded, None, stride, padding, dilation, transposed,
                output_padding, n * groups)
    return _per_sample_bias(out.reshape(n, -1, *out.shape[2:]), bias, task_ids)


def _mixed_grouped(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, transposed,
                   output_padding, groups):
    """One convolution per task present, samples grouped by a stable sort of ``task_ids``."""
    order, segments = task_segments(task_ids, gamma.shape[0])
    x_sorted = x.index_select(0, order)
    outputs = []
    for task, start, end in segments:
        weight = _modulated_weight(weight_norm, gamma[task], beta[task])
        task_bias = None if bias is None else bias[task]
        outputs.append(_conv(x_sorted[start:end], weight, task_bias, stride, padding, dilation, transposed,
                             output_padding, groups))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outputs).index_select(0, inverse)


def modulated_conv_reference(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, transposed,
                             output_padding, groups):
    """The definition of ``gmem::modulated_conv`` on canonical arguments (see :func:`modulated_conv`)."""
    if task_ids is None:
        weight = _modulated_weight(weight_norm, gamma, beta)
        return _conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    if x.shape[0] == 0:  # an empty batch: any task's weight gives the (empty) output shape
        weight = _modulated_weight(weight_norm, gamma[0], beta[0])
        return _conv(x, weight, None, stride, padding, dilation, transposed, output_padding, groups)
    readable = values_known(task_ids) and values_known(x)
    path = _mixed_grouped if readable and weight_norm.numel() // groups > GATHER_MAX_GROUP_WEIGHT else _mixed_gathered
    return path(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, transposed, output_padding,
                groups)


_LIB.impl("modulated_conv", modulated_conv_reference, "CompositeImplicitAutograd")


def _autocast_kernel(device_type: str) -> None:
    """Autocast casts the floating-point inputs (not float64) to its dtype at call time, as for
    ``F.conv2d`` (``aten::convolution`` itself is not on autocast's list)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)  # noqa: SLF001
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))  # noqa: SLF001
    op = torch.ops.gmem.modulated_conv.default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [
            a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 else a
            for a in args
        ]
        with torch._C._ExcludeDispatchKeyGuard(key):  # noqa: SLF001
            return op(*cast)

    _LIB.impl("modulated_conv", kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _autocast_kernel(_device_type)

_MODULATED_CONV = torch.ops.gmem.modulated_conv.default


def _ints(op: str, name: str, value: IntTuple, rank: int, minimum: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * rank
    if (
        not isinstance(value, (tuple, list))
        or len(value) != rank
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{op}: {name} must be an int or {rank} ints (one per spatial axis), got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(value)}")
    return [int(v) for v in value]


def _channels(op: str, x: Tensor, weight_norm: Tensor, groups: int, transposed: bool) -> tuple[tuple, int]:
    """The style shape and the output channels; checks the channel counts against ``groups``."""
    a, b = weight_norm.shape[:2]
    c_in = x.shape[1]
    if transposed:
        if a != c_in:
            raise ValueError(f"{op}: x has {c_in} channels, the transposed weight [C_in, C_out/groups, *k] "
                             f"expects C_in = {a}")
        if c_in % groups:
            raise ValueError(f"{op}: groups={groups} must divide C_in = {c_in}")
        return (a, b), b * groups
    if a % groups:
        raise ValueError(f"{op}: groups={groups} must divide C_out = {a}")
    if c_in != b * groups:
        raise ValueError(f"{op}: x has {c_in} channels, the weight [C_out, C_in/groups, *k] with groups={groups} "
                         f"expects C_in = {b * groups}")
    return (a, b), a


def modulated_conv(
    x: Tensor,
    weight_norm: Tensor,
    gamma: Style,
    beta: Style,
    bias: Optional[Tensor] = None,
    *,
    stride: IntTuple = 1,
    padding: IntTuple = 0,
    dilation: IntTuple = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: IntTuple = 0,
    task_ids: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """mAdaFM convolution of any rank ``r`` in 1..3: ``conv(x, gamma * weight_norm + beta) + bias``.

    ``x [N, C_in, *s]`` (``len(s) == r``). Convolution: ``weight_norm [C_out, C_in/groups, *k]``,
    ``gamma, beta [C_out, C_in/groups]``. Transposed (``transposed=True``, ``F.conv_transpose*d``):
    ``weight_norm [C_in, C_out/groups, *k]``, ``gamma, beta [C_in, C_out/groups]``. ``bias [C_out]``.
    Mixed tasks: ``gamma, beta [T, ...]``, ``bias [C_out] | [T, C_out]``, ``task_ids [N]``.
    ``gamma``/``beta`` may be :class:`LowRank` (densified). ``backend`` chooses the kernel that
    builds the weight; the convolution is PyTorch's. Returns ``[N, C_out, *s_out]``. Gradients
    reach x, gamma, beta and bias, never ``weight_norm``.
    """
    op = "modulated_conv"
    _check_input(op, weight_norm, "[C_out, C_in/groups, *k] with 1 to 3 kernel axes", (3, 4, 5), "weight_norm")
    rank = weight_norm.ndim - 2
    spatial = ("L", "H, W", "D, H, W")[rank - 1]
    _check_input(op, x, f"[N, C_in, {spatial}] (kernel rank {rank}, as weight_norm)", (rank + 2,))
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight_norm, gamma, beta, bias = (_cast(v, dtype) for v in (x, weight_norm, gamma, beta, bias))
    _check_tensor(op, "weight_norm", weight_norm, x)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if not isinstance(transposed, bool):
        raise TypeError(f"{op}: transposed must be a bool, got {type(transposed).__name__}")
    style_shape, c_out = _channels(op, x, weight_norm, groups, transposed)
    stride_ = _ints(op, "stride", stride, rank, 1)
    padding_ = _ints(op, "padding", padding, rank, 0)
    dilation_ = _ints(op, "dilation", dilation, rank, 1)
    output_padding_ = _ints(op, "output_padding", output_padding, rank, 0)
    kernel = weight_norm.shape[2:]
    if transposed:
        for p, s, d in zip(output_padding_, stride_, dilation_):
            if p >= max(s, d):
                raise ValueError(f"{op}: output_padding {tuple(output_padding_)} must be smaller than the stride "
                                 f"{tuple(stride_)} or the dilation {tuple(dilation_)} on every axis")
    else:
        if any(output_padding_):
            raise ValueError(f"{op}: output_padding is for transposed convolutions only, got {tuple(output_padding_)}")
        for size, p, d, k in zip(x.shape[2:], padding_, dilation_, kernel):
            if size + 2 * p < d * (k - 1) + 1:
                raise ValueError(f"{op}: input {tuple(x.shape[2:])} with padding {tuple(padding_)} is smaller than "
                                 f"the dilated kernel {tuple(kernel)} x dilation {tuple(dilation_)}")
    gamma, beta, bias, task_ids = _styles(op, gamma, beta, bias, task_ids, x, style_shape, c_out, x.shape[0])
    name = resolve_backend(backend, x.device, x.dtype, op)
    return call_with(name, _MODULATED_CONV, x, weight_norm.detach(), gamma, beta, bias, task_ids, stride_, padding_,
                     dilation_, transposed, output_padding_, groups)
