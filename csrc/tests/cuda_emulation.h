// A CPU emulation of CUDA's launch model, for testing the kernels of csrc/kernels on machines
// without a GPU (tools/cuda_emulation.py rewrites their sources to include this header).
//
// Semantics kept: every thread of a block runs as an OS thread with its own threadIdx, blockIdx is
// per thread, __shared__ arrays are shared by the threads of a block, __syncthreads is a barrier of
// the block's threads (a thread that has returned no longer takes part, as on the GPU), and launch
// configurations are checked against CUDA's limits. Blocks run one after another, so what is
// emulated is correctness (indexing, masks, barriers, reductions), not speed or memory ordering
// between blocks running at once (the kernels here use no inter-block communication).
// Half-precision types are stand-ins holding a float: fp16/bf16 rounding is not emulated.
#pragma once

#include <algorithm>
#include <barrier>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks run one at a time: one copy per kernel is one copy per block

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;

struct __half { float value; };
struct __nv_bfloat16 { float value; };
inline float __half2float(__half h) { return h.value; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.value; }
inline __half __float2half(float f) { return {f}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return {f}; }

using std::max;
using std::min;

namespace gmem_emulation {
inline dim3 grid_dim, block_dim;                  // of the launch in progress
inline thread_local dim3 block_idx, thread_idx;   // of the emulated thread
inline thread_local std::barrier<>* block_sync = nullptr;
inline cudaError_t last_error = cudaSuccess;
inline long launches = 0;

// OS threads kept from launch to launch (creating 256 threads per launch cost more than the
// kernels): run(n, job) calls job(0..n-1) on n of them at once and returns when all are done.
class ThreadPool {
 public:
  void run(unsigned n, std::function<void(unsigned)> job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const unsigned index = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = std::move(job);
    active_ = n;
    remaining_ = n;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [this] { return remaining_ == 0; });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

 private:
  void work(unsigned index) {
    unsigned long long seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index >= active_) continue;
      lock.unlock();
      job_(index);
      lock.lock();
      if (--remaining_ == 0) done_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::function<void(unsigned)> job_;
  unsigned active_ = 0, remaining_ = 0;
  unsigned long long generation_ = 0;
  bool stop_ = false;
};

inline ThreadPool& pool() {
  static ThreadPool instance;
  return instance;
}
}  // namespace gmem_emulation

#define gridDim ::gmem_emulation::grid_dim
#define blockDim ::gmem_emulation::block_dim
#define blockIdx ::gmem_emulation::block_idx
#define threadIdx ::gmem_emulation::thread_idx

inline void __syncthreads() { gmem_emulation::block_sync->arrive_and_wait(); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = gmem_emulation::last_error;
  gmem_emulation::last_error = cudaSuccess;
  return e;
}

// kernel<<<grid, block, shared, stream>>>(args...): one pooled OS thread per thread of a block,
// reused from block to block; each block gets a fresh __syncthreads barrier.
template <typename Kernel, typename... Args>
void gmem_emulate_launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, Kernel kernel,
                         Args... args) {
  (void)shared_bytes;
  (void)stream;
  namespace emu = gmem_emulation;
  ++emu::launches;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > 1024 || block.z > 64) {
    std::fprintf(stderr, "cuda emulation: invalid launch grid (%u, %u, %u) block (%u, %u, %u)\n", grid.x, grid.y,
                 grid.z, block.x, block.y, block.z);
    emu::last_error = cudaErrorInvalidConfiguration;
    return;
  }
  emu::grid_dim = grid;
  emu::block_dim = block;
  const auto n = static_cast<std::ptrdiff_t>(threads);
  std::unique_ptr<std::barrier<>> sync = std::make_unique<std::barrier<>>(n);
  auto next_block = [&]() noexcept { sync = std::make_unique<std::barrier<>>(n); };
  std::barrier<decltype(next_block)> block_done(n, next_block);
  emu::pool().run(static_cast<unsigned>(threads), [&](unsigned t) {
    emu::thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    for (unsigned int bz = 0; bz < grid.z; ++bz)
      for (unsigned int by = 0; by < grid.y; ++by)
        for (unsigned int bx = 0; bx < grid.x; ++bx) {
          emu::block_idx = dim3(bx, by, bz);
          emu::block_sync = sync.get();
          kernel(args...);
          emu::block_sync->arrive_and_drop();  // returned: no longer part of this block's barriers
          block_done.arrive_and_wait();        // the last arrival installs the next block's barrier
        }
  });
}
