"""The modulated weight ``gamma * weight_norm + beta`` and its backward, elementwise in Triton.

Only for users who want the weight itself (the fused convolution never builds it in memory).
Both functions are ``gmem::triton_`` ops (see :func:`._config.kernel_op`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, kernel_op, next_pow2, wrap_triton


@triton.jit
def _madafm_weight_kernel(wn_ptr, g_ptr, b_ptr, out_ptr, ROWS, OI, C_in, K,
                          sgt, sgo, sgi, sbt, sbo, sbi,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``(t, o, i)`` of the contiguous ``[T, O, I, K]`` output; ``weight_norm`` contiguous ``[O*I, K]``."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = row < ROWS
    t = (row // OI).to(tl.int64)
    oi = row % OI
    o = oi // C_in
    i = oi % C_in
    gam = tl.load(g_ptr + t * sgt + o * sgo + i * sgi, mask=row_ok, other=0.0).to(tl.float32)
    bet = tl.load(b_ptr + t * sbt + o * sbo + i * sbi, mask=row_ok, other=0.0).to(tl.float32)
    ok = row_ok[:, None] & (k < K)[None, :]
    wn = tl.load(wn_ptr + oi.to(tl.int64)[:, None] * K + k[None, :], mask=ok, other=0.0).to(tl.float32)
    out = gam[:, None] * wn + bet[:, None]
    tl.store(out_ptr + row.to(tl.int64)[:, None] * K + k[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _madafm_weight_backward_kernel(dw_ptr, wn_ptr, dg_ptr, db_ptr, ROWS, OI, K,
                                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dg[row] = sum_k dW[row, k] * Wn[row % OI, k]``, ``db[row] = sum_k dW[row, k]`` (contiguous)."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < ROWS
    oi = (row % OI).to(tl.int64)
    dg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    db = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (k < K)[None, :]
        dw = tl.load(dw_ptr + row.to(tl.int64)[:, None] * K + k[None, :], mask=ok, other=0.0).to(tl.float32)
        wn = tl.load(wn_ptr + oi[:, None] * K + k[None, :], mask=ok, other=0.0).to(tl.float32)
        dg += tl.sum(dw * wn, 1)
        db += tl.sum(dw, 1)
    tl.store(dg_ptr + row, dg.to(dg_ptr.dtype.element_ty), mask=row_ok)
    tl.store(db_ptr + row, db.to(db_ptr.dtype.element_ty), mask=row_ok)


@kernel_op("gmem::triton_madafm_weight")
def madafm_weight(weight_norm: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``weight_norm [O, I, kh, kw]``, ``gamma, beta [O, I] | [T, O, I]`` -> ``[(T,) O, I, kh, kw]``."""
    o, c_in, kh, kw = weight_norm.shape
    lead = gamma.shape[:-2]
    g3, b3 = gamma.reshape(-1, o, c_in), beta.reshape(-1, o, c_in)
    out = torch.empty((*lead, o, c_in, kh, kw), dtype=weight_norm.dtype, device=weight_norm.device)
    rows, k = g3.shape[0] * o * c_in, kh * kw
    if out.numel() == 0:
        return out
    block_k = min(next_pow2(k), 16 if INTERPRET else 128)
    block_r = 16 if INTERPRET else max(1, 4096 // block_k)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    wrap_triton(_madafm_weight_kernel)[grid](weight_norm.contiguous(), g3, b3, out, rows, o * c_in, c_in, k,
                                *g3.stride(), *b3.stride(), BLOCK_R=block_r, BLOCK_K=block_k)
    return out


@kernel_op("gmem::triton_madafm_weight_backward")
def madafm_weight_backward(grad_weight: Tensor, weight_norm: Tensor) -> tuple[Tensor, Tensor]:
    """``grad_weight [(T,) O, I, kh, kw]`` -> ``(dgamma, dbeta)``, each ``[(T,) O, I]``."""
    o, c_in, kh, kw = weight_norm.shape
    shape = grad_weight.shape[:-2]
    dg = torch.empty(shape, dtype=grad_weight.dtype, device=grad_weight.device)
    db = torch.empty_like(dg)
    rows, k = dg.numel(), kh * kw
    if rows == 0:
        return dg, db
    block_k = min(next_pow2(k), 16 if INTERPRET else 64)
    block_r = 16 if INTERPRET else 64
    wrap_triton(_madafm_weight_backward_kernel)[(triton.cdiv(rows, block_r),)](
        grad_weight.contiguous(), weight_norm.contiguous(), dg, db, rows, o * c_in, k,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return dg, db
