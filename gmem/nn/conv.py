"""Modulated convolutions of every kind: 1-, 2- and 3-D, grouped and depthwise, transposed.

Each class wraps one exact ``torch.nn`` convolution (:class:`ModulatedConv1d` wraps ``nn.Conv1d``,
...) with a frozen base and per-task mAdaFM style sets (:class:`gmem.nn.layers.ConvStyle`):

* a convolution's weight ``[C_out, C_in/groups, *k]`` is modulated by ``gamma, beta [C_out, C_in/groups]``;
* a transposed convolution's weight ``[C_in, C_out/groups, *k]`` by ``gamma, beta [C_in, C_out/groups]``;
* ``bias [C_out]`` is the task's bias delta (the op receives ``b + bias``).

Task 0 (the source) runs the frozen weight through exactly the call the ``torch.nn`` module makes,
so it reproduces the unconverted layer bit for bit. Other tasks run :func:`gmem.ops.modulated_conv`
(a dense 2-D convolution, :class:`ModulatedConv2d` with ``groups=1``, keeps the fused
:func:`gmem.ops.modulated_conv2d`, whose kernels take low-rank styles as factors).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .layers import ConvStyle, ModulatedLayer

__all__ = [
    "ModulatedConvNd",
    "ModulatedConv1d",
    "ModulatedConv2d",
    "ModulatedConv3d",
    "ModulatedConvTranspose1d",
    "ModulatedConvTranspose2d",
    "ModulatedConvTranspose3d",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ModulatedConvNd(ModulatedLayer):
    """A ``torch.nn`` convolution of rank ``rank`` with a frozen base and per-task mAdaFM style sets.

    ``x [N, C_in, *s]`` -> ``[N, C_out, *s_out]``. Parameters (frozen): ``weight`` (the base's),
    ``bias [C_out] | None``. Buffers: ``weight_norm`` (the weight's shape), ``weight_mean,
    weight_std [A, B]`` (the statistics of each kernel slice; ``[A, B]`` = the weight's two first
    axes, also the shape of ``gamma``/``beta``).
    """

    style_cls = ConvStyle
    base_type: type[nn.Module]
    rank: int
    transposed: bool = False

    def __init__(self, base: nn.Module):
        super().__init__()
        if type(base) is not self.base_type:
            raise TypeError(f"{type(self).__name__} wraps an nn.{self.base_type.__name__}, got {type(base).__name__}")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.dilation = tuple(base.kernel_size), tuple(base.stride), tuple(base.dilation)
        self.padding, self.padding_mode, self.groups = base.padding, base.padding_mode, base.groups
        self.output_padding = tuple(base.output_padding) if self.transposed else (0,) * self.rank
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self._op_padding, self._pre_pad = self._resolve_padding()
        weight_norm, mean, std = ops.normalize_weight(self.weight)
        self.register_buffer("weight_norm", weight_norm)
        self.register_buffer("weight_mean", mean)
        self.register_buffer("weight_std", std)
        self._init_bank()

    def _resolve_padding(self) -> tuple[list[int], Optional[list[int]]]:
        """The op's numeric padding, and an explicit ``F.pad`` (last axis first) where the padding is
        not zeros or not symmetric (``padding="same"`` with an even dilated kernel: the extra row
        goes after, as in PyTorch)."""
        if self.transposed:
            return list(self.padding), None
        sides = []
        for axis, (k, d) in enumerate(zip(self.kernel_size, self.dilation)):
            if self.padding == "valid":
                sides.append((0, 0))
            elif self.padding == "same":
                total = d * (k - 1)
                sides.append((total // 2, total - total // 2))
            else:
                sides.append((self.padding[axis], self.padding[axis]))
        if self.padding_mode == "zeros" and all(left == right for left, right in sides):
            return [left for left, _ in sides], None
        return [0] * self.rank, [p for side in reversed(sides) for p in side]

    def source_style(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.weight_std, self.weight_mean, self.weight_std.new_zeros(self.out_channels)

    def modulated_weight(self, gamma: Tensor, beta: Tensor) -> Tensor:
        """``gamma * weight_norm + beta`` for one dense style set ``[A, B]``, in the weight's shape."""
        a, b = self.weight_norm.shape[:2]
        flat = ops.madafm_weight(self.weight_norm.reshape(a, b, -1, 1), gamma, beta, backend="reference")
        return flat.reshape(self.weight_norm.shape)

    def _output_padding(self, x: Tensor, output_size: Optional[Sequence[int]]) -> list[int]:
        """A transposed convolution's output padding for an ``output_size`` (as ``nn.ConvTranspose*d``)."""
        if output_size is None:
            return list(self.output_padding)
        size = list(output_size)[-self.rank:]
        if len(size) != self.rank:
            raise ValueError(f"output_size must have {self.rank} spatial sizes, got {list(output_size)}")
        out = []
        for axis in range(self.rank):
            smallest = ((x.shape[axis + 2] - 1) * self.stride[axis] - 2 * self.padding[axis]
                        + self.dilation[axis] * (self.kernel_size[axis] - 1) + 1)
            extra = size[axis] - smallest
            if not 0 <= extra < self.stride[axis]:
                raise ValueError(f"output_size {size} is not reachable from input {tuple(x.shape[2:])}: each size "
                                 f"must lie in [{smallest}, {smallest + self.stride[axis] - 1}] on axis {axis}")
            out.append(extra)
        return out

    def _source(self, x: Tensor, output_padding: list[int]) -> Tensor:
        """Task 0: exactly the ``torch.nn`` module's call."""
        if self.transposed:
            return _CONV_TRANSPOSE[self.rank](x, self.weight, self.bias, self.stride, self.padding, output_padding,
                                              self.groups, self.dilation)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pre_pad, mode=self.padding_mode)
            return _CONV[self.rank](x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return _CONV[self.rank](x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _modulated(self, x: Tensor, gamma, beta, bias: Tensor, task_ids: Optional[Tensor],
                   output_padding: list[int]) -> Tensor:
        return ops.modulated_conv(
            x, self.weight_norm, gamma, beta, self.total_bias(bias), stride=list(self.stride),
            padding=self._op_padding, dilation=list(self.dilation), groups=self.groups, transposed=self.transposed,
            output_padding=output_padding, task_ids=task_ids, backend=self.backend,
        )

    def forward(self, x: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        """``output_size`` (transposed convolutions only): as ``nn.ConvTranspose*d.forward``."""
        if output_size is not None and not self.transposed:
            raise TypeError(f"{type(self).__name__}.forward takes output_size only for transposed convolutions")
        output_padding = self._output_padding(x, output_size) if self.transposed else [0] * self.rank
        sel = self.selection()
        if sel.task_ids is None and sel.override is None and sel.task == 0:
            return self._source(x, output_padding)
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if sel.task_ids is not None:
            gamma, beta, bias, local, _ = self._stacked_styles(sel.task_ids)
            return self._modulated(x, gamma, beta, bias, local, output_padding)
        gamma, beta, bias = sel.override or self.style(sel.task)
        return self._modulated(x, gamma, beta, bias, None, output_padding)

    def plain_module(self, weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
        """The plain ``torch.nn`` convolution of this layer's configuration with ``weight`` (the
        shape of :attr:`weight`) and ``bias [C_out] | None`` (None: ``bias=False``); the tensors
        become its parameters as they are (export, unload)."""
        options = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                       bias=bias is not None, padding_mode=self.padding_mode, device="meta")
        if self.transposed:
            options["output_padding"] = self.output_padding
        module = self.base_type(self.in_channels, self.out_channels, self.kernel_size, **options)
        module.weight = nn.Parameter(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias)
        return module

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", tasks={self.task_names}"


class ModulatedConv1d(ModulatedConvNd):
    """``nn.Conv1d``: ``x [N, C_in, L]``, weight ``[C_out, C_in/groups, k]``."""

    base_type, rank = nn.Conv1d, 1


class ModulatedConv2d(ModulatedConvNd):
    """``nn.Conv2d``: ``x [N, C_in, H, W]``, weight ``[C_out, C_in/groups, kh, kw]``.

    A dense one (``groups=1``) runs :func:`gmem.ops.modulated_conv2d` (fused kernels, low-rank
    styles as factors); a grouped or depthwise one :func:`gmem.ops.modulated_conv`.
    """

    base_type, rank = nn.Conv2d, 2

    def _modulated(self, x: Tensor, gamma, beta, bias: Tensor, task_ids: Optional[Tensor],
                   output_padding: list[int]) -> Tensor:
        if self.groups != 1:
            return super()._modulated(x, gamma, beta, bias, task_ids, output_padding)
        return ops.modulated_conv2d(
            x, self.weight_norm, gamma, beta, self.total_bias(bias), stride=list(self.stride),
            padding=self._op_padding, dilation=list(self.dilation), task_ids=task_ids, backend=self.backend,
        )


class ModulatedConv3d(ModulatedConvNd):
    """``nn.Conv3d``: ``x [N, C_in, D, H, W]``, weight ``[C_out, C_in/groups, kd, kh, kw]``."""

    base_type, rank = nn.Conv3d, 3


class ModulatedConvTranspose1d(ModulatedConvNd):
    """``nn.ConvTranspose1d``: weight ``[C_in, C_out/groups, k]``, ``gamma, beta [C_in, C_out/groups]``."""

    base_type, rank, transposed = nn.ConvTranspose1d, 1, True


class ModulatedConvTranspose2d(ModulatedConvNd):
    """``nn.ConvTranspose2d``: weight ``[C_in, C_out/groups, kh, kw]``, ``gamma, beta [C_in, C_out/groups]``."""

    base_type, rank, transposed = nn.ConvTranspose2d, 2, True


class ModulatedConvTranspose3d(ModulatedConvNd):
    """``nn.ConvTranspose3d``: weight ``[C_in, C_out/groups, kd, kh, kw]``, ``gamma, beta [C_in, C_out/groups]``."""

    base_type, rank, transposed = nn.ConvTranspose3d, 3, True
