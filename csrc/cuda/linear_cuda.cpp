// CUDA element kernels of gmem::modulated_linear (csrc/linear.cpp): host glue around linear_kernels.cu.
#include "device.h"

namespace gmem {

void film_forward_cuda(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                       const at::Tensor& bias, const at::Tensor& task_ids) {
  const char* op = "gmem::modulated_linear";
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor rs = in(rowsum, h), g = in(gamma, h), b = in(beta, h), c = in(bias, h);
  C10_CUDA_CHECK(kcu::film_forward(dtype_of(op, h), out(op, h, h), ptr(rs), ptr(g), ptr(b), ptr(c),
                                   ids_ptr(task_ids), h.size(0), h.size(1), stream_of(h)));
}

void film_backward_input_cuda(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot) {
  const char* op = "gmem::modulated_linear_backward";
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = in(gamma, grad), b = in(beta, grad);
  C10_CUDA_CHECK(kcu::film_backward_input(dtype_of(op, grad), ptr(grad), ptr(g), ptr(b), ids_ptr(task_ids),
                                          out(op, gdy, grad), out(op, rowdot, grad), grad.size(0), grad.size(1),
                                          stream_of(grad)));
}

void film_backward_style_cuda(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                              const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias) {
  const char* op = "gmem::modulated_linear_backward";
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto dtype = dtype_of(op, grad);
  const at::Tensor hh = in(h, grad), rs = in(rowsum, grad);
  const at::Tensor& any = dgamma.defined() ? dgamma : (dbeta.defined() ? dbeta : dbias);
  const int64_t m = grad.size(0), o = grad.size(1), tasks = any.size(0);
  // Scratch for the two-stage (deterministic) reduction, from the caching allocator.
  at::Tensor workspace =
      at::empty({kcu::film_backward_style_workspace_bytes(dtype, m, o, tasks)}, grad.options().dtype(at::kByte));
  C10_CUDA_CHECK(kcu::film_backward_style(dtype, ptr(grad), ptr(hh), ptr(rs), ids_ptr(task_ids),
                                          out(op, dgamma, grad), out(op, dbeta, grad), out(op, dbias, grad), m, o,
                                          tasks, workspace.mutable_data_ptr(), stream_of(grad)));
}

}  // namespace gmem
