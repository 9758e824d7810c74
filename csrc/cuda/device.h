// The CUDA element kernels of the gmem ops (the DeviceKernels table of ops.h, cuda_kernels() in
// device_cuda.cpp): host glue (compiled by the host compiler) around the torch-free kernels of
// <op>_kernels.cu, for float32, float64, float16 and bfloat16; one file per op (madafm_cuda.cpp,
// linear_cuda.cpp, conv_lowrank_cuda.cpp). Built only with CUDA (GMEM_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

namespace gmem {

namespace kcu = gmem_kernels::cuda;

inline kcu::DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kcu::DType::kFloat32;
    case at::kDouble: return kcu::DType::kFloat64;
    case at::kHalf: return kcu::DType::kFloat16;
    case at::kBFloat16: return kcu::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": the cuda backend computes in float32, float64, float16 or bfloat16, got ",
                         t.scalar_type());
  }
}

inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The kernels take untyped pointers and read every buffer in the one dtype they are launched for,
// so a buffer is passed only through in() (cast to that dtype where it differs: e.g. x.sum(1) is
// float32 for a bfloat16 x under CUDA autocast) and an output only through out() (checked).
inline const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline at::Tensor in(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() && t.scalar_type() != like.scalar_type() ? t.to(like.scalar_type()) : t;
}
inline void* out(const char* op, at::Tensor& t, const at::Tensor& like) {
  if (!t.defined()) return nullptr;
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": output buffer has dtype ", t.scalar_type(),
              ", the kernel writes ", like.scalar_type());
  return t.mutable_data_ptr();
}
inline const int64_t* ids_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }


// The table's entries (see DeviceKernels in ops.h for what each computes)
void madafm_forward_cuda(const at::Tensor& wn, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& weight);
void madafm_backward_cuda(const at::Tensor& grad_weight, const at::Tensor& wn, at::Tensor& dgamma, at::Tensor& dbeta);
void film_forward_cuda(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                       const at::Tensor& bias, const at::Tensor& task_ids);
void film_backward_input_cuda(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot);
void film_backward_style_cuda(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                              const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias);
void lowrank_forward_cuda(const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& gvt,
                          const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt, at::Tensor& weight);

}  // namespace gmem
