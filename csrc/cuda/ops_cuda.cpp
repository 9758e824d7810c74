// CUDA implementation of the gmem_ext ops: host glue (compiled by the host compiler) around the
// torch-free kernels of kernels/*.cu, for float32, float64, float16 and bfloat16.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/cuda_launchers.h"
#include "../modulated_ops.h"

namespace gmem_ext {
namespace {

namespace kcu = gmem_kernels::cuda;

kcu::DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kcu::DType::kFloat32;
    case at::kDouble: return kcu::DType::kFloat64;
    case at::kHalf: return kcu::DType::kFloat16;
    case at::kBFloat16: return kcu::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": the cuda backend computes in float32, float64, float16 or bfloat16, got ",
                         t.scalar_type());
  }
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mut(at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }
const int64_t* ids_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

void madafm_forward_cuda(const at::Tensor& wn, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(wn.device());
  C10_CUDA_CHECK(kcu::madafm_weight(dtype_of("gmem_ext::madafm_weight", wn), ptr(wn), ptr(gamma), ptr(beta),
                                    mut(weight), gamma.size(0), wn.size(0), wn.size(1), stream_of(wn)));
}

void madafm_backward_cuda(const at::Tensor& grad_weight, const at::Tensor& wn, at::Tensor& dgamma, at::Tensor& dbeta) {
  const c10::cuda::CUDAGuard guard(wn.device());
  C10_CUDA_CHECK(kcu::madafm_weight_backward(dtype_of("gmem_ext::madafm_weight_backward", wn), ptr(grad_weight),
                                             ptr(wn), mut(dgamma), mut(dbeta), dgamma.size(0), wn.size(0),
                                             wn.size(1), stream_of(wn)));
}

void film_forward_cuda(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                       const at::Tensor& bias, const at::Tensor& task_ids) {
  const c10::cuda::CUDAGuard guard(h.device());
  C10_CUDA_CHECK(kcu::film_forward(dtype_of("gmem_ext::modulated_linear", h), mut(h), ptr(rowsum), ptr(gamma),
                                   ptr(beta), ptr(bias), ids_ptr(task_ids), h.size(0), h.size(1), stream_of(h)));
}

void film_backward_input_cuda(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot) {
  const c10::cuda::CUDAGuard guard(grad.device());
  C10_CUDA_CHECK(kcu::film_backward_input(dtype_of("gmem_ext::modulated_linear_backward", grad), ptr(grad),
                                          ptr(gamma), ptr(beta), ids_ptr(task_ids), mut(gdy), mut(rowdot),
                                          grad.size(0), grad.size(1), stream_of(grad)));
}

void film_backward_style_cuda(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                              const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto dtype = dtype_of("gmem_ext::modulated_linear_backward", grad);
  const at::Tensor& any = dgamma.defined() ? dgamma : (dbeta.defined() ? dbeta : dbias);
  const int64_t m = grad.size(0), o = grad.size(1), tasks = any.size(0);
  // Scratch for the two-stage (deterministic) reduction, from the caching allocator.
  at::Tensor workspace =
      at::empty({kcu::film_backward_style_workspace_bytes(dtype, m, o, tasks)}, grad.options().dtype(at::kByte));
  C10_CUDA_CHECK(kcu::film_backward_style(dtype, ptr(grad), ptr(h), ptr(rowsum), ids_ptr(task_ids), mut(dgamma),
                                          mut(dbeta), mut(dbias), m, o, tasks, workspace.mutable_data_ptr(),
                                          stream_of(grad)));
}

void lowrank_forward_cuda(const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& gvt,
                          const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt, at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(wn.device());
  C10_CUDA_CHECK(kcu::lowrank_weight(dtype_of("gmem_ext::modulated_conv2d_lowrank", wn), ptr(wn), ptr(gu), ptr(gs),
                                     ptr(gvt), gu.size(1), ptr(bu), ptr(bs), ptr(bvt), bu.size(1), mut(weight),
                                     gu.size(0), gvt.size(1), wn.size(1), stream_of(wn)));
}

const DeviceKernels kCudaKernels{madafm_forward_cuda,      madafm_backward_cuda,      film_forward_cuda,
                                 film_backward_input_cuda, film_backward_style_cuda, lowrank_forward_cuda};

}  // namespace
}  // namespace gmem_ext

TORCH_LIBRARY_IMPL(gmem_ext, CUDA, m) { GMEM_EXT_REGISTER_DEVICE_OPS(m, gmem_ext::kCudaKernels); }
