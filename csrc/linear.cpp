// gmem::modulated_linear (mFiLM), its forward that also returns x @ Wn^T, and its backward, written
// once for both devices and registered for the CPU and CUDA keys: one ATen GEMM shared by every
// task, then the element kernels k.film_* (csrc/cpu/linear_cpu.cpp, csrc/cuda/linear_cuda.cpp).
#include "ops.h"

#include <torch/library.h>

namespace gmem {

using namespace internal;

namespace {

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight_norm) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, d_in], got ", x.sizes());
  TORCH_CHECK(weight_norm.dim() == 2, op, ": weight_norm must be [d_out, d_in], got ", weight_norm.sizes());
  check_same(op, "weight_norm", weight_norm, x);
  TORCH_CHECK(x.size(1) == weight_norm.size(1), op, ": x has ", x.size(1), " features, the weight expects ",
              weight_norm.size(1));
}

// Host-side range check of linear task ids on the CPU (on CUDA the Python layer has checked them).
void check_linear_ids(const char* op, const at::Tensor& ids, int64_t num_tasks) {
  if (!ids.defined() || !ids.device().is_cpu()) return;
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < num_tasks, op, ": task_ids must lie in [0, ", num_tasks, "), got ", p[i]);
}

// y = g[t] * x_wn + b[t] * sum_i x + bias[t], with x_wn = x @ Wn^T computed once for every task;
// keep_x_wn: y gets its own buffer and x_wn is returned too (else the epilogue runs in place).
std::tuple<at::Tensor, at::Tensor> linear_forward(const char* op, const DeviceKernels& k, const at::Tensor& x,
                                                  const at::Tensor& weight_norm, const at::Tensor& gamma,
                                                  const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& task_ids, bool keep_x_wn) {
  check_linear(op, x, weight_norm);
  const int64_t out_features = weight_norm.size(0);
  const StyleInfo styles = check_styles(op, gamma, beta, x, weight_norm.sizes().slice(0, 1));
  const int64_t num_tasks = styles.num_tasks;
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  check_linear_ids(op, ids, num_tasks);
  const at::Tensor bias_table = check_bias(op, bias, num_tasks, styles.stacked, out_features, x);
  const at::Tensor x_wn = at::mm(x, weight_norm.t()).contiguous();
  at::Tensor y = keep_x_wn ? x_wn.clone() : x_wn;
  if (y.numel() == 0) return {y, x_wn};
  const at::Tensor rowsum = x.sum(1).contiguous();
  k.film_forward(y, rowsum, gamma.contiguous().view({num_tasks, out_features}),
                 beta.contiguous().view({num_tasks, out_features}), bias_table, ids);
  return {y, keep_x_wn ? x_wn : at::Tensor()};
}

}  // namespace

at::Tensor modulated_linear(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                            const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& task_ids) {
  return std::get<0>(
      linear_forward("gmem::modulated_linear", k, x, weight_norm, gamma, beta, bias, task_ids, false));
}

std::tuple<at::Tensor, at::Tensor> modulated_linear_forward(const DeviceKernels& k, const at::Tensor& x,
                                                            const at::Tensor& weight_norm, const at::Tensor& gamma,
                                                            const at::Tensor& beta,
                                                            const std::optional<at::Tensor>& bias,
                                                            const std::optional<at::Tensor>& task_ids) {
  return linear_forward("gmem::modulated_linear_forward", k, x, weight_norm, gamma, beta, bias, task_ids, true);
}

Grads modulated_linear_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                std::array<bool, 4> output_mask, const std::optional<at::Tensor>& x_wn) {
  const char* op = "gmem::modulated_linear_backward";
  check_linear(op, x, weight_norm);
  check_same(op, "grad_out", grad_out, x);
  const int64_t m = x.size(0), out_features = weight_norm.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == m && grad_out.size(1) == out_features, op,
              ": grad_out must be [", m, ", ", out_features, "], got ", grad_out.sizes());
  const StyleInfo styles = check_styles(op, gamma, beta, x, weight_norm.sizes().slice(0, 1));
  const int64_t num_tasks = styles.num_tasks;
  const bool stacked = styles.stacked;
  const at::Tensor ids = check_task_ids(op, task_ids, stacked, m, x);
  check_linear_ids(op, ids, num_tasks);
  check_bias(op, bias, num_tasks, stacked, out_features, x);
  if (x_wn.has_value()) {
    check_same(op, "x_wn", *x_wn, x);
    TORCH_CHECK(x_wn->dim() == 2 && x_wn->size(0) == m && x_wn->size(1) == out_features, op,
                ": x_wn (x @ weight_norm^T from the forward) must be [", m, ", ", out_features, "], got ",
                x_wn->sizes());
  }
  const bool need_bias = output_mask[3] && bias.has_value();
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor g = gamma.contiguous().view({num_tasks, out_features});
  const at::Tensor b = beta.contiguous().view({num_tasks, out_features});
  at::Tensor dx, dgamma, dbeta, dbias;

  if (output_mask[0]) {
    // dx = (dy * gamma[t]) @ Wn + sum_o(dy * beta[t])
    at::Tensor gdy = at::empty({m, out_features}, x.options());
    at::Tensor rowdot = at::zeros({m}, x.options());
    if (gdy.numel()) k.film_backward_input(dy, g, b, ids, gdy, rowdot);
    dx = at::addmm(rowdot.unsqueeze(1), gdy, weight_norm);
  }
  if (output_mask[1] || output_mask[2] || need_bias) {
    at::Tensor h;  // x @ Wn^T: the forward's when given, else one more GEMM
    if (output_mask[1]) h = x_wn.has_value() ? x_wn->contiguous() : at::mm(x, weight_norm.t()).contiguous();
    const at::Tensor rowsum = output_mask[2] ? x.sum(1).contiguous() : at::Tensor();
    auto zeros = [&](bool need) { return need ? at::zeros({num_tasks, out_features}, x.options()) : at::Tensor(); };
    dgamma = zeros(output_mask[1]);
    dbeta = zeros(output_mask[2]);
    dbias = zeros(need_bias);
    if (dy.numel()) k.film_backward_style(dy, h, rowsum, ids, dgamma, dbeta, dbias);
  }
  return {output_mask[0] ? dx : empty_grad(x), output_mask[1] ? dgamma.view(gamma.sizes()) : empty_grad(x),
          output_mask[2] ? dbeta.view(beta.sizes()) : empty_grad(x),
          need_bias ? dbias.view(bias->sizes()) : empty_grad(x)};
}

}  // namespace gmem

TORCH_LIBRARY_IMPL(gmem, CPU, m) {
  m.impl("modulated_linear",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear(gmem::cpu_kernels(), x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_forward",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear_forward(gmem::cpu_kernels(), x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            std::array<bool, 4> mask, const std::optional<at::Tensor>& x_wn) {
           return gmem::modulated_linear_backward(gmem::cpu_kernels(), dy, x, wn, g, b, bias, tid, mask, x_wn);
         });
}

#ifdef GMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(gmem, CUDA, m) {
  m.impl("modulated_linear",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear(gmem::cuda_kernels(), x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_forward",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid) {
           return gmem::modulated_linear_forward(gmem::cuda_kernels(), x, wn, g, b, bias, tid);
         });
  m.impl("modulated_linear_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            std::array<bool, 4> mask, const std::optional<at::Tensor>& x_wn) {
           return gmem::modulated_linear_backward(gmem::cuda_kernels(), dy, x, wn, g, b, bias, tid, mask, x_wn);
         });
}
#endif
