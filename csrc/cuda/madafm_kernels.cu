// mAdaFM weight build and its backward reduction on CUDA (torch-free; launchers in launchers.h).
#include "common.cuh"

namespace gmem_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per output element (grid-stride), coalesced writes: weight[t, j, k] = g[t, j] * wn[j, k] + b[t, j].
// KC > 0 fixes the window at compile time so the index arithmetic is a multiply, not a division.
template <typename T, typename Index, int KC>
__global__ void madafm_forward_kernel(const T* __restrict__ wn, const T* __restrict__ gamma,
                                      const T* __restrict__ beta, T* __restrict__ weight, Index rows, Index window_rt,
                                      Index total) {
  const Index window = KC > 0 ? Index(KC) : window_rt;
  const Index step = Index(gridDim.x) * blockDim.x;
  for (Index idx = Index(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const Index r = idx / window;          // (t, j) row
    const Index k = idx - r * window;      // position in the window
    const Index j = r % rows;              // row of the shared weight_norm
    weight[idx] = from_acc<T>(to_acc(gamma[r]) * to_acc(wn[j * window + k]) + to_acc(beta[r]));
  }
}

// One thread per (t, j) row: dgamma = sum_k dW * wn, dbeta = sum_k dW (window sums in registers).
template <typename T, typename Index, int KC>
__global__ void madafm_backward_kernel(const T* __restrict__ grad_weight, const T* __restrict__ wn,
                                       T* __restrict__ dgamma, T* __restrict__ dbeta, Index rows, Index window_rt,
                                       Index total_rows) {
  using A = typename Acc<T>::type;
  const Index window = KC > 0 ? Index(KC) : window_rt;
  const Index step = Index(gridDim.x) * blockDim.x;
  for (Index r = Index(blockIdx.x) * blockDim.x + threadIdx.x; r < total_rows; r += step) {
    const T* d = grad_weight + r * window;
    const T* w = wn + (r % rows) * window;
    A sg = 0, sb = 0;
#pragma unroll
    for (Index k = 0; k < window; ++k) {
      const A v = to_acc(d[k]);
      sg += v * to_acc(w[k]);
      sb += v;
    }
    dgamma[r] = from_acc<T>(sg);
    dbeta[r] = from_acc<T>(sb);
  }
}

template <typename T, typename Index, int KC>
cudaError_t launch_forward(const void* wn, const void* gamma, const void* beta, void* weight, int64_t rows,
                           int64_t window, int64_t total, cudaStream_t stream) {
  madafm_forward_kernel<T, Index, KC><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(wn), static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<T*>(weight),
      Index(rows), Index(window), Index(total));
  return cudaGetLastError();
}

template <typename T, typename Index, int KC>
cudaError_t launch_backward(const void* grad_weight, const void* wn, void* dgamma, void* dbeta, int64_t rows,
                            int64_t window, int64_t total_rows, cudaStream_t stream) {
  madafm_backward_kernel<T, Index, KC><<<grid_for(total_rows, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_weight), static_cast<const T*>(wn), static_cast<T*>(dgamma),
      static_cast<T*>(dbeta), Index(rows), Index(window), Index(total_rows));
  return cudaGetLastError();
}

// Picks 32-bit indexing when it fits, and a compile-time window for 3x3 and 1x1 kernels.
template <typename T, template <typename, typename, int> class Launch, typename... Args>
cudaError_t by_shape(int64_t total_elements, int64_t window, Args... args) {
  // 32-bit indices while idx + grid stride cannot overflow (the stride is below 2^28)
  const bool small = total_elements < (int64_t(1) << 30);
  if (small) {
    if (window == 9) return Launch<T, int32_t, 9>::run(args...);
    if (window == 1) return Launch<T, int32_t, 1>::run(args...);
    return Launch<T, int32_t, 0>::run(args...);
  }
  return Launch<T, int64_t, 0>::run(args...);
}

template <typename T, typename Index, int KC>
struct Forward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return launch_forward<T, Index, KC>(args...); }
};

template <typename T, typename Index, int KC>
struct Backward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return launch_backward<T, Index, KC>(args...); }
};

}  // namespace

cudaError_t madafm_weight(DType dtype, const void* weight_norm, const void* gamma, const void* beta, void* weight,
                          int64_t tasks, int64_t rows, int64_t window, cudaStream_t stream) {
  const int64_t total = tasks * rows * window;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return by_shape<T, Forward>(total, window, weight_norm, gamma, beta, weight, rows, window, total, stream);
  });
}

cudaError_t madafm_weight_backward(DType dtype, const void* grad_weight, const void* weight_norm, void* dgamma,
                                   void* dbeta, int64_t tasks, int64_t rows, int64_t window, cudaStream_t stream) {
  const int64_t total_rows = tasks * rows;
  if (total_rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return by_shape<T, Backward>(total_rows * window, window, grad_weight, weight_norm, dgamma, dbeta, rows, window,
                                 total_rows, stream);
  });
}

}  // namespace cuda
}  // namespace gmem_kernels
