// mAdaFM weight build with low-rank styles on CUDA (torch-free; launcher in launchers.h).
//
// A block owns kThreads consecutive (o, i) rows: each thread first rebuilds its row's Gamma and B
// from the factors (rank sums in registers; consecutive threads read consecutive gvt/bvt entries),
// the values go to shared memory, then the block writes its rows' windows with coalesced stores.
#include "common.cuh"

namespace gmem_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ typename Acc<T>::type lowrank_entry(const T* __restrict__ u, const T* __restrict__ s,
                                                               const T* __restrict__ vt, int64_t rank, int64_t o,
                                                               int64_t i, int64_t in_ch) {
  typename Acc<T>::type acc = 0;
  for (int64_t r = 0; r < rank; ++r) acc += to_acc(u[o * rank + r]) * to_acc(s[r]) * to_acc(vt[r * in_ch + i]);
  return acc;
}

// KC > 0 fixes the window at compile time (the per-element division becomes a multiply).
template <typename T, int KC>
__global__ void lowrank_weight_kernel(const T* __restrict__ wn, const T* __restrict__ gu, const T* __restrict__ gs,
                                      const T* __restrict__ gvt, int64_t rg, const T* __restrict__ bu,
                                      const T* __restrict__ bs, const T* __restrict__ bvt, int64_t rb,
                                      T* __restrict__ weight, int64_t rows, int64_t in_ch, int64_t window_rt) {
  using A = typename Acc<T>::type;
  __shared__ A g_row[kThreads];
  __shared__ A b_row[kThreads];
  const int64_t window = KC > 0 ? int64_t(KC) : window_rt;
  for (int64_t row0 = int64_t(blockIdx.x) * kThreads; row0 < rows; row0 += int64_t(gridDim.x) * kThreads) {
    const int64_t j = row0 + threadIdx.x;
    if (j < rows) {
      const int64_t o = j / in_ch, i = j - o * in_ch;
      g_row[threadIdx.x] = lowrank_entry(gu, gs, gvt, rg, o, i, in_ch);
      b_row[threadIdx.x] = lowrank_entry(bu, bs, bvt, rb, o, i, in_ch);
    }
    __syncthreads();
    const int64_t n = (rows - row0 < kThreads ? rows - row0 : kThreads) * window;
    const int64_t base = row0 * window;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      const int64_t local = e / window;
      weight[base + e] = from_acc<T>(g_row[local] * to_acc(wn[base + e]) + b_row[local]);
    }
    __syncthreads();  // the next rows overwrite g_row / b_row
  }
}

template <typename T, int KC>
cudaError_t launch(const void* wn, const void* gu, const void* gs, const void* gvt, int64_t rg, const void* bu,
                   const void* bs, const void* bvt, int64_t rb, void* weight, int64_t rows, int64_t in_ch,
                   int64_t window, cudaStream_t stream) {
  lowrank_weight_kernel<T, KC><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(wn), static_cast<const T*>(gu), static_cast<const T*>(gs), static_cast<const T*>(gvt), rg,
      static_cast<const T*>(bu), static_cast<const T*>(bs), static_cast<const T*>(bvt), rb, static_cast<T*>(weight),
      rows, in_ch, window);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lowrank_weight(DType dtype, const void* weight_norm, const void* gu, const void* gs, const void* gvt,
                           int64_t rg, const void* bu, const void* bs, const void* bvt, int64_t rb, void* weight,
                           int64_t out_ch, int64_t in_ch, int64_t window, cudaStream_t stream) {
  const int64_t rows = out_ch * in_ch;
  if (rows == 0 || window == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (window == 9) return launch<T, 9>(weight_norm, gu, gs, gvt, rg, bu, bs, bvt, rb, weight, rows, in_ch, 9, stream);
    if (window == 1) return launch<T, 1>(weight_norm, gu, gs, gvt, rg, bu, bs, bvt, rb, weight, rows, in_ch, 1, stream);
    return launch<T, 0>(weight_norm, gu, gs, gvt, rg, bu, bs, bvt, rb, weight, rows, in_ch, window, stream);
  });
}

}  // namespace cuda
}  // namespace gmem_kernels
