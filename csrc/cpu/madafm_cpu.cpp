// CPU element kernels of gmem::madafm_weight and its backward (csrc/madafm.cpp, and the weight
// builds of csrc/conv.cpp): the torch-free kernels of madafm_kernels.h under at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "device.h"
#include "madafm_kernels.h"

namespace gmem {
namespace {
namespace kc {
// the kernels compiled for each ISA of GMEM_CPU_CLONES (device.h)
#define GMEM_DEFINE_CPU_KERNELS(T) \
  GMEM_CPU_CLONES void madafm_weight_rows(const T* wn, const T* g, const T* b, T* w, int64_t rows, int64_t window,  \
                                          int64_t begin, int64_t end) {                                           \
    gmem_kernels::cpu::madafm_weight_rows(wn, g, b, w, rows, window, begin, end);                                 \
  }                                                                                                               \
  GMEM_CPU_CLONES void madafm_weight_backward_rows(const T* dw, const T* wn, T* dg, T* db, int64_t rows,          \
                                                   int64_t window, int64_t begin, int64_t end) {                  \
    gmem_kernels::cpu::madafm_weight_backward_rows(dw, wn, dg, db, rows, window, begin, end);                     \
  }
GMEM_DEFINE_CPU_KERNELS(float)
GMEM_DEFINE_CPU_KERNELS(double)
#undef GMEM_DEFINE_CPU_KERNELS
}  // namespace kc
}  // namespace

void madafm_forward_cpu(const at::Tensor& wn, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& weight) {
  check_cpu_dtype("gmem::madafm_weight", wn);
  const int64_t rows = wn.size(0), window = wn.size(1), total = gamma.numel();
  AT_DISPATCH_FLOATING_TYPES(wn.scalar_type(), "madafm_forward_cpu", [&] {
    const scalar_t* w = wn.const_data_ptr<scalar_t>();
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* b = beta.const_data_ptr<scalar_t>();
    scalar_t* out = weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, grain_rows(window), [&](int64_t begin, int64_t end) {
      kc::madafm_weight_rows(w, g, b, out, rows, window, begin, end);
    });
  });
}

void madafm_backward_cpu(const at::Tensor& grad_weight, const at::Tensor& wn, at::Tensor& dgamma, at::Tensor& dbeta) {
  check_cpu_dtype("gmem::madafm_weight_backward", wn);
  const int64_t rows = wn.size(0), window = wn.size(1), total = dgamma.numel();
  AT_DISPATCH_FLOATING_TYPES(wn.scalar_type(), "madafm_backward_cpu", [&] {
    const scalar_t* d = grad_weight.const_data_ptr<scalar_t>();
    const scalar_t* w = wn.const_data_ptr<scalar_t>();
    scalar_t* dg = dgamma.mutable_data_ptr<scalar_t>();
    scalar_t* db = dbeta.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, grain_rows(window), [&](int64_t begin, int64_t end) {
      kc::madafm_weight_backward_rows(d, w, dg, db, rows, window, begin, end);
    });
  });
}

}  // namespace gmem
