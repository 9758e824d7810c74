// Torch-free CPU kernels of the mFiLM linear (gmem::modulated_linear): the epilogue after the
// shared GEMM and the per-task reductions of its backward, on raw, contiguous arrays.
//
// Every kernel works on a half-open range of rows (or columns) so that the caller chooses the
// threading (csrc/cpu/linear_cpu.cpp wraps them in at::parallel_for; the C++ unit tests call them on
// the whole range).
//
// Shapes (row-major, contiguous): h [M, O] = x @ Wn^T, rowsum [M] = sum_i x, gamma, beta, bias
// [T, O], task_ids [M] in [0, T) or nullptr (every row uses task 0).
#pragma once

#include <cstdint>

// Forced inlining into the target_clones wrappers of csrc/cpu/linear_cpu.cpp (see madafm_kernels.h).
#ifndef GMEM_KERNEL_INLINE
#if defined(__GNUC__)
#define GMEM_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define GMEM_KERNEL_INLINE inline
#endif
#endif

namespace gmem_kernels {
namespace cpu {

// mFiLM forward epilogue, in place on h for rows [m_begin, m_end):
//   h[m, o] = gamma[t, o] * h[m, o] + beta[t, o] * rowsum[m] + bias[t, o]   (t = task of row m).
template <typename T>
GMEM_KERNEL_INLINE void film_forward_rows(T* h, const T* rowsum, const T* gamma, const T* beta, const T* bias,
                                          const int64_t* task_ids, int64_t O, int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int64_t t = task_ids ? task_ids[m] : 0;
    const T* __restrict g = gamma + t * O;
    const T* __restrict b = beta + t * O;
    const T s = rowsum[m];
    T* __restrict y = h + m * O;
    if (bias) {
      const T* __restrict c = bias + t * O;
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) y[o] = g[o] * y[o] + b[o] * s + c[o];
    } else {
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) y[o] = g[o] * y[o] + b[o] * s;
    }
  }
}

// mFiLM backward, the per-row part for rows [m_begin, m_end) (for the input gradient):
//   gdy[m, o] = grad[m, o] * gamma[t, o],   rowdot[m] = sum_o grad[m, o] * beta[t, o],
// so that dx = gdy @ Wn + rowdot[:, None].
template <typename T>
GMEM_KERNEL_INLINE void film_backward_input_rows(const T* grad, const T* gamma, const T* beta,
                                                 const int64_t* task_ids, T* gdy, T* rowdot, int64_t O,
                                                 int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const int64_t t = task_ids ? task_ids[m] : 0;
    const T* __restrict g = gamma + t * O;
    const T* __restrict b = beta + t * O;
    const T* __restrict d = grad + m * O;
    T* __restrict out = gdy + m * O;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t o = 0; o < O; ++o) {
      out[o] = d[o] * g[o];
      acc += d[o] * b[o];
    }
    rowdot[m] = acc;
  }
}

// mFiLM backward, the per-task reductions for the output columns [o_begin, o_end) over all M rows,
// in row order (deterministic: each column belongs to one caller):
//   dgamma[t, o] = sum_{m: t(m)=t} grad[m, o] * h[m, o]
//   dbeta[t, o]  = sum_{m: t(m)=t} grad[m, o] * rowsum[m]
//   dbias[t, o]  = sum_{m: t(m)=t} grad[m, o]
// Outputs [T, O] must be zero on entry; a null output (or h / rowsum) is skipped.
template <typename T>
GMEM_KERNEL_INLINE void film_backward_style_cols(const T* grad, const T* h, const T* rowsum,
                                                 const int64_t* task_ids, T* dgamma, T* dbeta, T* dbias,
                                                 int64_t M, int64_t O, int64_t o_begin, int64_t o_end) {
  const int64_t n = o_end - o_begin;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = task_ids ? task_ids[m] : 0;
    const T* __restrict d = grad + m * O + o_begin;
    if (dgamma) {
      const T* __restrict hm = h + m * O + o_begin;
      T* __restrict out = dgamma + t * O + o_begin;
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) out[o] += d[o] * hm[o];
    }
    if (dbeta) {
      const T s = rowsum[m];
      T* __restrict out = dbeta + t * O + o_begin;
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) out[o] += d[o] * s;
    }
    if (dbias) {
      T* __restrict out = dbias + t * O + o_begin;
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) out[o] += d[o];
    }
  }
}

}  // namespace cpu
}  // namespace gmem_kernels
