"""Low-rank style sets in the fused convolution: ``Gamma_t = u_t diag(s_t) v_t^T`` (same for B_t).

The forward and input-gradient kernels rebuild each ``[O_blk, I_blk]`` style block from the factors
in registers (:func:`.conv._style_tile`), so no task's dense style matrix is ever stored. The style
gradient kernel yields ``dGamma`` per *segment* ``[S, O, I]`` (``S <= N``, the tasks present), from
which the factor gradients follow by small batched products (docs/design.md, section 4):
``du = dG v diag(s)``, ``dv = dG^T u diag(s)``, ``ds = diag(u^T dG v)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .conv import conv2d_backward, conv2d_forward
from .grouping import TaskGroups

Factors = tuple[Tensor, Tensor, Tensor]  # u [T, O, r], s [T, r], v [T, I, r]


def conv2d_lowrank_forward(
    x: Tensor, weight_norm: Tensor, gamma: Factors, beta: Factors, bias: Optional[Tensor],
    groups: TaskGroups, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> Tensor:
    """``y [N, O, OH, OW]`` with ``Gamma_t``/``B_t`` rebuilt in the kernel from stacked factors."""
    return conv2d_forward(x, weight_norm, tuple(gamma), tuple(beta), bias, groups, stride, padding, dilation)


def _factor_grads(d_slot: Tensor, factors: Factors, groups: TaskGroups, want: bool):
    if not want:
        return None
    u, s, v = factors
    t = u.shape[0]
    task = groups.task.long().clamp(max=t - 1)  # unused slots (dummy task T) have d_slot == 0
    us, ss, vs = u.index_select(0, task).float(), s.index_select(0, task).float(), v.index_select(0, task).float()
    du = torch.bmm(d_slot, vs) * ss[:, None, :]  # [S, O, r]
    dv = torch.bmm(d_slot.transpose(1, 2), us) * ss[:, None, :]  # [S, I, r]
    ds = (torch.bmm(d_slot, vs) * us).sum(1)  # diag(u^T dG v): [S, r]
    return tuple(groups.per_task(g).to(u.dtype) for g in (du, ds, dv))


def conv2d_lowrank_backward(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Factors, beta: Factors,
    bias: Optional[Tensor], groups: TaskGroups, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], output_mask: Sequence[bool],
):
    """``(dx, (du, ds, dv) of gamma, (du, ds, dv) of beta, dbias [T, O])``, None where masked."""
    dx, dg, db, dbias = conv2d_backward(
        grad_out, x, weight_norm, tuple(gamma), tuple(beta), bias, groups, stride, padding, dilation,
        output_mask, per_slot=True,
    )
    return (
        dx,
        _factor_grads(dg, gamma, groups, output_mask[1]),
        _factor_grads(db, beta, groups, output_mask[2]),
        dbias,
    )
