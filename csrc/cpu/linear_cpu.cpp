// CPU element kernels of gmem::modulated_linear (csrc/linear.cpp): the mFiLM epilogue and the
// backward's per-row and per-task passes of linear_kernels.h under at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "device.h"
#include "linear_kernels.h"

namespace gmem {
namespace {
namespace kc {
// the kernels compiled for each ISA of GMEM_CPU_CLONES (device.h)
#define GMEM_DEFINE_CPU_KERNELS(T) \
  GMEM_CPU_CLONES void film_forward_rows(T* h, const T* rs, const T* g, const T* b, const T* c, const int64_t* ids, \
                                         int64_t o, int64_t begin, int64_t end) {                                 \
    gmem_kernels::cpu::film_forward_rows(h, rs, g, b, c, ids, o, begin, end);                                     \
  }                                                                                                               \
  GMEM_CPU_CLONES void film_backward_input_rows(const T* d, const T* g, const T* b, const int64_t* ids, T* gdy,   \
                                                T* dot, int64_t o, int64_t begin, int64_t end) {                  \
    gmem_kernels::cpu::film_backward_input_rows(d, g, b, ids, gdy, dot, o, begin, end);                           \
  }                                                                                                               \
  GMEM_CPU_CLONES void film_backward_style_cols(const T* d, const T* h, const T* rs, const int64_t* ids, T* dg,   \
                                                T* db, T* dc, int64_t m, int64_t o, int64_t begin, int64_t end) { \
    gmem_kernels::cpu::film_backward_style_cols(d, h, rs, ids, dg, db, dc, m, o, begin, end);                     \
  }
GMEM_DEFINE_CPU_KERNELS(float)
GMEM_DEFINE_CPU_KERNELS(double)
#undef GMEM_DEFINE_CPU_KERNELS
}  // namespace kc
}  // namespace

void film_forward_cpu(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                      const at::Tensor& bias, const at::Tensor& task_ids) {
  check_cpu_dtype("gmem::modulated_linear", h);
  const int64_t m = h.size(0), o = h.size(1);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "film_forward_cpu", [&] {
    scalar_t* y = h.mutable_data_ptr<scalar_t>();
    const scalar_t* rs = rowsum.const_data_ptr<scalar_t>();
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* b = beta.const_data_ptr<scalar_t>();
    const scalar_t* c = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ids = ids_ptr(task_ids);
    at::parallel_for(0, m, grain_rows(o), [&](int64_t begin, int64_t end) {
      kc::film_forward_rows(y, rs, g, b, c, ids, o, begin, end);
    });
  });
}

void film_backward_input_cpu(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot) {
  check_cpu_dtype("gmem::modulated_linear_backward", grad);
  const int64_t m = grad.size(0), o = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "film_backward_input_cpu", [&] {
    const scalar_t* d = grad.const_data_ptr<scalar_t>();
    const scalar_t* g = gamma.const_data_ptr<scalar_t>();
    const scalar_t* b = beta.const_data_ptr<scalar_t>();
    const int64_t* ids = ids_ptr(task_ids);
    scalar_t* out = gdy.mutable_data_ptr<scalar_t>();
    scalar_t* dot = rowdot.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, m, grain_rows(o), [&](int64_t begin, int64_t end) {
      kc::film_backward_input_rows(d, g, b, ids, out, dot, o, begin, end);
    });
  });
}

void film_backward_style_cpu(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                             const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias) {
  check_cpu_dtype("gmem::modulated_linear_backward", grad);
  const int64_t m = grad.size(0), o = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "film_backward_style_cpu", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    auto mut = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    const scalar_t *d = ptr(grad), *hp = ptr(h), *rs = ptr(rowsum);
    scalar_t *dg = mut(dgamma), *db = mut(dbeta), *dc = mut(dbias);
    const int64_t* ids = ids_ptr(task_ids);
    // Threads own disjoint column blocks and sum rows in order: deterministic, no atomics.
    at::parallel_for(0, o, std::max<int64_t>(16, grain_rows(m)), [&](int64_t begin, int64_t end) {
      kc::film_backward_style_cols(d, hp, rs, ids, dg, db, dc, m, o, begin, end);
    });
  });
}

}  // namespace gmem
