// Torch-free CPU kernels of the gmem ops on raw, contiguous arrays.
//
// Every kernel works on a half-open range of independent rows so that the caller chooses the
// threading (the ATen glue in csrc/cpu/ops_cpu.cpp wraps them in at::parallel_for; the C++ unit
// tests call them on the whole range). Inner loops run over contiguous memory with compile-time
// lengths for the common kernel windows, so the compiler vectorises them.
//
// Shapes (all row-major, contiguous):
//   mAdaFM weight build: weight_norm [R, K] (R = O*I rows of a K = kh*kw window),
//                        gamma, beta [T, R], weight [T, R, K];  one "row" is (t, o, i).
//   mFiLM epilogue:      h [M, O] = x @ Wn^T, rowsum [M] = sum_i x, gamma, beta, bias [T, O],
//                        task_ids [M] in [0, T) or nullptr (every row uses task 0).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_kernels_avx2.h"

// Forced inlining: the ATen glue (csrc/cpu/ops_cpu.cpp) wraps each kernel in a function with
// target_clones (AVX2+FMA and baseline); only code inlined into those wrappers is compiled for the
// clone's ISA (without it GCC may keep a template out of line, compiled for the baseline only).
#if defined(__GNUC__)
#define GMEM_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define GMEM_KERNEL_INLINE inline
#endif

namespace gmem_kernels {
namespace cpu {

namespace detail {

// The rows [row_begin, row_end) of [T, R] split into spans that stay inside one task, so that the
// span's rows of weight_norm are contiguous too: f(first row r, its weight_norm row j, count).
template <typename F>
GMEM_KERNEL_INLINE void for_each_task_span(int64_t R, int64_t row_begin, int64_t row_end, F f) {
  int64_t r = row_begin;
  while (r < row_end) {
    const int64_t j = r % R;
    const int64_t n = std::min(row_end - r, R - j);
    f(r, j, n);
    r += n;
  }
}

// out[u, k] = g[u] * wn[u, k] + b[u] for n windows. With a compile-time window (KC > 0) the loop
// is vectorised across rows (the window fully unrolled), which measured faster than vectorising
// the short window loop itself.
template <typename T, int KC>
GMEM_KERNEL_INLINE void build_span(const T* __restrict wn, const T* __restrict gamma, const T* __restrict beta,
                                   T* __restrict out, int64_t n, int64_t K_rt) {
  if constexpr (std::is_same_v<T, float> && KC == 9) {
    if (avx2::enabled()) return avx2::build_span9(wn, gamma, beta, out, n);
  }
  if constexpr (KC > 0) {
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      const T g = gamma[u], b = beta[u];
      for (int k = 0; k < KC; ++k) out[u * KC + k] = g * wn[u * KC + k] + b;
    }
  } else {
    for (int64_t u = 0; u < n; ++u) {
      const T g = gamma[u], b = beta[u];
#pragma omp simd
      for (int64_t k = 0; k < K_rt; ++k) out[u * K_rt + k] = g * wn[u * K_rt + k] + b;
    }
  }
}

// dgamma[u] = sum_k dW[u, k] * wn[u, k], dbeta[u] = sum_k dW[u, k] for n windows.
template <typename T, int KC>
GMEM_KERNEL_INLINE void reduce_span(const T* __restrict grad_weight, const T* __restrict wn, T* __restrict dgamma,
                                    T* __restrict dbeta, int64_t n, int64_t K_rt) {
  if constexpr (std::is_same_v<T, float> && KC == 9) {
    if (avx2::enabled()) return avx2::reduce_span9(grad_weight, wn, dgamma, dbeta, n);
  }
  if constexpr (KC > 0) {
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      T sg = 0, sb = 0;
      for (int k = 0; k < KC; ++k) {
        const T d = grad_weight[u * KC + k];
        sg += d * wn[u * KC + k];
        sb += d;
      }
      dgamma[u] = sg;
      dbeta[u] = sb;
    }
  } else {
    for (int64_t u = 0; u < n; ++u) {
      T sg = 0, sb = 0;
#pragma omp simd reduction(+ : sg, sb)
      for (int64_t k = 0; k < K_rt; ++k) {
        const T d = grad_weight[u * K_rt + k];
        sg += d * wn[u * K_rt + k];
        sb += d;
      }
      dgamma[u] = sg;
      dbeta[u] = sb;
    }
  }
}

template <typename T, int KC>
GMEM_KERNEL_INLINE void build_rows(const T* wn, const T* gamma, const T* beta, T* out, int64_t R, int64_t K,
                                   int64_t row_begin, int64_t row_end) {
  for_each_task_span(R, row_begin, row_end, [&](int64_t r, int64_t j, int64_t n) {
    build_span<T, KC>(wn + j * K, gamma + r, beta + r, out + r * K, n, K);
  });
}

template <typename T, int KC>
GMEM_KERNEL_INLINE void reduce_rows(const T* grad_weight, const T* wn, T* dgamma, T* dbeta, int64_t R, int64_t K,
                                    int64_t row_begin, int64_t row_end) {
  for_each_task_span(R, row_begin, row_end, [&](int64_t r, int64_t j, int64_t n) {
    reduce_span<T, KC>(grad_weight + r * K, wn + j * K, dgamma + r, dbeta + r, n, K);
  });
}

}  // namespace detail

// weight[t, j, k] = gamma[t, j] * wn[j, k] + beta[t, j] for rows r = t*R + j in [row_begin, row_end).
template <typename T>
GMEM_KERNEL_INLINE void madafm_weight_rows(const T* wn, const T* gamma, const T* beta, T* weight, int64_t R, int64_t K,
                                           int64_t row_begin, int64_t row_end) {
  switch (K) {  // the usual windows: 1x1, 3x3, 4x4, 5x5
    case 1: detail::build_rows<T, 1>(wn, gamma, beta, weight, R, K, row_begin, row_end); break;
    case 9: detail::build_rows<T, 9>(wn, gamma, beta, weight, R, K, row_begin, row_end); break;
    case 16: detail::build_rows<T, 16>(wn, gamma, beta, weight, R, K, row_begin, row_end); break;
    case 25: detail::build_rows<T, 25>(wn, gamma, beta, weight, R, K, row_begin, row_end); break;
    default: detail::build_rows<T, 0>(wn, gamma, beta, weight, R, K, row_begin, row_end);
  }
}

// dgamma[r] = sum_k dW[r, k] * wn[r % R, k],  dbeta[r] = sum_k dW[r, k]  (one pass over dW).
template <typename T>
GMEM_KERNEL_INLINE void madafm_weight_backward_rows(const T* grad_weight, const T* wn, T* dgamma, T* dbeta,
                                                    int64_t R, int64_t K, int64_t row_begin, int64_t row_end) {
  switch (K) {
    case 1: detail::reduce_rows<T, 1>(grad_weight, wn, dgamma, dbeta, R, K, row_begin, row_end); break;
    case 9: detail::reduce_rows<T, 9>(grad_weight, wn, dgamma, dbeta, R, K, row_begin, row_end); break;
    case 16: detail::reduce_rows<T, 16>(grad_weight, wn, dgamma, dbeta, R, K, row_begin, row_end); break;
    case 25: detail::reduce_rows<T, 25>(grad_weight, wn, dgamma, dbeta, R, K, row_begin, row_end); break;
    default: detail::reduce_rows<T, 0>(grad_weight, wn, dgamma, dbeta, R, K, row_begin, row_end);
  }
}

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
