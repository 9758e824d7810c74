"""mFiLM linear: one shared GEMM ``x Wn^T`` plus a per-sample epilogue, in one kernel.

``(g_t[:, None] * Wn + be_t[:, None]) x = g_t * (Wn x) + be_t * sum(x)``: the GEMM with the frozen
``Wn`` is the same for every task, so the forward and the input gradient need no grouping at all:
each row looks up its task in the epilogue (forward) or prologue (input gradient). The style
gradients are per-task reductions over rows, so they run per segment of the stably sorted batch
(see :mod:`.grouping`), as in the convolution, with the same deterministic two-stage reduction.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, dot_precision, kernel_op, tuned, wrap_triton
from .grouping import TaskGroups


def _configs() -> list[triton.Config]:
    shapes = [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 3, 4), (32, 64, 64, 4, 4),
              (128, 128, 32, 3, 8), (16, 64, 128, 3, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)


@tuned(_configs(), key=["M", "C_in", "C_out"], interpret_config=_INTERPRET)
@triton.jit
def _linear_fwd_kernel(
    x_ptr, wn_ptr, g_ptr, b_ptr, bias_ptr, tid_ptr, y_ptr,
    M, C_in, C_out,
    sxm, sxi, swo, swi, sgt, sgo, sbt, sbo, sct, sco, sym, syo,
    HAS_BIAS: tl.constexpr, HAS_TASKS: tl.constexpr, IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[m, o] = g[t,o] * (x Wn^T)[m,o] + be[t,o] * sum_i x[m,i] + c[t,o]`` with ``t = task(m)``."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    o_ok = o < C_out
    x_rows = x_ptr + m.to(tl.int64) * sxm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(0, C_in, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        i_ok = i < C_in
        xt = tl.load(x_rows[:, None] + i[None, :] * sxi, mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        wt = tl.load(wn_ptr + o[None, :] * swo + i[:, None] * swi, mask=i_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=IN_PREC)
        row_sum += tl.sum(xt.to(tl.float32), 1)
    if HAS_TASKS:
        t = tl.load(tid_ptr + m, mask=m_ok, other=0).to(tl.int64)
    else:
        t = tl.zeros((BLOCK_M,), dtype=tl.int64)
    ok = m_ok[:, None] & o_ok[None, :]
    gam = tl.load(g_ptr + t[:, None] * sgt + o[None, :] * sgo, mask=ok, other=0.0).to(tl.float32)
    bet = tl.load(b_ptr + t[:, None] * sbt + o[None, :] * sbo, mask=ok, other=0.0).to(tl.float32)
    out = gam * acc + bet * row_sum[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + t[:, None] * sct + o[None, :] * sco, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64)[:, None] * sym + o[None, :] * syo, out.to(y_ptr.dtype.element_ty), mask=ok)


@tuned(_configs(), key=["M", "C_in", "C_out"], interpret_config=_INTERPRET)
@triton.jit
def _linear_dx_kernel(
    dy_ptr, wn_ptr, g_ptr, b_ptr, tid_ptr, dx_ptr,
    M, C_in, C_out,
    sdm, sdo, swo, swi, sgt, sgo, sbt, sbo, sxm, sxi,
    HAS_TASKS: tl.constexpr, IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dx[m, i] = sum_o g[t,o] dy[m,o] Wn[o,i] + sum_o be[t,o] dy[m,o]`` (columns ``i``)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    i_ok = i < C_in
    if HAS_TASKS:
        t = tl.load(tid_ptr + m, mask=m_ok, other=0).to(tl.int64)
    else:
        t = tl.zeros((BLOCK_M,), dtype=tl.int64)
    dy_rows = dy_ptr + m.to(tl.int64) * sdm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_term = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for o0 in range(0, C_out, BLOCK_K):
        o = o0 + tl.arange(0, BLOCK_K)
        ok = m_ok[:, None] & (o < C_out)[None, :]
        dyt = tl.load(dy_rows[:, None] + o[None, :] * sdo, mask=ok, other=0.0)
        gam = tl.load(g_ptr + t[:, None] * sgt + o[None, :] * sgo, mask=ok, other=0.0).to(tl.float32)
        bet = tl.load(b_ptr + t[:, None] * sbt + o[None, :] * sbo, mask=ok, other=0.0).to(tl.float32)
        row_term += tl.sum(dyt.to(tl.float32) * bet, 1)
        a = (dyt.to(tl.float32) * gam).to(dyt.dtype)
        wt = tl.load(wn_ptr + o[:, None] * swo + i[None, :] * swi, mask=(o < C_out)[:, None] & i_ok[None, :], other=0.0)
        acc = tl.dot(a, wt.to(dyt.dtype), acc, input_precision=IN_PREC)
    out = acc + row_term[:, None]
    tl.store(dx_ptr + m.to(tl.int64)[:, None] * sxm + i[None, :] * sxi, out.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def _linear_style_grad_kernel(
    x_ptr, dy_ptr, wn_ptr, dg_ptr, db_ptr, dc_ptr,
    order_ptr, seg_start_ptr, seg_count_ptr, num_slots,
    C_in, C_out, sxm, sxi, sdm, sdo, swo, swi,
    HAS_ORDER: tl.constexpr, SPLIT: tl.constexpr, IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partials over one row chunk of one segment: ``dg = sum dy*(x Wn^T)``, ``dbe = sum dy*sum(x)``,
    ``dc = sum dy``, each ``[BLOCK_N]`` of ``[chunk, seg, O]`` (the shared GEMM is recomputed)."""
    seg = tl.program_id(0) // SPLIT
    chunk = tl.program_id(0) % SPLIT
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < C_out
    start = tl.load(seg_start_ptr + seg)
    rows = tl.load(seg_count_ptr + seg)
    chunk_rows = tl.cdiv(tl.cdiv(rows, SPLIT), BLOCK_M) * BLOCK_M
    lo = chunk * chunk_rows
    hi = tl.minimum(lo + chunk_rows, rows)
    dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        row_ok = r < hi
        if HAS_ORDER:
            m = tl.load(order_ptr + start + r, mask=row_ok, other=0)
        else:
            m = start + r
        m = m.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i0 in range(0, C_in, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            i_ok = i < C_in
            xt = tl.load(x_ptr + m[:, None] * sxm + i[None, :] * sxi, mask=row_ok[:, None] & i_ok[None, :], other=0.0)
            wt = tl.load(wn_ptr + o[None, :] * swo + i[:, None] * swi, mask=i_ok[:, None] & o_ok[None, :], other=0.0)
            acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=IN_PREC)
            row_sum += tl.sum(xt.to(tl.float32), 1)
        dyt = tl.load(dy_ptr + m[:, None] * sdm + o[None, :] * sdo, mask=row_ok[:, None] & o_ok[None, :],
                      other=0.0).to(tl.float32)
        dg += tl.sum(dyt * acc, 0)
        db += tl.sum(dyt * row_sum[:, None], 0)
        dc += tl.sum(dyt, 0)
    out = (chunk * num_slots + seg).to(tl.int64) * C_out + o
    tl.store(dg_ptr + out, dg, mask=o_ok)
    tl.store(db_ptr + out, db, mask=o_ok)
    tl.store(dc_ptr + out, dc, mask=o_ok)


def _stack_strides(t: Optional[Tensor]) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def linear_forward(
    x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor],
) -> Tensor:
    """``x [M, I]``, ``weight_norm [O, I]``, ``gamma, beta [T, O]``, ``bias None | [T, O]``,
    ``task_ids None | int [M]`` (None: every row uses task 0) -> ``y [M, O]``."""
    return _linear_forward_op(x, weight_norm, gamma, beta, bias, task_ids)


@kernel_op("gmem::triton_linear_forward")
def _linear_forward_op(
    x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
    task_ids: Optional[Tensor],
) -> Tensor:
    m, c_in = x.shape
    c_out = weight_norm.shape[0]
    y = torch.empty((m, c_out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))

    wrap_triton(_linear_fwd_kernel)[grid](
        x, weight_norm, gamma, beta, bias if bias is not None else gamma,
        task_ids if task_ids is not None else x, y,
        m, c_in, c_out, *x.stride(), *weight_norm.stride(), *gamma.stride(), *beta.stride(),
        *_stack_strides(bias), *y.stride(),
        HAS_BIAS=bias is not None, HAS_TASKS=task_ids is not None, IN_PREC=dot_precision(x.dtype),
    )
    return y


def linear_backward(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor,
    bias: Optional[Tensor], task_ids: Optional[Tensor], groups: TaskGroups, output_mask: Sequence[bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx [M, I], dgamma [T, O], dbeta [T, O], dbias [T, O])``, ``None`` where the mask is False."""
    need_x, need_gamma, need_beta, need_bias = output_mask
    need_bias = need_bias and bias is not None
    dx = dgamma = dbeta = dbias = None
    if need_x:
        dx = _linear_input_grad_op(grad_out, x, weight_norm, gamma, beta, task_ids)
    if need_gamma or need_beta or need_bias:
        sums = _linear_style_grad_op(x, grad_out, weight_norm, groups.order, groups.start, groups.count)
        if need_gamma:
            dgamma = groups.per_task(sums[0]).to(gamma.dtype)
        if need_beta:
            dbeta = groups.per_task(sums[1]).to(beta.dtype)
        if need_bias:
            dbias = groups.per_task(sums[2]).to(bias.dtype)
    return dx, dgamma, dbeta, dbias


@kernel_op("gmem::triton_linear_input_grad")
def _linear_input_grad_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, task_ids: Optional[Tensor],
) -> Tensor:
    """``dx`` shaped and strided like ``x`` (read for nothing else)."""
    m, c_in = x.shape
    c_out = weight_norm.shape[0]
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]))

    wrap_triton(_linear_dx_kernel)[grid](
        grad_out, weight_norm, gamma, beta, task_ids if task_ids is not None else x, dx,
        m, c_in, c_out, *grad_out.stride(), *weight_norm.stride(), *gamma.stride(),
        *beta.stride(), *dx.stride(),
        HAS_TASKS=task_ids is not None, IN_PREC=dot_precision(x.dtype),
    )
    return dx


@kernel_op("gmem::triton_linear_style_grad")
def _linear_style_grad_op(
    x: Tensor, grad_out: Tensor, weight_norm: Tensor,
    order: Optional[Tensor], seg_start: Tensor, seg_count: Tensor,
) -> Tensor:
    """Per-slot float32 sums ``[3, S, O]``: ``dgamma``, ``dbeta``, ``dbias`` of each segment."""
    m, c_in = x.shape
    c_out = weight_norm.shape[0]
    slots = seg_count.shape[0]
    block_n, block_m, block_k = (16, 16, 16) if INTERPRET else (64, 64, 32)
    o_blocks = triton.cdiv(c_out, block_n)
    if INTERPRET:
        split = 2 if m >= 32 else 1
    else:
        split = int(max(1, min(264 // max(1, o_blocks * slots), m // max(1, 128 * slots), 64)))
    # three separate buffers, not views of one: a kernel writing views is harder on functionalization
    dg, db, dc = (torch.empty((split, slots, c_out), dtype=torch.float32, device=x.device) for _ in range(3))
    wrap_triton(_linear_style_grad_kernel)[(slots * split, o_blocks)](
        x, grad_out, weight_norm, dg, db, dc,
        order if order is not None else seg_start, seg_start, seg_count, slots,
        c_in, c_out, *x.stride(), *grad_out.stride(), *weight_norm.stride(),
        HAS_ORDER=order is not None, SPLIT=split, IN_PREC=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return torch.stack([dg.sum(0), db.sum(0), dc.sum(0)])  # fixed-order second stage over the row chunks
