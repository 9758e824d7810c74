// CUDA element kernels of gmem::madafm_weight and its backward (csrc/madafm.cpp, and the weight
// builds of csrc/conv.cpp): host glue around madafm_kernels.cu.
#include "device.h"

namespace gmem {

void madafm_forward_cuda(const at::Tensor& wn, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& weight) {
  const char* op = "gmem::madafm_weight";
  const c10::cuda::CUDAGuard guard(wn.device());
  const at::Tensor g = in(gamma, wn), b = in(beta, wn);
  C10_CUDA_CHECK(kcu::madafm_weight(dtype_of(op, wn), ptr(wn), ptr(g), ptr(b), out(op, weight, wn), gamma.size(0),
                                    wn.size(0), wn.size(1), stream_of(wn)));
}

void madafm_backward_cuda(const at::Tensor& grad_weight, const at::Tensor& wn, at::Tensor& dgamma, at::Tensor& dbeta) {
  const char* op = "gmem::madafm_weight_backward";
  const c10::cuda::CUDAGuard guard(wn.device());
  const at::Tensor d = in(grad_weight, wn);
  C10_CUDA_CHECK(kcu::madafm_weight_backward(dtype_of(op, wn), ptr(d), ptr(wn), out(op, dgamma, wn),
                                             out(op, dbeta, wn), dgamma.size(0), wn.size(0), wn.size(1),
                                             stream_of(wn)));
}

}  // namespace gmem
