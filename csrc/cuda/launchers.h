// Torch-free launchers of the gmem CUDA kernels (implemented in madafm_kernels.cu, linear_kernels.cu and lowrank_kernels.cu).
//
// Raw device pointers of contiguous arrays; `dtype` says what they point to (accumulation is in
// float for 16-bit types, in the element type otherwise). Every launcher enqueues on `stream`
// and returns the launch status (cudaSuccess or the error), never synchronising.
// Shapes are those of the CPU kernels (csrc/cpu/<op>_kernels.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gmem_kernels {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// weight [T, R, K] = gamma [T, R] * weight_norm [R, K] + beta [T, R]
cudaError_t madafm_weight(DType dtype, const void* weight_norm, const void* gamma, const void* beta, void* weight,
                          int64_t tasks, int64_t rows, int64_t window, cudaStream_t stream);

// dgamma, dbeta [T, R] = window sums of grad_weight [T, R, K] * weight_norm [R, K] and of grad_weight
cudaError_t madafm_weight_backward(DType dtype, const void* grad_weight, const void* weight_norm, void* dgamma,
                                   void* dbeta, int64_t tasks, int64_t rows, int64_t window, cudaStream_t stream);

// in place: h [M, O] <- gamma[t] * h + beta[t] * rowsum[m] + bias[t]   (bias, task_ids may be null)
cudaError_t film_forward(DType dtype, void* h, const void* rowsum, const void* gamma, const void* beta,
                         const void* bias, const int64_t* task_ids, int64_t m, int64_t o, cudaStream_t stream);

// gdy [M, O] = grad * gamma[t],  rowdot [M] = sum_o grad * beta[t]
cudaError_t film_backward_input(DType dtype, const void* grad, const void* gamma, const void* beta,
                                const int64_t* task_ids, void* gdy, void* rowdot, int64_t m, int64_t o,
                                cudaStream_t stream);

// weight [O*I, K] = Gamma * weight_norm [O*I, K] + B for one task, the styles rebuilt from their
// factors (lowrank_kernels.cu): Gamma = gu [O, rg] diag(gs [rg]) gvt [rg, I], B likewise (bu, bs, bvt).
cudaError_t lowrank_weight(DType dtype, const void* weight_norm, const void* gu, const void* gs, const void* gvt,
                           int64_t rg, const void* bu, const void* bs, const void* bvt, int64_t rb, void* weight,
                           int64_t out_ch, int64_t in_ch, int64_t window, cudaStream_t stream);

// Scratch (in bytes) that film_backward_style needs for a deterministic two-stage reduction.
int64_t film_backward_style_workspace_bytes(DType dtype, int64_t m, int64_t o, int64_t tasks);

// per-task sums [T, O] (dgamma of grad * h, dbeta of grad * rowsum, dbias of grad); a null output
// (with its null input h / rowsum) is skipped; outputs are overwritten, not accumulated.
cudaError_t film_backward_style(DType dtype, const void* grad, const void* h, const void* rowsum,
                                const int64_t* task_ids, void* dgamma, void* dbeta, void* dbias, int64_t m, int64_t o,
                                int64_t tasks, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace gmem_kernels
