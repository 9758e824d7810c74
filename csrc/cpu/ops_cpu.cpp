// CPU implementation of the gmem ops: the torch-free kernels of kernels/cpu_kernels.h run in
// parallel (at::parallel_for, deterministic partitions) for float32 and float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu_kernels.h"
#include "../kernels/lowrank_kernels.h"
#include "../modulated_ops.h"

namespace gmem {
namespace {

// The kernels are built for the baseline ISA and, where GCC can, also for AVX2+FMA (target_clones:
// the loader picks the clone for the CPU at run time; the kernels are forced inline into these
// wrappers, see GMEM_KERNEL_INLINE). The clone names an ISA level, not a CPU model: GCC picks an
// "arch=haswell" clone only on CPUs it identifies as Haswell-family Intel (on this project's AMD EPYC
// machines the baseline ran instead); "arch=x86-64-v3" (AVX2, FMA, ...; GCC >= 12) is picked by
// features. An AVX-512 clone measured slower here.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define GMEM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMEM_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define GMEM_CPU_CLONES
#endif

namespace kc {
#define GMEM_DEFINE_CPU_KERNELS(T)                                                                                \
  GMEM_CPU_CLONES void madafm_weight_rows(const T* wn, const T* g, const T* b, T* w, int64_t rows, int64_t window,  \
                                          int64_t begin, int64_t end) {                                           \
    gmem_kernels::cpu::madafm_weight_rows(wn, g, b, w, rows, window, begin, end);                                 \
  }                                                                                                               \
  GMEM_CPU_CLONES void madafm_weight_backward_rows(const T* dw, const T* wn, T* dg, T* db, int64_t rows,          \
                                                   int64_t window, int64_t begin, int64_t end) {                  \
    gmem_kernels::cpu::madafm_weight_backward_rows(dw, wn, dg, db, rows, window, begin, end);                     \
  }                                                                                                               \
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
#define GMEM_DEFINE_CPU_LOWRANK_KERNEL(T)                                                                       \
  GMEM_CPU_CLONES void lowrank_weight_rows(const T* wn, const T* gu, const T* gs, const T* gvt, int64_t rg,        \
                                           const T* bu, const T* bs, const T* bvt, int64_t rb, T* w, int64_t o,    \
                                           int64_t i, int64_t window, int64_t begin, int64_t end) {                \
    gmem_kernels::cpu::lowrank_weight_rows(wn, gu, gs, gvt, rg, bu, bs, bvt, rb, w, o, i, window, begin, end);    \
  }
GMEM_DEFINE_CPU_LOWRANK_KERNEL(float)
GMEM_DEFINE_CPU_LOWRANK_KERNEL(double)
#undef GMEM_DEFINE_CPU_LOWRANK_KERNEL
}  // namespace kc

// About this many elements per task keeps the threading overhead small next to the work.
constexpr int64_t kGrainElements = 16384;

int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

void check_cpu_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the cpu backend computes in float32 or float64, got ", t.scalar_type());
}

const int64_t* ids_ptr(const at::Tensor& task_ids) {
  return task_ids.defined() ? task_ids.data_ptr<int64_t>() : nullptr;
}

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

// weight [O*I, K] of one task from low-rank style factors (kernels/lowrank_kernels.h), threads over O.
void lowrank_forward_cpu(const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& gvt,
                         const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt, at::Tensor& weight) {
  check_cpu_dtype("gmem::modulated_conv2d_lowrank", wn);
  const int64_t out_ch = gu.size(0), in_ch = gvt.size(1), window = wn.size(1);
  const int64_t rg = gu.size(1), rb = bu.size(1);
  AT_DISPATCH_FLOATING_TYPES(wn.scalar_type(), "lowrank_forward_cpu", [&] {
    const scalar_t* w = wn.const_data_ptr<scalar_t>();
    const scalar_t *gu_p = gu.const_data_ptr<scalar_t>(), *gs_p = gs.const_data_ptr<scalar_t>();
    const scalar_t *gv_p = gvt.const_data_ptr<scalar_t>(), *bu_p = bu.const_data_ptr<scalar_t>();
    const scalar_t *bs_p = bs.const_data_ptr<scalar_t>(), *bv_p = bvt.const_data_ptr<scalar_t>();
    scalar_t* out = weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out_ch, grain_rows(in_ch * (window + rg + rb)), [&](int64_t begin, int64_t end) {
      kc::lowrank_weight_rows(w, gu_p, gs_p, gv_p, rg, bu_p, bs_p, bv_p, rb, out, out_ch, in_ch, window, begin, end);
    });
  });
}

const DeviceKernels kCpuKernels{madafm_forward_cpu,      madafm_backward_cpu,     film_forward_cpu,
                                film_backward_input_cpu, film_backward_style_cpu, lowrank_forward_cpu};

}  // namespace
}  // namespace gmem

// The kernels of every gmem:: op for the CPU dispatch key: each op body (modulated_ops.cpp,
// lowrank_ops.cpp) run with this device's element kernels (the table above).
TORCH_LIBRARY_IMPL(gmem, CPU, m) {
  m.impl("madafm_weight", [](const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b) {
    return gmem::madafm_weight(gmem::kCpuKernels, wn, g, b);
  });
  m.impl("madafm_weight_backward", [](const at::Tensor& dw, const at::Tensor& wn) {
    return gmem::madafm_weight_backward(gmem::kCpuKernels, dw, wn);
  });
  m.impl("modulated_conv2d",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d(gmem::kCpuKernels, x, wn, g, b, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_backward(gmem::kCpuKernels, dy, x, wn, g, b, bias, tid, s, p, d, mask);
         });
  m.impl("modulated_linear",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear(gmem::kCpuKernels, x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_forward",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear_forward(gmem::kCpuKernels, x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            std::array<bool, 4> mask, const std::optional<at::Tensor>& x_wn) {
           return gmem::modulated_linear_backward(gmem::kCpuKernels, dy, x, wn, g, b, bias, tid, mask, x_wn);
         });
  m.impl("modulated_conv2d_lowrank",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs,
            const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bv,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d_lowrank(gmem::kCpuKernels, x, wn, gu, gs, gv, bu, bs, bv, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_lowrank_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu,
            const at::Tensor& gs, const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs,
            const at::Tensor& bv, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_lowrank_backward(gmem::kCpuKernels, dy, x, wn, gu, gs, gv, bu, bs, bv, bias,
                                                               tid, s, p, d, mask);
         });
}
