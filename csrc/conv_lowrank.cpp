// Modulated convolution with low-rank styles (gmem::modulated_conv2d_lowrank and its backward),
// written once for both devices on top of the device kernel lowrank_forward (csrc/cpu/conv_lowrank_cpu.cpp,
// csrc/cuda/conv_lowrank_cuda.cpp; see ops.h), registered for the CPU and CUDA keys.
//
// Forward: per task group (only the tasks present in the batch) the weight is built straight from
// the factors, the style rebuild fused into the weight build, into one reused buffer; then one ATen
// convolution per group, as in conv.cpp.
// Backward: per group one convolution_backward; its weight gradient is reduced to the dense style
// gradients dGamma, dB of that task ([P, O, I] for the P tasks present, never for all T stored),
// then the factor gradients come from a few small batched GEMMs (docs/design.md, section 4):
//   du = (dG v) * s,   dv = (dG^T u) * s,   ds = sum_o (dG v) * u.
#include "ops.h"

#include <torch/library.h>

namespace gmem {
namespace {

using namespace internal;

// One style's factors u [(T,) O, r], s [(T,) r], v [(T,) I, r].
struct Factors {
  at::Tensor u, s, v;
  Factors at(int64_t t) const { return {u.select(0, t), s.select(0, t), v.select(0, t)}; }
};

struct LowRankInfo {
  int64_t num_tasks;
  bool stacked;
};

void check_factors(const char* op, const char* name, const Factors& f, const at::Tensor& like, int64_t out_ch,
                   int64_t in_ch) {
  check_same(op, name, f.u, like);
  check_same(op, name, f.s, like);
  check_same(op, name, f.v, like);
  const int64_t d = f.u.dim();
  TORCH_CHECK((d == 2 || d == 3) && f.v.dim() == d && f.s.dim() == d - 1, op, ": ", name,
              " factors must be u [(T,) O, r], s [(T,) r], v [(T,) I, r], got u ", f.u.sizes(), ", s ", f.s.sizes(),
              ", v ", f.v.sizes());
  const int64_t r = f.u.size(-1);
  const bool same_lead = d == 2 || (f.s.size(0) == f.u.size(0) && f.v.size(0) == f.u.size(0));
  TORCH_CHECK(f.u.size(-2) == out_ch && f.v.size(-2) == in_ch && f.s.size(-1) == r && f.v.size(-1) == r && same_lead,
              op, ": ", name, " factors must be u [(T,) ", out_ch, ", r], s [(T,) r], v [(T,) ", in_ch,
              ", r] to match the layer, got u ", f.u.sizes(), ", s ", f.s.sizes(), ", v ", f.v.sizes());
}

LowRankInfo check_lowrank_styles(const char* op, const Factors& gamma, const Factors& beta, const at::Tensor& like,
                                 int64_t out_ch, int64_t in_ch) {
  check_factors(op, "gamma", gamma, like, out_ch, in_ch);
  check_factors(op, "beta", beta, like, out_ch, in_ch);
  const bool stacked = gamma.u.dim() == 3;
  TORCH_CHECK(beta.u.dim() == gamma.u.dim() && (!stacked || beta.u.size(0) == gamma.u.size(0)), op,
              ": gamma and beta must both be one task or stack the same number of tasks, got gamma u ",
              gamma.u.sizes(), " and beta u ", beta.u.sizes());
  return {stacked ? gamma.u.size(0) : 1, stacked};
}

// weight [O, I, kh, kw] (contiguous) <- one task's factors, through the device kernel.
void build_lowrank_weight_into(const DeviceKernels& k, const at::Tensor& weight_norm, const Factors& gamma,
                               const Factors& beta, at::Tensor& weight) {
  if (weight.numel() == 0) return;
  const int64_t rows = weight_norm.size(0) * weight_norm.size(1);
  at::Tensor out = weight.view({rows, weight.numel() / rows});
  // v transposed to [r, I]: the rank sums then run over contiguous memory
  k.lowrank_forward(weight_norm.contiguous().view({rows, weight_norm.numel() / rows}), gamma.u.contiguous(),
                    gamma.s.contiguous(), gamma.v.t().contiguous(), beta.u.contiguous(), beta.s.contiguous(),
                    beta.v.t().contiguous(), out);
}

// Task t's weight from the factors (stacked: [T, ...] factors, task t's taken).
BuildWeight lowrank_weights(const DeviceKernels& k, const at::Tensor& weight_norm, const Factors& gamma,
                            const Factors& beta, bool stacked) {
  return [&k, weight_norm, gamma, beta, stacked](int64_t t, at::Tensor& weight) {
    build_lowrank_weight_into(k, weight_norm, stacked ? gamma.at(t) : gamma, stacked ? beta.at(t) : beta, weight);
  };
}

// (du, ds, dv) of G = u diag(s) v^T from dG, batched over any leading dimension.
std::tuple<at::Tensor, at::Tensor, at::Tensor> factor_grads(const at::Tensor& dense_grad, const Factors& f) {
  const at::Tensor s_row = f.s.unsqueeze(-2);
  const at::Tensor dg_v = at::matmul(dense_grad, f.v);  // [*, O, r]
  at::Tensor du = dg_v * s_row;
  at::Tensor dv = at::matmul(dense_grad.transpose(-1, -2), f.u) * s_row;
  at::Tensor ds = (dg_v * f.u).sum(-2);
  return {du, ds, dv};
}

// Factor gradients of the stacked factors f from the dense gradients of the present tasks only:
// dense_grad [P, O, I] belongs to tasks `present` [P]; absent tasks get exact zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_factor_grads(const at::Tensor& dense_grad,
                                                                     const at::Tensor& present, const Factors& f) {
  at::Tensor du = at::zeros(f.u.sizes(), f.u.options());
  at::Tensor ds = at::zeros(f.s.sizes(), f.s.options());
  at::Tensor dv = at::zeros(f.v.sizes(), f.v.options());
  if (present.numel() == 0) return {du, ds, dv};
  const Factors picked{f.u.index_select(0, present), f.s.index_select(0, present), f.v.index_select(0, present)};
  auto [du_p, ds_p, dv_p] = factor_grads(dense_grad, picked);
  du.index_copy_(0, present, du_p);
  ds.index_copy_(0, present, ds_p);
  dv.index_copy_(0, present, dv_p);
  return {du, ds, dv};
}

}  // namespace

at::Tensor modulated_conv2d_lowrank(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                                    const at::Tensor& gamma_u, const at::Tensor& gamma_s, const at::Tensor& gamma_v,
                                    const at::Tensor& beta_u, const at::Tensor& beta_s, const at::Tensor& beta_v,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "gmem::modulated_conv2d_lowrank";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  const int64_t out_ch = weight_norm.size(0), in_ch = weight_norm.size(1);
  const Factors gamma{gamma_u, gamma_s, gamma_v}, beta{beta_u, beta_s, beta_v};
  const LowRankInfo styles = check_lowrank_styles(op, gamma, beta, x, out_ch, in_ch);
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  const at::Tensor bias_table = check_bias(op, bias, styles.num_tasks, styles.stacked, out_ch, x);
  const TaskGroups groups = task_groups(op, ids, styles.stacked, styles.num_tasks, x.size(0));
  const BuildWeight build = lowrank_weights(k, weight_norm, gamma, beta, styles.stacked);
  return conv_by_task(x, weight_norm, groups, bias_table, build, stride, padding, dilation);
}

LowRankGrads modulated_conv2d_lowrank_backward(
    const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_norm,
    const at::Tensor& gamma_u, const at::Tensor& gamma_s, const at::Tensor& gamma_v, const at::Tensor& beta_u,
    const at::Tensor& beta_s, const at::Tensor& beta_v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  const char* op = "gmem::modulated_conv2d_lowrank_backward";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  check_same(op, "grad_out", grad_out, x);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight_norm.size(0), op,
              ": grad_out must be [N, C_out, H_out, W_out], got ", grad_out.sizes());
  const int64_t out_ch = weight_norm.size(0), in_ch = weight_norm.size(1);
  const Factors gamma{gamma_u, gamma_s, gamma_v}, beta{beta_u, beta_s, beta_v};
  const LowRankInfo styles = check_lowrank_styles(op, gamma, beta, x, out_ch, in_ch);
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  check_bias(op, bias, styles.num_tasks, styles.stacked, out_ch, x);
  const bool need_gamma = output_mask[1], need_beta = output_mask[2], need_style = need_gamma || need_beta;
  const bool need_bias = output_mask[3] && bias.has_value();
  const TaskGroups groups = task_groups(op, ids, styles.stacked, styles.num_tasks, x.size(0));

  // Dense style gradients of the tasks present: [O, I] for one task, [P, O, I] for the P groups of a
  // stacked call (never for all T stored), turned into factor gradients below.
  at::Tensor dense_gamma, dense_beta, present, dbias;
  if (need_style) {
    const int64_t num_present = static_cast<int64_t>(groups.task.size());
    std::vector<int64_t> shape{out_ch, in_ch};
    if (styles.stacked) shape.insert(shape.begin(), num_present);
    dense_gamma = at::empty(shape, x.options());
    dense_beta = at::empty(shape, x.options());
    if (!styles.stacked && num_present == 0) {  // empty batch: no group writes the gradients
      dense_gamma.zero_();
      dense_beta.zero_();
    }
    if (styles.stacked) present = at::tensor(groups.task, at::TensorOptions().dtype(at::kLong)).to(x.device());
  }
  if (need_bias) dbias = at::zeros({styles.num_tasks, out_ch}, x.options());
  const BuildWeight build = lowrank_weights(k, weight_norm, gamma, beta, styles.stacked);
  auto reduce = [&](size_t g, int64_t, const at::Tensor& grad_weight) {
    at::Tensor dg = styles.stacked ? dense_gamma[g] : dense_gamma, db = styles.stacked ? dense_beta[g] : dense_beta;
    reduce_weight_grad_into(k, grad_weight, weight_norm, dg, db);
  };
  const at::Tensor dx = conv_backward_by_task(grad_out, x, weight_norm, groups, build, output_mask[0], need_style,
                                              reduce, dbias, stride, padding, dilation);

  auto style_grads = [&](bool need, const at::Tensor& dense, const Factors& f) {
    if (!need) return std::make_tuple(empty_grad(x), empty_grad(x), empty_grad(x));
    return styles.stacked ? stacked_factor_grads(dense, present, f) : factor_grads(dense, f);
  };
  auto [dgu, dgs, dgv] = style_grads(need_gamma, dense_gamma, gamma);
  auto [dbu, dbs, dbv] = style_grads(need_beta, dense_beta, beta);
  return {output_mask[0] ? dx : empty_grad(x), dgu, dgs, dgv, dbu, dbs, dbv,
          need_bias ? dbias.view(bias->sizes()) : empty_grad(x)};
}

}  // namespace gmem

TORCH_LIBRARY_IMPL(gmem, CPU, m) {
  m.impl("modulated_conv2d_lowrank",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs,
            const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bv,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d_lowrank(gmem::cpu_kernels(), x, wn, gu, gs, gv, bu, bs, bv, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_lowrank_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu,
            const at::Tensor& gs, const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs,
            const at::Tensor& bv, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_lowrank_backward(gmem::cpu_kernels(), dy, x, wn, gu, gs, gv, bu, bs, bv, bias,
                                                               tid, s, p, d, mask);
         });
}

#ifdef GMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(gmem, CUDA, m) {
  m.impl("modulated_conv2d_lowrank",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu, const at::Tensor& gs,
            const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bv,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d_lowrank(gmem::cuda_kernels(), x, wn, gu, gs, gv, bu, bs, bv, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_lowrank_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& gu,
            const at::Tensor& gs, const at::Tensor& gv, const at::Tensor& bu, const at::Tensor& bs,
            const at::Tensor& bv, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_lowrank_backward(gmem::cuda_kernels(), dy, x, wn, gu, gs, gv, bu, bs, bv, bias,
                                                               tid, s, p, d, mask);
         });
}
#endif
