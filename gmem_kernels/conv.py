"""mAdaFM convolution as an implicit GEMM with the modulated weight built in registers.

Layouts: any strides for ``x``, ``weight_norm``, ``gamma``, ``beta``, ``bias`` (NCHW or channels-last,
expanded views); outputs are written through their strides.

GEMM view of the forward pass, per segment (task) of the batch (see :mod:`.grouping`):
rows ``m`` = (sample, output pixel), columns ``o``, reduction ``k`` = (i, kh, kw). The loop runs over
blocks of input channels outside and the kernel window inside, so the ``[BLOCK_K, BLOCK_N]`` tiles of
``Gamma_t`` and ``B_t`` are loaded once per channel block and reused over the whole window; each
weight tile is ``Gamma_t * Wn[:, :, kh, kw] + B_t`` (one FMA per element, in fp32), cast to the input
dtype and fed to ``tl.dot`` with fp32 accumulation.

Mixed tasks, one launch: the programs of grid axis 0 are the row tiles of all segments laid end to
end (``sum_s ceil(rows_s / BLOCK_M) <= ceil(N*P / BLOCK_M) + S``); each program finds its segment by
a prefix sum over the (at most ``S = min(T, N)``) segment sizes, so the host never reads the task
ids. Rows map back to their original sample through the stable-sort permutation: results land in
the original order directly.

Known pitfall guarded: some Triton versions miscompile the loops over a non-1x1 kernel window at
``num_warps=8``; every configuration here with a window loop uses at most 4 warps.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, dot_precision, kernel_op, next_pow2, tuned, wrap_triton
from .grouping import TaskGroups


def _gemm_configs() -> list[triton.Config]:
    # num_warps <= 4 on purpose: window loops at 8 warps are miscompiled by some Triton versions.
    shapes = [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (128, 128, 32, 3, 4),
              (64, 32, 32, 4, 4), (32, 64, 32, 4, 4), (128, 64, 64, 3, 4), (64, 64, 64, 3, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


_INTERPRET_GEMM = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)


@triton.jit
def _segment_tile(pid, seg_count_ptr, num_slots, rows_per_sample,
                  S_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """(segment, tile within it) of the ``pid``-th row tile; segment ``>= num_slots`` past the end."""
    slots = tl.arange(0, S_BLOCK)
    count = tl.load(seg_count_ptr + slots, mask=slots < num_slots, other=0)
    tiles = (count * rows_per_sample + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    seg = tl.sum((ends <= pid).to(tl.int32), 0)
    first = tl.sum(tl.where(slots == seg, ends - tiles, 0), 0)
    return seg, pid - first


@triton.jit
def _row_samples(r, row_ok, start, P, order_ptr, HAS_ORDER: tl.constexpr):
    """Original sample index of each row ``r`` (sample x pixel, ``P`` pixels) of a segment.

    Rows are numbered in task-sorted order from the segment's ``start``; ``order`` maps a sorted
    position back to the caller's sample (absent when the batch needed no reordering).
    """
    n = start + r // P
    if HAS_ORDER:
        n = tl.load(order_ptr + n, mask=row_ok, other=0)
    return n


@triton.jit
def _style_tile(dense_ptr, d_t, d_a, d_b,
                fa_ptr, fa_t, fa_a, fa_r, fs_ptr, fs_t, fs_r, fb_ptr, fb_t, fb_b, fb_r, rank,
                task, a, b, a_ok, b_ok,
                LOWRANK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R_BLOCK: tl.constexpr):
    """``[BLOCK_A, BLOCK_B]`` fp32 block ``S[a, b]`` of task ``task``'s style matrix.

    Dense: loaded through strides ``(d_t, d_a, d_b)``. Low rank: rebuilt from the factors,
    ``S[a, b] = sum_r fa[a, r] * fs[r] * fb[b, r]`` (``fa, fb`` = ``u, v`` or ``v, u`` by layout), a
    small in-register product over rank blocks of ``R_BLOCK``: no task's style matrix is densified.
    """
    ok = a_ok[:, None] & b_ok[None, :]
    if LOWRANK:
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for r0 in range(0, rank, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            r_ok = r < rank
            fa = tl.load(fa_ptr + task * fa_t + a[:, None] * fa_a + r[None, :] * fa_r,
                         mask=a_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            sc = tl.load(fs_ptr + task * fs_t + r * fs_r, mask=r_ok, other=0.0).to(tl.float32)
            fb = tl.load(fb_ptr + task * fb_t + b[None, :] * fb_b + r[:, None] * fb_r,
                         mask=r_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(fa * sc[None, :], fb, acc, input_precision="ieee")
        return tl.where(ok, acc, 0.0)
    else:
        return tl.load(dense_ptr + task * d_t + a[:, None] * d_a + b[None, :] * d_b, mask=ok, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@tuned(_gemm_configs(), key=["C_in", "C_out", "NP", "KH", "KW"], interpret_config=_INTERPRET_GEMM)
@triton.jit
def _conv_fwd_kernel(
    x_ptr, wn_ptr, bias_ptr, y_ptr,
    g_ptr, sgt, sgo, sgi, gu_ptr, gut, guo, gur, gs_ptr, gst, gsr, gv_ptr, gvt, gvi, gvr, g_rank,
    b_ptr, sbt, sbo, sbi, bu_ptr, but, buo, bur, bs_ptr, bst, bsr, bv_ptr, bvt, bvi, bvr, b_rank,
    order_ptr, seg_start_ptr, seg_count_ptr, seg_task_ptr, num_slots,
    C_in, H, W, C_out, OH, OW, NP,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, sct, sco,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr,
    LOWRANK: tl.constexpr, R_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    P = OH * OW
    seg, tile = _segment_tile(tl.program_id(0), seg_count_ptr, num_slots, P, S_BLOCK, BLOCK_M)
    if seg >= num_slots:
        return
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_count_ptr + seg)
    task = tl.load(seg_task_ptr + seg).to(tl.int64)

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < count * P
    n = _row_samples(r, row_ok, start, P, order_ptr, HAS_ORDER)
    pix = r % P
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * sxn

    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i0 in range(0, C_in, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        i_ok = i < C_in
        w_ok = i_ok[:, None] & o_ok[None, :]
        # style tiles [BLOCK_K (i), BLOCK_N (o)]: built once, reused over the kernel window
        gam = _style_tile(g_ptr, sgt, sgi, sgo, gv_ptr, gvt, gvi, gvr, gs_ptr, gst, gsr, gu_ptr, gut, guo, gur,
                          g_rank, task, i, o, i_ok, o_ok, LOWRANK, BLOCK_K, BLOCK_N, R_BLOCK)
        bet = _style_tile(b_ptr, sbt, sbi, sbo, bv_ptr, bvt, bvi, bvr, bs_ptr, bst, bsr, bu_ptr, but, buo, bur,
                          b_rank, task, i, o, i_ok, o_ok, LOWRANK, BLOCK_K, BLOCK_N, R_BLOCK)
        wn_tile = wn_ptr + o[None, :] * swo + i[:, None] * swi
        for kh in range(KH):
            ih = ih0 + kh * dil_h
            h_ok = row_ok & (ih >= 0) & (ih < H)
            for kw in range(KW):
                iw = iw0 + kw * dil_w
                ok = h_ok & (iw >= 0) & (iw < W)
                xt = tl.load(x_rows[:, None] + i[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                             mask=ok[:, None] & i_ok[None, :], other=0.0)
                wn = tl.load(wn_tile + kh * swh + kw * sww, mask=w_ok, other=0.0).to(tl.float32)
                w = (gam * wn + bet).to(xt.dtype)
                acc = tl.dot(xt, w, acc, input_precision=IN_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + task * sct + o * sco, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + n.to(tl.int64) * syn + oh * syh + ow * syw
    tl.store(y_rows[:, None] + o[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & o_ok[None, :])


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


#: a style set: dense ``[T, O, I]``, or low-rank factors ``(u [T, O, r], s [T, r], v [T, I, r])``
Style = Union[Tensor, tuple[Tensor, Tensor, Tensor]]


def _style_args(style: list[Tensor]) -> list:
    """The 16 kernel arguments of one style set, given as ``[dense]`` or ``[u, s, v]`` (see
    :func:`_style_list`): dense pointer + strides, factors + strides, rank."""
    if len(style) == 1:
        (dense,) = style
        return [dense, *dense.stride(), dense, 0, 0, 0, dense, 0, 0, dense, 0, 0, 0, 0]
    u, s, v = style
    return [u, 0, 0, 0, u, *u.stride(), s, *s.stride(), v, *v.stride(), u.shape[-1]]


def _style_list(style: Style) -> list[Tensor]:
    """A style set as the op argument ``Tensor[]``: ``[dense]`` or ``[u, s, v]``."""
    return [style] if isinstance(style, Tensor) else list(style)


def _is_lowrank(gamma: Style, beta: Style) -> bool:
    if isinstance(gamma, Tensor) != isinstance(beta, Tensor):
        raise NotImplementedError("gmem_kernels: gamma and beta must both be dense or both low-rank")
    return not isinstance(gamma, Tensor)


def _groups_args(groups: TaskGroups) -> tuple:
    """``(order | None, start, count, task)``: the segments as op arguments."""
    return groups.order, groups.start, groups.count, groups.task


def conv2d_forward(
    x: Tensor, weight_norm: Tensor, gamma: Style, beta: Style, bias: Optional[Tensor],
    groups: TaskGroups, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> Tensor:
    """``y [N, O, OH, OW]`` of the mAdaFM conv. ``gamma, beta [T, O, I]`` (or both low-rank factor
    triples, see :data:`Style`), ``bias None | [T, O]``.

    Single task: pass ``[1, O, I]`` / ``[1, O]`` stacks with :func:`.grouping.single_group`.
    """
    _is_lowrank(gamma, beta)
    return _conv_forward_op(
        x, weight_norm, _style_list(gamma), _style_list(beta), bias, *_groups_args(groups),
        list(stride), list(padding), list(dilation),
    )


@kernel_op("gmem::triton_conv2d_forward")
def _conv_forward_op(
    x: Tensor, weight_norm: Tensor, gamma: list[Tensor], beta: list[Tensor], bias: Optional[Tensor],
    order: Optional[Tensor], seg_start: Tensor, seg_count: Tensor, seg_task: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    """:func:`conv2d_forward` as an op: style sets as ``[dense]`` or ``[u, s, v]``, segments flat."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_norm.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    slots = seg_count.shape[0]
    bias_arg = bias if bias is not None else x  # unused placeholder
    bias_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(n * oh * ow, meta["BLOCK_M"]) + slots, triton.cdiv(c_out, meta["BLOCK_N"]))

    wrap_triton(_conv_fwd_kernel)[grid](
        x, weight_norm, bias_arg, y, *_style_args(gamma), *_style_args(beta),
        order if order is not None else seg_start, seg_start, seg_count, seg_task, slots,
        c_in, h, w, c_out, oh, ow, n * oh * ow,
        *x.stride(), *weight_norm.stride(), *bias_strides,
        *y.stride(), *stride, *padding, *dilation,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_ORDER=order is not None,
        LOWRANK=len(gamma) == 3, R_BLOCK=16, S_BLOCK=next_pow2(slots), IN_PREC=dot_precision(x.dtype),
    )
    return y


# ---------------------------------------------------------------------------------------------
# input gradient: transposed implicit GEMM, weights again built in registers
# ---------------------------------------------------------------------------------------------
@tuned(_gemm_configs(), key=["C_in", "C_out", "NHW", "KH", "KW"], interpret_config=_INTERPRET_GEMM)
@triton.jit
def _conv_dx_kernel(
    dy_ptr, wn_ptr, dx_ptr,
    g_ptr, sgt, sgo, sgi, gu_ptr, gut, guo, gur, gs_ptr, gst, gsr, gv_ptr, gvt, gvi, gvr, g_rank,
    b_ptr, sbt, sbo, sbi, bu_ptr, but, buo, bur, bs_ptr, bst, bsr, bv_ptr, bvt, bvi, bvr, b_rank,
    order_ptr, seg_start_ptr, seg_count_ptr, seg_task_ptr, num_slots,
    C_in, H, W, C_out, OH, OW, NHW,
    sdn, sdc, sdh, sdw, swo, swi, swh, sww,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_ORDER: tl.constexpr,
    LOWRANK: tl.constexpr, R_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows = (sample, input pixel), columns = input channels, reduction = (o, kh, kw)."""
    P = H * W
    seg, tile = _segment_tile(tl.program_id(0), seg_count_ptr, num_slots, P, S_BLOCK, BLOCK_M)
    if seg >= num_slots:
        return
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_count_ptr + seg)
    task = tl.load(seg_task_ptr + seg).to(tl.int64)

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < count * P
    n = _row_samples(r, row_ok, start, P, order_ptr, HAS_ORDER)
    pix = r % P
    ih = pix // W
    iw = pix % W
    dy_rows = dy_ptr + n.to(tl.int64) * sdn

    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, C_out, BLOCK_K):
        o = o0 + tl.arange(0, BLOCK_K)
        o_ok = o < C_out
        w_ok = o_ok[:, None] & i_ok[None, :]
        gam = _style_tile(g_ptr, sgt, sgo, sgi, gu_ptr, gut, guo, gur, gs_ptr, gst, gsr, gv_ptr, gvt, gvi, gvr,
                          g_rank, task, o, i, o_ok, i_ok, LOWRANK, BLOCK_K, BLOCK_N, R_BLOCK)
        bet = _style_tile(b_ptr, sbt, sbo, sbi, bu_ptr, but, buo, bur, bs_ptr, bst, bsr, bv_ptr, bvt, bvi, bvr,
                          b_rank, task, o, i, o_ok, i_ok, LOWRANK, BLOCK_K, BLOCK_N, R_BLOCK)
        wn_tile = wn_ptr + o[:, None] * swo + i[None, :] * swi
        for kh in range(KH):
            th = ih + pad_h - kh * dil_h
            th_c = tl.maximum(th, 0)  # keep // and % on non-negative values
            oh = th_c // stride_h
            h_ok = row_ok & (th >= 0) & (th_c % stride_h == 0) & (oh < OH)
            for kw in range(KW):
                tw = iw + pad_w - kw * dil_w
                tw_c = tl.maximum(tw, 0)
                ow = tw_c // stride_w
                ok = h_ok & (tw >= 0) & (tw_c % stride_w == 0) & (ow < OW)
                dyt = tl.load(dy_rows[:, None] + o[None, :] * sdc + (oh * sdh + ow * sdw)[:, None],
                              mask=ok[:, None] & o_ok[None, :], other=0.0)
                wn = tl.load(wn_tile + kh * swh + kw * sww, mask=w_ok, other=0.0).to(tl.float32)
                w = (gam * wn + bet).to(dyt.dtype)
                acc = tl.dot(dyt, w, acc, input_precision=IN_PREC)
    dx_rows = dx_ptr + n.to(tl.int64) * sxn + ih * sxh + iw * sxw
    tl.store(dx_rows[:, None] + i[None, :] * sxc, acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & i_ok[None, :])


# ---------------------------------------------------------------------------------------------
# style gradients: weight-gradient GEMM per segment, window reduced in the epilogue
# ---------------------------------------------------------------------------------------------
def _wgrad_configs() -> list[triton.Config]:
    shapes = [(64, 64, 64, 3, 4), (32, 64, 64, 3, 4), (64, 32, 64, 3, 4), (64, 64, 128, 3, 4),
              (32, 32, 128, 3, 4), (128, 64, 32, 3, 4)]
    return [
        triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_M": m}, num_stages=s, num_warps=w)
        for o, i, m, s, w in shapes
    ]


_INTERPRET_WGRAD = triton.Config({"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_M": 16}, num_warps=4)


@tuned(_wgrad_configs(), key=["C_in", "C_out", "NP", "KH", "KW", "SPLIT"], interpret_config=_INTERPRET_WGRAD)
@triton.jit
def _conv_style_grad_kernel(
    x_ptr, dy_ptr, wn_ptr, dg_ptr, db_ptr,
    order_ptr, seg_start_ptr, seg_count_ptr, num_slots,
    C_in, H, W, C_out, OH, OW, NP,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, swo, swi, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_ORDER: tl.constexpr, SPLIT: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial ``dGamma``/``dB`` of one (segment, row chunk, o block, i block).

    Writes ``dg[chunk, seg, o, i] = sum_{kh,kw} Wn[o,i,kh,kw] * sum_rows dy[r,o] x[r,i,kh,kw]`` and
    the same without ``Wn`` to ``db``: the window is reduced in registers, so no per-task weight
    gradient ``[O, I, kh, kw]`` is ever stored. The chunks are summed afterwards in a fixed order
    (deterministic two-stage reduction, no atomics).
    """
    seg = tl.program_id(0) // SPLIT
    chunk = tl.program_id(0) % SPLIT
    n_oblk = tl.cdiv(C_out, BLOCK_O)
    o = (tl.program_id(1) % n_oblk) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (tl.program_id(1) // n_oblk) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o < C_out
    i_ok = i < C_in

    P = OH * OW
    start = tl.load(seg_start_ptr + seg)
    rows = tl.load(seg_count_ptr + seg) * P
    chunk_rows = tl.cdiv(tl.cdiv(rows, SPLIT), BLOCK_M) * BLOCK_M
    lo = chunk * chunk_rows
    hi = tl.minimum(lo + chunk_rows, rows)

    dg = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    db = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    wn_tile = wn_ptr + o[:, None] * swo + i[None, :] * swi
    w_ok = o_ok[:, None] & i_ok[None, :]
    for kh in range(KH):
        for kw in range(KW):
            acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for r0 in range(lo, hi, BLOCK_M):
                r = r0 + tl.arange(0, BLOCK_M)
                row_ok = r < hi
                n = _row_samples(r, row_ok, start, P, order_ptr, HAS_ORDER)
                n = n.to(tl.int64)
                pix = r % P
                oh = pix // OW
                ow = pix % OW
                ih = oh * stride_h - pad_h + kh * dil_h
                iw = ow * stride_w - pad_w + kw * dil_w
                x_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                dyt = tl.load(dy_ptr + n[None, :] * sdn + o[:, None] * sdc + (oh * sdh + ow * sdw)[None, :],
                              mask=o_ok[:, None] & row_ok[None, :], other=0.0)  # [BLOCK_O, BLOCK_M]
                xt = tl.load(x_ptr + n[:, None] * sxn + i[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                             mask=x_ok[:, None] & i_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_I]
                acc = tl.dot(dyt, xt, acc, input_precision=IN_PREC)
            wn = tl.load(wn_tile + kh * swh + kw * sww, mask=w_ok, other=0.0).to(tl.float32)
            dg += acc * wn
            db += acc
    out = (chunk * num_slots + seg).to(tl.int64) * C_out * C_in + o[:, None] * C_in + i[None, :]
    tl.store(dg_ptr + out, dg, mask=w_ok)
    tl.store(db_ptr + out, db, mask=w_ok)


@triton.jit
def _conv_bias_grad_kernel(
    dy_ptr, dc_ptr, order_ptr, seg_start_ptr, seg_count_ptr, num_slots,
    C_out, OH, OW, sdn, sdc, sdh, sdw,
    HAS_ORDER: tl.constexpr, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial bias gradient ``dc[chunk, seg, o] = sum over the chunk's rows of dy[r, o]``."""
    seg = tl.program_id(0) // SPLIT
    chunk = tl.program_id(0) % SPLIT
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < C_out
    P = OH * OW
    start = tl.load(seg_start_ptr + seg)
    rows = tl.load(seg_count_ptr + seg) * P
    chunk_rows = tl.cdiv(tl.cdiv(rows, SPLIT), BLOCK_M) * BLOCK_M
    lo = chunk * chunk_rows
    hi = tl.minimum(lo + chunk_rows, rows)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        row_ok = r < hi
        n = _row_samples(r, row_ok, start, P, order_ptr, HAS_ORDER)
        pix = r % P
        ptr = (dy_ptr + n.to(tl.int64)[:, None] * sdn + o[None, :] * sdc
               + ((pix // OW) * sdh + (pix % OW) * sdw)[:, None])
        acc += tl.load(ptr, mask=row_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dc_ptr + (chunk * num_slots + seg).to(tl.int64) * C_out + o, tl.sum(acc, 0), mask=o_ok)


def _row_split(rows_total: int, slots: int, tiles: int, interpret: bool) -> int:
    """Row chunks per segment: enough programs to fill a GPU when there are few (o, i) tiles."""
    if interpret:
        return 2 if rows_total >= 64 else 1  # still exercises the two-stage reduction
    target_programs = 264  # ~2 waves of a 132-SM H100
    split = max(1, target_programs // max(1, tiles * slots))
    # each chunk should still get a few hundred rows
    return int(max(1, min(split, rows_total // max(1, 256 * slots), 64)))


def conv2d_backward(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Style, beta: Style,
    bias: Optional[Tensor], groups: TaskGroups, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], output_mask: Sequence[bool], per_slot: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, dgamma [T, O, I], dbeta [T, O, I], dbias [T, O])``; ``None`` where the mask is False.

    ``gamma, beta`` are stacks ``[T, O, I]`` (single task: ``T = 1``) or low-rank factor triples;
    tasks absent get zeros. ``per_slot=True`` returns ``dgamma, dbeta`` per segment slot instead,
    ``[S, O, I]`` in float32 (what the low-rank factor gradients are computed from).
    """
    need_x, need_gamma, need_beta, need_bias = output_mask
    need_bias = need_bias and bias is not None
    conv = (list(stride), list(padding), list(dilation))
    dx = dgamma = dbeta = dbias = None
    if need_x:
        _is_lowrank(gamma, beta)
        dx = _conv_input_grad_op(
            grad_out, x, weight_norm, _style_list(gamma), _style_list(beta), *_groups_args(groups), *conv
        )
    if need_gamma or need_beta:
        dg, db = _conv_style_grad_op(x, grad_out, weight_norm, groups.order, groups.start, groups.count, *conv)
        # slots -> tasks (a gather)
        finish = (lambda d: d) if per_slot else (lambda d: groups.per_task(d).to(x.dtype))
        if need_gamma:
            dgamma = finish(dg)
        if need_beta:
            dbeta = finish(db)
    if need_bias:
        dc = _conv_bias_grad_op(grad_out, groups.order, groups.start, groups.count)
        dbias = groups.per_task(dc).to(bias.dtype)
    return dx, dgamma, dbeta, dbias


@kernel_op("gmem::triton_conv2d_input_grad")
def _conv_input_grad_op(
    grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: list[Tensor], beta: list[Tensor],
    order: Optional[Tensor], seg_start: Tensor, seg_count: Tensor, seg_task: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    """``dx`` (shaped and strided like ``x``, which is read for nothing else)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_norm.shape
    _, _, oh, ow = grad_out.shape
    slots = seg_count.shape[0]
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx

    def grid(meta):
        return (triton.cdiv(n * h * w, meta["BLOCK_M"]) + slots, triton.cdiv(c_in, meta["BLOCK_N"]))

    wrap_triton(_conv_dx_kernel)[grid](
        grad_out, weight_norm, dx, *_style_args(gamma), *_style_args(beta),
        order if order is not None else seg_start, seg_start, seg_count, seg_task, slots,
        c_in, h, w, c_out, oh, ow, n * h * w,
        *grad_out.stride(), *weight_norm.stride(),
        *dx.stride(), *stride, *padding, *dilation,
        KH=kh, KW=kw, HAS_ORDER=order is not None, LOWRANK=len(gamma) == 3, R_BLOCK=16,
        S_BLOCK=next_pow2(slots), IN_PREC=dot_precision(x.dtype),
    )
    return dx


@kernel_op("gmem::triton_conv2d_style_grad")
def _conv_style_grad_op(
    x: Tensor, grad_out: Tensor, weight_norm: Tensor,
    order: Optional[Tensor], seg_start: Tensor, seg_count: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
) -> tuple[Tensor, Tensor]:
    """Per-slot ``(dgamma, dbeta)``, each ``[S, O, I]`` float32."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_norm.shape
    _, _, oh, ow = grad_out.shape
    slots = seg_count.shape[0]
    rows_total = n * oh * ow
    tiles = triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64)
    split = _row_split(rows_total, slots, tiles, INTERPRET)
    dg = torch.empty((split, slots, c_out, c_in), dtype=torch.float32, device=x.device)
    db = torch.empty_like(dg)

    def grid(meta):
        return (slots * split, triton.cdiv(c_out, meta["BLOCK_O"]) * triton.cdiv(c_in, meta["BLOCK_I"]))

    wrap_triton(_conv_style_grad_kernel)[grid](
        x, grad_out, weight_norm, dg, db,
        order if order is not None else seg_start, seg_start, seg_count, slots,
        c_in, h, w, c_out, oh, ow, rows_total,
        *x.stride(), *grad_out.stride(), *weight_norm.stride(), *stride, *padding, *dilation,
        KH=kh, KW=kw, HAS_ORDER=order is not None, SPLIT=split, IN_PREC=dot_precision(x.dtype),
    )
    # second stage: fixed-order sum over the row chunks
    return dg.sum(0), db.sum(0)


@kernel_op("gmem::triton_conv2d_bias_grad")
def _conv_bias_grad_op(
    grad_out: Tensor, order: Optional[Tensor], seg_start: Tensor, seg_count: Tensor,
) -> Tensor:
    """Per-slot bias gradient ``[S, O]`` float32."""
    n, c_out, oh, ow = grad_out.shape
    slots = seg_count.shape[0]
    split = _row_split(n * oh * ow, slots, triton.cdiv(c_out, 64), INTERPRET)
    block_o = 16 if INTERPRET else 64
    block_m = 16 if INTERPRET else 32
    dc = torch.empty((split, slots, c_out), dtype=torch.float32, device=grad_out.device)
    wrap_triton(_conv_bias_grad_kernel)[(slots * split, triton.cdiv(c_out, block_o))](
        grad_out, dc, order if order is not None else seg_start, seg_start, seg_count, slots,
        c_out, oh, ow, *grad_out.stride(),
        HAS_ORDER=order is not None, SPLIT=split, BLOCK_O=block_o, BLOCK_M=block_m,
    )
    return dc.sum(0)
