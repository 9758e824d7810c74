// Torch-free CPU kernel of the mAdaFM weight build with low-rank styles, on raw contiguous arrays.
//
// One task's styles are kept as factors, Gamma = gu diag(gs) gv^T and B = bu diag(bs) bv^T, and the
// kernel rebuilds them block by block while it writes the weight, so no dense [O, I] style matrix
// is ever stored:
//   weight[o, i, k] = Gamma[o, i] * weight_norm[o, i, k] + B[o, i]
//   Gamma[o, i] = sum_r gu[o, r] * gs[r] * gvt[r, i]      (gvt = gv^T, [Rg, I], so that the
//   B[o, i]     = sum_r bu[o, r] * bs[r] * bvt[r, i]       rank sums vectorise over i)
//
// Shapes (row-major): weight_norm, weight [O*I, K] (K = kh*kw), gu [O, Rg], gs [Rg], gvt [Rg, I],
// bu [O, Rb], bs [Rb], bvt [Rb, I]. Gamma and B may have different ranks (e.g. a shared knowledge
// base concatenated with a task's own factors). Work is split by output channel: the caller passes
// the half-open range [o_begin, o_end) (the ATen glue in csrc/cpu/conv_lowrank_cpu.cpp threads over it).
#pragma once

#include <algorithm>
#include <cstdint>

#include "madafm_kernels.h"

// GMEM_KERNEL_INLINE (madafm_kernels.h): forced inlining into the target_clones wrappers.
#define GMEM_LOWRANK_INLINE GMEM_KERNEL_INLINE

namespace gmem_kernels {
namespace cpu {

namespace detail {

// acc[c] = sum_r (u[r] * s[r]) * vt[r, i0 + c] for c < n: one block of a row of u diag(s) v^T.
// Columns go in register-sized tiles of kTile, each summed over the whole rank in registers (one
// load and one FMA per term, no round trip of the partial sums through memory per rank). (Tiles
// of 4 rows x 16 or 32 columns, sharing each load of vt, measured no faster with AVX2.)
template <typename T>
GMEM_LOWRANK_INLINE void lowrank_row_block(const T* __restrict u, const T* __restrict s, const T* __restrict vt,
                                           int64_t rank, int64_t I, int64_t i0, int64_t n, T* __restrict acc) {
  constexpr int64_t kTile = 16;
  int64_t c0 = 0;
  for (; c0 + kTile <= n; c0 += kTile) {
    T tile[kTile] = {};
    for (int64_t r = 0; r < rank; ++r) {
      const T a = u[r] * s[r];
      const T* __restrict v = vt + r * I + i0 + c0;
#pragma omp simd
      for (int64_t c = 0; c < kTile; ++c) tile[c] += a * v[c];
    }
    for (int64_t c = 0; c < kTile; ++c) acc[c0 + c] = tile[c];
  }
  if (c0 < n) {  // the last, partial tile
    const int64_t m = n - c0;
    T tile[kTile] = {};
    for (int64_t r = 0; r < rank; ++r) {
      const T a = u[r] * s[r];
      const T* __restrict v = vt + r * I + i0 + c0;
      for (int64_t c = 0; c < m; ++c) tile[c] += a * v[c];
    }
    for (int64_t c = 0; c < m; ++c) acc[c0 + c] = tile[c];
  }
}

}  // namespace detail

// weight rows (o, i) for o in [o_begin, o_end), every i: see the file comment.
template <typename T>
GMEM_LOWRANK_INLINE void lowrank_weight_rows(const T* wn, const T* gu, const T* gs, const T* gvt, int64_t Rg,
                                             const T* bu, const T* bs, const T* bvt, int64_t Rb, T* weight, int64_t O,
                                             int64_t I, int64_t K, int64_t o_begin, int64_t o_end) {
  (void)O;
  // A block of the style rows lives on the stack, then the weight build writes its windows.
  constexpr int64_t kBlock = 128;
  T g[kBlock], b[kBlock];
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t i0 = 0; i0 < I; i0 += kBlock) {
      const int64_t n = std::min(kBlock, I - i0);
      detail::lowrank_row_block(gu + o * Rg, gs, gvt, Rg, I, i0, n, g);
      detail::lowrank_row_block(bu + o * Rb, bs, bvt, Rb, I, i0, n, b);
      const int64_t row = o * I + i0;
      // the n rows as one task of n rows: the mAdaFM build with its specialised windows
      madafm_weight_rows(wn + row * K, g, b, weight + row * K, n, K, 0, n);
    }
  }
}

}  // namespace cpu
}  // namespace gmem_kernels
