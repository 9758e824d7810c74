// CUDA implementation of the gmem ops: host glue (compiled by the host compiler) around the
// torch-free kernels of kernels/*.cu, for float32, float64, float16 and bfloat16.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../autograd.h"
#include "../kernels/cuda_launchers.h"
#include "../modulated_ops.h"

namespace gmem {
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

// The kernels take untyped pointers and read every buffer in the one dtype they are launched for,
// so a buffer is passed only through in() (cast to that dtype where it differs: e.g. x.sum(1) is
// float32 for a bfloat16 x under CUDA autocast) and an output only through out() (checked).
const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
at::Tensor in(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() && t.scalar_type() != like.scalar_type() ? t.to(like.scalar_type()) : t;
}
void* out(const char* op, at::Tensor& t, const at::Tensor& like) {
  if (!t.defined()) return nullptr;
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": output buffer has dtype ", t.scalar_type(),
              ", the kernel writes ", like.scalar_type());
  return t.mutable_data_ptr();
}
const int64_t* ids_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

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

const DeviceKernels kCudaKernels{madafm_forward_cuda,      madafm_backward_cuda,      film_forward_cuda,
                                 film_backward_input_cuda, film_backward_style_cuda, lowrank_forward_cuda};

}  // namespace
}  // namespace gmem

// The kernels of every gmem:: op for the CUDA dispatch key: each op body (modulated_ops.cpp,
// lowrank_ops.cpp) run with this device's element kernels (the table above).
TORCH_LIBRARY_IMPL(gmem, CUDA, m) {
  m.impl("madafm_weight", [](const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b) {
    return gmem::madafm_weight(gmem::kCudaKernels, wn, g, b);
  });
  m.impl("madafm_weight_backward", [](const at::Tensor& dw, const at::Tensor& wn) {
    return gmem::madafm_weight_backward(gmem::kCudaKernels, dw, wn);
  });
  m.impl("modulated_conv2d",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d(gmem::kCudaKernels, x, wn, g, b, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_backward(gmem::kCudaKernels, dy, x, wn, g, b, bias, tid, s, p, d, mask);
         });
  m.impl("modulated_linear",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear(gmem::kCudaKernels, x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_forward",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear_forward(gmem::kCudaKernels, x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            std::array<bool, 4> mask, const std::optional<at::Tensor>& x_wn) {
           return gmem::modulated_linear_backward(gmem::kCudaKernels, dy, x, wn, g, b, bias, tid, mask, x_wn);
         });
  m.impl("modulated_conv2d_lowrank",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs,
            const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bv,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d_lowrank(gmem::kCudaKernels, x, wn, gu, gs, gv, bu, bs, bv, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_lowrank_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu,
            const at::Tensor& gs, const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs,
            const at::Tensor& bv, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_lowrank_backward(gmem::kCudaKernels, dy, x, wn, gu, gs, gv, bu, bs, bv, bias,
                                                               tid, s, p, d, mask);
         });
}

// The C++ Autograd kernel of madafm_weight (autograd.cpp) for CUDA tensors too.
TORCH_LIBRARY_IMPL(gmem, AutogradCUDA, m) { m.impl("madafm_weight", gmem::madafm_weight_autograd); }
