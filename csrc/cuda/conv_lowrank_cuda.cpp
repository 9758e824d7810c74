// CUDA element kernel of gmem::modulated_conv2d_lowrank (csrc/conv_lowrank.cpp): host glue around
// lowrank_kernels.cu.
#include "device.h"

namespace gmem {

void lowrank_forward_cuda(const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& gvt,
                          const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt, at::Tensor& weight) {
  const char* op = "gmem::modulated_conv2d_lowrank";
  const c10::cuda::CUDAGuard guard(wn.device());
  const at::Tensor gu_ = in(gu, wn), gs_ = in(gs, wn), gvt_ = in(gvt, wn);
  const at::Tensor bu_ = in(bu, wn), bs_ = in(bs, wn), bvt_ = in(bvt, wn);
  C10_CUDA_CHECK(kcu::lowrank_weight(dtype_of(op, wn), ptr(wn), ptr(gu_), ptr(gs_), ptr(gvt_), gu.size(1), ptr(bu_),
                                     ptr(bs_), ptr(bvt_), bu.size(1), out(op, weight, wn), gu.size(0), gvt.size(1),
                                     wn.size(1), stream_of(wn)));
}

}  // namespace gmem
