"""Public functional ops: validate, bring arguments to canonical form, call the ``torch.ops.gmem`` op.

``backend=name`` is a shorthand for ``with gmem.ops.use_backend(name):`` around the call (see
:mod:`gmem.ops.backends`); the op itself takes no backend (:mod:`gmem.ops._ops`).

Under ``torch.autocast`` (cpu, cuda) the ops behave as ``nn.Conv2d``/``nn.Linear`` do: every
floating-point argument that is not float64 is cast to the autocast dtype at the op (float32 style
parameters and frozen statistics stay float32 where they are stored and get float32 gradients), and
the backends accumulate in float32. The ops carry the same rule in their Autocast kernels
(:mod:`gmem.ops._ops`), so torch.compile and direct ``torch.ops.gmem`` calls see it too.

Bad input raises before anything runs, with a message naming the argument and what was expected:
TypeError (wrong type or dtype), ValueError (shapes, devices, unknown backend), IndexError (task ids
out of range).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import _ops, reference  # noqa: F401  (_ops: importing it defines torch.ops.gmem)
from .backends import call_entry, call_with, get_backend, resolve_backend
from .lowrank import LowRank

__all__ = ["normalize_weight", "madafm_weight", "modulated_conv2d", "modulated_linear", "values_known"]

_MADAFM_WEIGHT = torch.ops.gmem.madafm_weight.default
_MODULATED_CONV2D = torch.ops.gmem.modulated_conv2d.default
_MODULATED_CONV2D_LOWRANK = torch.ops.gmem.modulated_conv2d_lowrank.default
_MODULATED_LINEAR = torch.ops.gmem.modulated_linear.default

Style = Union[Tensor, LowRank]
IntPair = Union[int, tuple[int, int], list[int]]

normalize_weight = reference.normalize_weight


def _dense(op: str, name: str, value) -> Tensor:
    if isinstance(value, LowRank):
        return value.dense()
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or LowRank, got {type(value).__name__}")
    return value


def _check_tensor(op: str, name: str, t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {like.dtype} (the dtype of x)")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {like.device} (the device of x)")


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` wants the op computed in, or None (autocast off, or float64)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if x.dtype == torch.float64:  # autocast leaves float64 alone, as it does for F.conv2d
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(value, dtype: torch.dtype):
    """``value`` (Tensor, LowRank or None) in ``dtype``: autocast's cast at the op, differentiable,
    so float32 parameters stay float32 and receive float32 gradients."""
    if value is None or not isinstance(value, (Tensor, LowRank)) or value.dtype == dtype:
        return value
    if isinstance(value, LowRank):
        return LowRank(value.u.to(dtype), value.s.to(dtype), value.v.to(dtype))
    return value.to(dtype) if value.is_floating_point() else value


def _pair(op: str, name: str, value: IntPair, minimum: int) -> list[int]:
    if type(value) is int and value >= minimum:  # the common case, checked in one step (per-call cost)
        return [value, value]
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(value)}")
    return [int(v) for v in value]


def values_known(t: Tensor) -> bool:
    """Whether ``t``'s values can be read: False for meta tensors, fake tensors (torch.compile's
    tracing, ``opcheck``, ``FakeTensorMode``) and inside torch.compile, where only shapes are known
    and every data-dependent step (grouping by task, range checks) must be skipped."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, (FakeTensor, FunctionalTensor)):
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None  # noqa: SLF001


def _ids_out_of_range(op: str, num_tasks: int) -> str:
    # one wording for the eager IndexError and the compiled assert (tests match on it); built only when raised or traced
    return f"{op}: task_ids must lie in [0, {num_tasks}) for {num_tasks} stacked style sets"


def _check_task_ids(op: str, task_ids, n: int, num_tasks: int, device: torch.device) -> Tensor:
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"{op}: task_ids must be a LongTensor [N], got {type(task_ids).__name__}")
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{op}: task_ids must be an integer (long) tensor, got {task_ids.dtype}")
    if task_ids.ndim != 1 or task_ids.shape[0] != n:
        raise ValueError(
            f"{op}: task_ids must have shape [N] = [{n}] (one task per sample), got {tuple(task_ids.shape)}"
        )
    if task_ids.device != device:
        raise ValueError(f"{op}: task_ids is on {task_ids.device}, expected {device} (the device of x)")
    task_ids = task_ids.long()
    # Eagerly the range check reads the ids (a sync on GPU) and raises IndexError. Under
    # torch.compile a graph cannot read them: an asynchronous assert fails the call instead (a
    # RuntimeError naming the range), and the ids are clamped so that no kernel ever reads out of
    # bounds, even where the assert is reported only later (CUDA).
    if torch.compiler.is_compiling():
        torch._assert_async(((task_ids >= 0) & (task_ids < num_tasks)).all(), _ids_out_of_range(op, num_tasks))  # noqa: SLF001
        return task_ids.clamp(0, num_tasks - 1)
    if n and values_known(task_ids):  # meta/fake ids have no values to check
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= num_tasks:
            raise IndexError(f"{_ids_out_of_range(op, num_tasks)}, got values from {lo} to {hi}")
    return task_ids


def _style_pair(op, gamma, beta, like, style_shape) -> tuple[Tensor, Tensor, bool]:
    """Dense gamma/beta checked against the single-task ``style_shape``; also says if stacked."""
    gamma, beta = _dense(op, "gamma", gamma), _dense(op, "beta", beta)
    _check_tensor(op, "gamma", gamma, like)
    _check_tensor(op, "beta", beta, like)
    k = len(style_shape)
    if gamma.ndim not in (k, k + 1) or tuple(gamma.shape[gamma.ndim - k:]) != tuple(style_shape):
        shape_txt = "[" + ", ".join(map(str, style_shape)) + "]"  # built only here: no str() of shapes under compile
        raise ValueError(
            f"{op}: gamma must be {shape_txt} (one task) or [T, {shape_txt[1:]} (stacked tasks) to "
            f"match the layer, got {tuple(gamma.shape)}"
        )
    if beta.shape != gamma.shape:
        raise ValueError(f"{op}: beta must have the shape of gamma {tuple(gamma.shape)}, got {tuple(beta.shape)}")
    return gamma, beta, gamma.ndim == k + 1


def _styles(op, gamma, beta, bias, task_ids, x, style_shape, out_features, n):
    """Validate gamma/beta/bias/task_ids; bias comes back ``None``, ``[O]`` or (stacked) ``[T, O]``."""
    gamma, beta, stacked = _style_pair(op, gamma, beta, x, style_shape)
    num_tasks = gamma.shape[0] if stacked else 1
    if stacked and task_ids is None:
        raise ValueError(
            f"{op}: gamma is a stack of {num_tasks} style sets: task_ids [N] must say which one each sample uses"
        )
    if not stacked and task_ids is not None:
        raise ValueError(
            f"{op}: task_ids was given but gamma is a single style set {tuple(gamma.shape)}; "
            "stack style sets as [T, ...]"
        )
    if task_ids is not None:
        task_ids = _check_task_ids(op, task_ids, n, num_tasks, x.device)
    if bias is not None:
        _check_tensor(op, "bias", bias, x)
        if bias.shape == (out_features,):
            if stacked:
                bias = bias.expand(num_tasks, out_features)
        elif not (stacked and bias.shape == (num_tasks, out_features)):
            expected = f"[{out_features}]" + (f" or [{num_tasks}, {out_features}]" if stacked else "")
            raise ValueError(f"{op}: bias must be {expected}, got {tuple(bias.shape)}")
    return gamma, beta, bias, task_ids


def _check_input(op: str, x, ndim_txt: str, ndims: tuple[int, ...], name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{op}: {name} must be {ndim_txt}, got shape {tuple(x.shape)}")


def madafm_weight(weight_norm: Tensor, gamma: Style, beta: Style, *, backend: str = "auto") -> Tensor:
    """The modulated weight ``gamma * weight_norm + beta``.

    conv: ``weight_norm [O, I, kh, kw]``, ``gamma, beta [O, I]`` -> ``[O, I, kh, kw]``, or
    ``[T, O, I]`` -> ``[T, O, I, kh, kw]`` (broadcast over the kernel window).
    linear (mFiLM): ``weight_norm [O, I]``, ``gamma, beta [O]`` -> ``[O, I]``, or ``[T, O]`` -> ``[T, O, I]``.
    """
    op = "madafm_weight"
    name = None
    if isinstance(weight_norm, Tensor) and weight_norm.is_floating_point() and not torch.compiler.is_compiling():
        # the common call (a conv weight, dense styles, autocast off) with the extension's kernels
        # in one C++ step; None: any other call, taken below
        name = resolve_backend(backend, weight_norm.device, weight_norm.dtype, op)
        out = call_entry(name, op, weight_norm, gamma, beta)
        if out is not None:
            return out
    _check_input(op, weight_norm, "[C_out, C_in, kh, kw] (conv) or [d_out, d_in] (linear)", (2, 4), "weight_norm")
    dtype = _autocast_dtype(weight_norm)
    if dtype is not None:
        weight_norm, gamma, beta = _cast(weight_norm, dtype), _cast(gamma, dtype), _cast(beta, dtype)
    if weight_norm.ndim == 4:
        style_shape = tuple(weight_norm.shape[:2])
    else:
        style_shape = (weight_norm.shape[0],)
    gamma, beta, _ = _style_pair(op, gamma, beta, weight_norm, style_shape)
    if name is None or dtype is not None:  # (not resolved above, or for another dtype)
        name = resolve_backend(backend, weight_norm.device, weight_norm.dtype, op)
    if weight_norm.ndim == 4:
        return call_with(name, _MADAFM_WEIGHT, weight_norm, gamma, beta)
    # mFiLM rows: view [O, I] as a conv weight [O, 1, I, 1] whose "kernel" is the row
    o, i = weight_norm.shape
    out = call_with(name, _MADAFM_WEIGHT, weight_norm.reshape(o, 1, i, 1), gamma[..., None], beta[..., None])
    return out.reshape(*gamma.shape[:-1], o, i)


def modulated_conv2d(
    x: Tensor,
    weight_norm: Tensor,
    gamma: Style,
    beta: Style,
    bias: Optional[Tensor] = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    task_ids: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """mAdaFM convolution ``conv(x, gamma * weight_norm + beta) + bias``.

    ``x [N, I, H, W]``, ``weight_norm [O, I, kh, kw]`` (from :func:`normalize_weight`, frozen).
    One task: ``gamma, beta [O, I]``, ``bias [O]``. Mixed tasks: ``gamma, beta [T, O, I]``,
    ``bias [O] | [T, O]`` and ``task_ids [N]`` choosing each sample's style set. ``gamma``/``beta``
    may be :class:`LowRank`. Returns ``[N, O, H_out, W_out]``. Gradients reach x, gamma, beta (or
    their factors) and bias, never ``weight_norm``.
    """
    op = "modulated_conv2d"
    _check_input(op, x, "[N, C_in, H, W]", (4,))
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight_norm, gamma, beta, bias = (_cast(v, dtype) for v in (x, weight_norm, gamma, beta, bias))
    _check_tensor(op, "weight_norm", weight_norm, x)
    if weight_norm.ndim != 4:
        raise ValueError(f"{op}: weight_norm must be [C_out, C_in, kh, kw], got {tuple(weight_norm.shape)}")
    o, i, kh, kw = weight_norm.shape
    if x.shape[1] != i:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, the weight expects C_in = {i}")
    stride_, padding_, dilation_ = (
        _pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0), _pair(op, "dilation", dilation, 1)
    )
    for axis, size, k in ((0, x.shape[2], kh), (1, x.shape[3], kw)):
        if size + 2 * padding_[axis] < dilation_[axis] * (k - 1) + 1:
            raise ValueError(
                f"{op}: input {tuple(x.shape[2:])} with padding {tuple(padding_)} is smaller than the "
                f"dilated kernel ({kh}, {kw}) x dilation {tuple(dilation_)}"
            )
    if isinstance(gamma, LowRank) and isinstance(beta, LowRank):
        out = _modulated_conv2d_lowrank(
            op, x, weight_norm, gamma, beta, bias, task_ids, stride_, padding_, dilation_, backend
        )
        if out is not None:
            return out
    gamma, beta, bias, task_ids = _styles(op, gamma, beta, bias, task_ids, x, (o, i), o, x.shape[0])
    name = resolve_backend(backend, x.device, x.dtype, op)
    return call_with(
        name, _MODULATED_CONV2D, x, weight_norm.detach(), gamma, beta, bias, task_ids, stride_, padding_, dilation_
    )


def _modulated_conv2d_lowrank(op, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, backend):
    """The factored path for LowRank gamma and beta, or None where the backend wants dense styles.

    Taken only when the resolved backend has ``supports_lowrank = True`` (its kernels rebuild style
    blocks from the factors); every other backend gets the densified values, as before.
    """
    o, i = weight_norm.shape[:2]

    def proxy(value: LowRank) -> Tensor:  # shape/dtype/device stand-in for validation, no memory
        return torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)

    name = resolve_backend(backend, x.device, x.dtype, op)
    if not get_backend(name).supports_lowrank:
        return None  # before validating, so other backends see no extra work (the id range check syncs)
    _, _, bias, task_ids = _styles(op, proxy(gamma), proxy(beta), bias, task_ids, x, (o, i), o, x.shape[0])
    return call_with(
        name, _MODULATED_CONV2D_LOWRANK, x, weight_norm.detach(), gamma.u, gamma.s, gamma.v, beta.u, beta.s,
        beta.v, bias, task_ids, stride, padding, dilation,
    )


def modulated_linear(
    x: Tensor,
    weight_norm: Tensor,
    gamma: Style,
    beta: Style,
    bias: Optional[Tensor] = None,
    *,
    task_ids: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """mFiLM linear ``(gamma[:, None] * weight_norm + beta[:, None]) x + bias``.

    ``x [N, *, I]``, ``weight_norm [O, I]``. One task: ``gamma, beta, bias [O]``. Mixed tasks:
    ``gamma, beta [T, O]``, ``bias [O] | [T, O]``, ``task_ids [N]`` (one task per sample; inner
    dimensions ``*`` share their sample's task). Returns ``[N, *, O]``. Computed through the
    shared-GEMM identity ``gamma * (weight_norm x) + beta * sum(x)``.
    """
    op = "modulated_linear"
    _check_input(op, x, "[N, *, d_in]", tuple(range(1, 9)))
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight_norm, gamma, beta, bias = (_cast(v, dtype) for v in (x, weight_norm, gamma, beta, bias))
    _check_tensor(op, "weight_norm", weight_norm, x)
    if weight_norm.ndim != 2:
        raise ValueError(f"{op}: weight_norm must be [d_out, d_in], got {tuple(weight_norm.shape)}")
    o, i = weight_norm.shape
    if x.shape[-1] != i:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last dimension, the weight expects d_in = {i}")
    n = x.shape[0] if x.ndim > 1 else 1
    gamma, beta, bias, task_ids = _styles(op, gamma, beta, bias, task_ids, x, (o,), o, n)
    name = resolve_backend(backend, x.device, x.dtype, op)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, i)
    if task_ids is not None and x2.shape[0] != n:  # inner dimensions share their sample's task
        task_ids = task_ids.repeat_interleave(x2.shape[0] // max(n, 1))
    out = call_with(name, _MODULATED_LINEAR, x2, weight_norm.detach(), gamma, beta, bias, task_ids)
    return out.reshape(*lead, o)
