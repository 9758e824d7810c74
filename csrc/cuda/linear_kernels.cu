// mFiLM (modulated linear) epilogues on CUDA (torch-free; launchers in launchers.h).
// The GEMM with the frozen weight is done by the caller (cuBLAS through ATen); these kernels apply
// the per-sample style and reduce the style gradients per task.
#include "common.cuh"

namespace gmem_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStyleThreads = 128;   // columns per block of the per-task reduction
constexpr int kRowsPerChunk = 64;    // rows per partial sum of the per-task reduction
constexpr int kMaxChunks = 128;
// Partial sums kept per output at most (chunks x T x O accumulators): with many tasks and wide
// layers the chunk count drops instead of the scratch growing (T = 64, O = 16384: 4 chunks, 16 MB).
constexpr int64_t kMaxPartialsPerOutput = int64_t(1) << 22;
constexpr unsigned int kMaxRowBlocks = 1u << 20;  // film_backward_input: rows beyond loop in-kernel

// h[m, o] = g[t, o] * h[m, o] + b[t, o] * rowsum[m] + c[t, o], one thread per element.
template <typename T>
__global__ void film_forward_kernel(T* __restrict__ h, const T* __restrict__ rowsum, const T* __restrict__ gamma,
                                    const T* __restrict__ beta, const T* __restrict__ bias,
                                    const int64_t* __restrict__ task_ids, int64_t m, int64_t o) {
  using A = typename Acc<T>::type;
  const int64_t total = m * o, step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t row = idx / o, col = idx - row * o;
    const int64_t s = (task_ids ? task_ids[row] : 0) * o + col;
    A y = to_acc(gamma[s]) * to_acc(h[idx]) + to_acc(beta[s]) * to_acc(rowsum[row]);
    if (bias) y += to_acc(bias[s]);
    h[idx] = from_acc<T>(y);
  }
}

// One block per row (rows beyond the grid loop): gdy = grad * g[t], rowdot = sum_o grad * b[t]
// (block reduction). The row loop is uniform across a block, so the barriers inside it are safe.
template <typename T>
__global__ void film_backward_input_kernel(const T* __restrict__ grad, const T* __restrict__ gamma,
                                           const T* __restrict__ beta, const int64_t* __restrict__ task_ids,
                                           T* __restrict__ gdy, T* __restrict__ rowdot, int64_t m, int64_t o) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads];
  for (int64_t row = blockIdx.x; row < m; row += gridDim.x) {
    const int64_t base = (task_ids ? task_ids[row] : 0) * o;
    A acc = 0;
    for (int64_t col = threadIdx.x; col < o; col += blockDim.x) {
      const A d = to_acc(grad[row * o + col]);
      gdy[row * o + col] = from_acc<T>(d * to_acc(gamma[base + col]));
      acc += d * to_acc(beta[base + col]);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) rowdot[row] = from_acc<T>(partial[0]);
    __syncthreads();  // partial[0] is read before the next row overwrites it
  }
}

// Stage 1 of the per-task reduction: block (column block, row chunk); each thread owns one column
// of one chunk and sums its rows in order into partial[chunk, t, col] (no atomics: deterministic).
template <typename T>
__global__ void film_style_partial_kernel(const T* __restrict__ grad, const T* __restrict__ h,
                                          const T* __restrict__ rowsum, const int64_t* __restrict__ task_ids,
                                          typename Acc<T>::type* __restrict__ part_g,
                                          typename Acc<T>::type* __restrict__ part_b,
                                          typename Acc<T>::type* __restrict__ part_c, int64_t m, int64_t o,
                                          int64_t tasks, int64_t rows_per_chunk) {
  using A = typename Acc<T>::type;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= o) return;
  const int64_t chunk = blockIdx.y;
  const int64_t base = chunk * tasks * o + col;
  for (int64_t t = 0; t < tasks; ++t) {
    if (part_g) part_g[base + t * o] = 0;
    if (part_b) part_b[base + t * o] = 0;
    if (part_c) part_c[base + t * o] = 0;
  }
  const int64_t row_end = min(m, (chunk + 1) * rows_per_chunk);
  for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
    const int64_t at = base + (task_ids ? task_ids[row] : 0) * o;
    const A d = to_acc(grad[row * o + col]);
    if (part_g) part_g[at] += d * to_acc(h[row * o + col]);
    if (part_b) part_b[at] += d * to_acc(rowsum[row]);
    if (part_c) part_c[at] += d;
  }
}

// Stage 2: out[t, col] = sum over chunks of partial[chunk, t, col], in chunk order.
template <typename T>
__global__ void film_style_finish_kernel(const typename Acc<T>::type* __restrict__ part, T* __restrict__ out,
                                         int64_t chunks, int64_t tasks_x_o) {
  using A = typename Acc<T>::type;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < tasks_x_o; idx += step) {
    A acc = 0;
    for (int64_t c = 0; c < chunks; ++c) acc += part[c * tasks_x_o + idx];
    out[idx] = from_acc<T>(acc);
  }
}

// Row chunks of the two-stage reduction: a function of the shapes alone, so results are reproducible.
int64_t style_chunks(int64_t m, int64_t tasks, int64_t o) {
  int64_t chunks = ceil_div(m, kRowsPerChunk);
  chunks = chunks > kMaxChunks ? kMaxChunks : chunks;
  const int64_t by_scratch = kMaxPartialsPerOutput / (tasks * o > 0 ? tasks * o : 1);
  chunks = chunks > by_scratch ? by_scratch : chunks;
  return chunks < 1 ? 1 : chunks;
}

int64_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

cudaError_t film_forward(DType dtype, void* h, const void* rowsum, const void* gamma, const void* beta,
                         const void* bias, const int64_t* task_ids, int64_t m, int64_t o, cudaStream_t stream) {
  if (m * o == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    film_forward_kernel<T><<<grid_for(m * o, kThreads), kThreads, 0, stream>>>(
        static_cast<T*>(h), static_cast<const T*>(rowsum), static_cast<const T*>(gamma), static_cast<const T*>(beta),
        static_cast<const T*>(bias), task_ids, m, o);
    return cudaGetLastError();
  });
}

cudaError_t film_backward_input(DType dtype, const void* grad, const void* gamma, const void* beta,
                                const int64_t* task_ids, void* gdy, void* rowdot, int64_t m, int64_t o,
                                cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int blocks = m < kMaxRowBlocks ? static_cast<unsigned int>(m) : kMaxRowBlocks;
    film_backward_input_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(gamma), static_cast<const T*>(beta), task_ids,
        static_cast<T*>(gdy), static_cast<T*>(rowdot), m, o);
    return cudaGetLastError();
  });
}

int64_t film_backward_style_workspace_bytes(DType dtype, int64_t m, int64_t o, int64_t tasks) {
  return 3 * style_chunks(m, tasks, o) * tasks * o * acc_size(dtype);
}

cudaError_t film_backward_style(DType dtype, const void* grad, const void* h, const void* rowsum,
                                const int64_t* task_ids, void* dgamma, void* dbeta, void* dbias, int64_t m, int64_t o,
                                int64_t tasks, void* workspace, cudaStream_t stream) {
  if (tasks * o == 0) return cudaSuccess;
  const int64_t chunks = style_chunks(m, tasks, o);
  const int64_t rows_per_chunk = ceil_div(m, chunks);
  const int64_t part_elems = chunks * tasks * o;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    A* part = static_cast<A*>(workspace);
    A* part_g = dgamma ? part : nullptr;
    A* part_b = dbeta ? part + part_elems : nullptr;
    A* part_c = dbias ? part + 2 * part_elems : nullptr;
    const dim3 grid(static_cast<unsigned int>(ceil_div(o, kStyleThreads)), static_cast<unsigned int>(chunks));
    film_style_partial_kernel<T><<<grid, kStyleThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(h), static_cast<const T*>(rowsum), task_ids, part_g, part_b,
        part_c, m, o, tasks, rows_per_chunk);
    cudaError_t err = cudaGetLastError();
    const unsigned int blocks = grid_for(tasks * o, kThreads);
    if (err == cudaSuccess && dgamma)
      film_style_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(part_g, static_cast<T*>(dgamma), chunks, tasks * o);
    if (err == cudaSuccess && dbeta)
      film_style_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(part_b, static_cast<T*>(dbeta), chunks, tasks * o);
    if (err == cudaSuccess && dbias)
      film_style_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(part_c, static_cast<T*>(dbias), chunks, tasks * o);
    return err == cudaSuccess ? cudaGetLastError() : err;
  });
}

}  // namespace cuda
}  // namespace gmem_kernels
