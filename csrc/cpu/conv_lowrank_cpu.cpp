// CPU element kernel of gmem::modulated_conv2d_lowrank (csrc/conv_lowrank.cpp): one task's weight
// built from low-rank style factors (lowrank_kernels.h), threads over output channels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "device.h"
#include "lowrank_kernels.h"

namespace gmem {
namespace {
namespace kc {
// the kernels compiled for each ISA of GMEM_CPU_CLONES (device.h)
#define GMEM_DEFINE_CPU_LOWRANK_KERNEL(T) \
  GMEM_CPU_CLONES void lowrank_weight_rows(const T* wn, const T* gu, const T* gs, const T* gvt, int64_t rg,        \
                                           const T* bu, const T* bs, const T* bvt, int64_t rb, T* w, int64_t o,    \
                                           int64_t i, int64_t window, int64_t begin, int64_t end) {                \
    gmem_kernels::cpu::lowrank_weight_rows(wn, gu, gs, gvt, rg, bu, bs, bvt, rb, w, o, i, window, begin, end);    \
  }
GMEM_DEFINE_CPU_LOWRANK_KERNEL(float)
GMEM_DEFINE_CPU_LOWRANK_KERNEL(double)
#undef GMEM_DEFINE_CPU_LOWRANK_KERNEL
}  // namespace kc
}  // namespace

// weight [O*I, K] of one task from low-rank style factors (lowrank_kernels.h), threads over O.
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

}  // namespace gmem
