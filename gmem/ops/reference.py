"""The pure-PyTorch reference: the definition of every gmem op.

Every other backend is tested against these functions, and these against a float64 formula. They
take *canonical* arguments, already validated by :mod:`gmem.ops.functional`:

* conv: ``x [N, I, H, W]``, ``weight_norm [O, I, kh, kw]``;
* linear: ``x [M, I]``, ``weight_norm [O, I]``;
* single task: ``gamma, beta [O, I]`` (conv) or ``[O]`` (linear), ``bias None | [O]``,
  ``task_ids None``;
* mixed tasks: ``gamma, beta [T, O, I]`` or ``[T, O]``, ``bias None | [T, O]``,
  ``task_ids`` int64 ``[N]`` with values in ``[0, T)``, in any order and mix.

Everything here is built from differentiable aten ops, so these functions also serve as the
double-backward path (the R1 penalty of GAN training differentiates through a gradient).

Mixed-task batches are grouped, not looped over samples: a stable sort of ``task_ids`` gives one
contiguous segment per task; each task present costs one convolution with its own weight; the
result is written back through the inverse permutation. Tasks absent from the batch cost nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "normalize_weight",
    "madafm_weight",
    "madafm_weight_backward",
    "modulated_conv2d",
    "modulated_conv2d_backward",
    "modulated_linear",
    "modulated_linear_backward",
    "task_segments",
]

# Below this the standard deviation of a slice counts as zero (see normalize_weight).
STD_EPS = 1e-12


@torch.no_grad()
def normalize_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split a frozen weight into ``weight_norm``, ``mean``, ``std`` with ``weight = std*norm + mean``.

    ``weight [O, I, kh, kw]`` (conv): statistics of each ``kh x kw`` slice, ``mean, std [O, I]``;
    likewise ``[A, B, k]`` and ``[A, B, kd, kh, kw]`` (1-D and 3-D kernels, transposed convolutions'
    ``[C_in, C_out/groups, *k]``): statistics of each ``[a, b]`` kernel slice, ``mean, std [A, B]``.
    ``weight [O, I]`` (linear): statistics of each row, ``mean, std [O]``.

    The standard deviation is the unbiased one (``torch.std``, as the paper's code). Two rules keep
    every value finite:

    * a slice of one element (every 1x1 conv kernel, a linear layer with one input) is not
      normalised: ``mean = 0, std = 1``, so ``weight_norm = weight`` and Gamma scales the weight;
    * a constant slice of several elements (``std <= 1e-12``) keeps its mean and gets ``std = 1``,
      so its ``weight_norm`` is 0 and the style shift B alone sets it.

    Statistics are computed in float64 and returned in the weight's dtype.
    """
    if weight.ndim in (3, 4, 5):
        flat = weight.detach().double().flatten(2)  # [O, I, k]
    elif weight.ndim == 2:
        flat = weight.detach().double().unsqueeze(1)  # [O, 1, I]
    else:
        raise ValueError(
            f"normalize_weight: weight must be [C_out, C_in, *k] with 1 to 3 kernel axes (conv) or "
            f"[d_out, d_in] (linear), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"normalize_weight: weight must be floating point, got {weight.dtype}")
    k = flat.shape[-1]
    if k == 1:
        mean = torch.zeros(flat.shape[:-1], dtype=flat.dtype, device=flat.device)
        std = torch.ones_like(mean)
    else:
        mean = flat.mean(-1)
        std = flat.std(-1)
        std = torch.where(std > STD_EPS, std, torch.ones_like(std))
    norm = (flat - mean[..., None]) / std[..., None]
    if weight.ndim == 2:
        norm, mean, std = norm.squeeze(1), mean.squeeze(1), std.squeeze(1)
    dtype = weight.dtype
    return norm.reshape(weight.shape).to(dtype), mean.to(dtype), std.to(dtype)


def madafm_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``gamma * weight_norm + beta`` with ``gamma, beta [..., O, I]`` broadcast over the kernel.

    ``weight_norm [O, I, kh, kw]`` -> ``[..., O, I, kh, kw]``.
    """
    return torch.addcmul(beta[..., None, None], gamma[..., None, None], weight_norm)


def madafm_weight_backward(grad_weight: Tensor, weight_norm: Tensor) -> tuple[Tensor, Tensor]:
    """``(dgamma, dbeta)`` of :func:`madafm_weight`: window sums of ``dW * weight_norm`` and ``dW``."""
    return (grad_weight * weight_norm).sum((-2, -1)), grad_weight.sum((-2, -1))


def task_segments(task_ids: Tensor, num_tasks: int) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """Group samples by task: ``(order, [(task, start, end), ...])`` for the tasks present.

    ``order`` is the stable sort permutation of ``task_ids``: ``x[order][start:end]`` are the
    samples of ``task``, in their original relative order. One host synchronisation (the counts).
    """
    order = torch.argsort(task_ids, stable=True)
    counts = torch.bincount(task_ids, minlength=num_tasks).tolist()
    segments, start = [], 0
    for task, count in enumerate(counts):
        if count:
            segments.append((task, start, start + count))
            start += count
    return order, segments


def _inverse_permutation(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def modulated_conv2d(
    x: Tensor,
    weight_norm: Tensor,
    gamma: Tensor,
    beta: Tensor,
    bias: Optional[Tensor],
    task_ids: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """mAdaFM convolution: ``conv(x[n], gamma_t * weight_norm + beta_t) + bias_t`` with t = t(n)."""
    if task_ids is None:
        weight = madafm_weight(weight_norm, gamma, beta)
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    order, segments = task_segments(task_ids, gamma.shape[0])
    if not segments:  # an empty batch: any task's weight gives the (empty) output shape
        return F.conv2d(x, madafm_weight(weight_norm, gamma[0], beta[0]), None, stride, padding, dilation)
    x_sorted = x.index_select(0, order)
    outputs = []
    for task, start, end in segments:
        weight = madafm_weight(weight_norm, gamma[task], beta[task])
        task_bias = None if bias is None else bias[task]
        outputs.append(F.conv2d(x_sorted[start:end], weight, task_bias, stride, padding, dilation))
    return torch.cat(outputs).index_select(0, _inverse_permutation(order))


def _conv_grads(x, weight_norm, gamma, beta, grad_out, stride, padding, dilation, mask):
    """Gradients of one single-task modulated conv (docs/design.md, section 2)."""
    need_x, need_gamma, need_beta, need_bias = mask
    weight = madafm_weight(weight_norm, gamma, beta)
    dx = dgamma = dbeta = dbias = None
    if need_x:
        dx = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride, padding, dilation)
    if need_gamma or need_beta:
        dweight = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, stride, padding, dilation)
        dgamma, dbeta = madafm_weight_backward(dweight, weight_norm)
    if need_bias:
        dbias = grad_out.sum((0, 2, 3))
    return dx, dgamma, dbeta, dbias


def modulated_conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight_norm: Tensor,
    gamma: Tensor,
    beta: Tensor,
    bias: Optional[Tensor],
    task_ids: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, dgamma, dbeta, dbias)`` of :func:`modulated_conv2d`; ``None`` where the mask is False.

    Mixed tasks: ``dgamma, dbeta [T, O, I]`` and ``dbias [T, O]``, zero for tasks absent from the batch.
    """
    mask = list(output_mask)
    mask[3] = mask[3] and bias is not None
    if task_ids is None:
        return _conv_grads(x, weight_norm, gamma, beta, grad_out, stride, padding, dilation, mask)
    order, segments = task_segments(task_ids, gamma.shape[0])
    if not segments:  # an empty batch: every gradient is zero
        zeros = lambda t, m: torch.zeros_like(t) if (m and t is not None) else None
        return zeros(x, mask[0]), zeros(gamma, mask[1]), zeros(beta, mask[2]), zeros(bias, mask[3])
    x_sorted = x.index_select(0, order)
    g_sorted = grad_out.index_select(0, order)
    dx_parts, dgamma_rows, dbeta_rows, dbias_rows = [], {}, {}, {}
    for task, start, end in segments:
        dx, dg, db, dc = _conv_grads(
            x_sorted[start:end], weight_norm, gamma[task], beta[task], g_sorted[start:end],
            stride, padding, dilation, mask,
        )
        dx_parts.append(dx)
        dgamma_rows[task], dbeta_rows[task], dbias_rows[task] = dg, db, dc

    def stack(rows, like):
        # Tasks absent from the batch get exact zeros; built with stack (not in-place writes) so
        # that the result stays differentiable for double backward.
        zero = like.new_zeros(like.shape[1:])
        return torch.stack([rows.get(t, zero) for t in range(like.shape[0])])

    dx = torch.cat(dx_parts).index_select(0, _inverse_permutation(order)) if mask[0] else None
    dgamma = stack(dgamma_rows, gamma) if mask[1] else None
    dbeta = stack(dbeta_rows, beta) if mask[2] else None
    dbias = stack(dbias_rows, bias) if mask[3] else None
    return dx, dgamma, dbeta, dbias


def modulated_linear(
    x: Tensor,
    weight_norm: Tensor,
    gamma: Tensor,
    beta: Tensor,
    bias: Optional[Tensor],
    task_ids: Optional[Tensor],
) -> Tensor:
    """mFiLM linear through the shared-GEMM identity.

    ``(gamma[:, None] * Wn + beta[:, None]) z = gamma * (Wn z) + beta * sum(z)``: the GEMM with the
    frozen ``Wn`` is the same for every task, so a mixed-task batch costs one plain GEMM and a
    per-sample epilogue. ``x [M, I]`` -> ``[M, O]``.
    """
    shared = F.linear(x, weight_norm)
    row_sum = x.sum(-1, keepdim=True)
    if task_ids is not None:
        gamma, beta = gamma.index_select(0, task_ids), beta.index_select(0, task_ids)
        bias = None if bias is None else bias.index_select(0, task_ids)
    out = torch.addcmul(beta * row_sum, gamma, shared)
    return out if bias is None else out + bias


def modulated_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight_norm: Tensor,
    gamma: Tensor,
    beta: Tensor,
    bias: Optional[Tensor],
    task_ids: Optional[Tensor],
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, dgamma, dbeta, dbias)`` of :func:`modulated_linear` (mixed tasks: ``[T, O]`` each)."""
    need_x, need_gamma, need_beta, need_bias = output_mask
    need_bias = need_bias and bias is not None
    g = gamma if task_ids is None else gamma.index_select(0, task_ids)
    b = beta if task_ids is None else beta.index_select(0, task_ids)

    def per_task(values: Tensor, like: Tensor) -> Tensor:  # [M, O] -> [O] or [T, O]
        if task_ids is None:
            return values.sum(0)
        return like.new_zeros(like.shape).index_add(0, task_ids, values)

    dx = dgamma = dbeta = dbias = None
    if need_x:
        dx = (grad_out * g) @ weight_norm + (grad_out * b).sum(-1, keepdim=True)
    if need_gamma:
        dgamma = per_task(grad_out * F.linear(x, weight_norm), gamma)
    if need_beta:
        dbeta = per_task(grad_out * x.sum(-1, keepdim=True), beta)
    if need_bias:
        dbias = per_task(grad_out, bias)
    return dx, dgamma, dbeta, dbias
