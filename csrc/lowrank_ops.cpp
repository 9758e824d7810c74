// Modulated convolution with low-rank styles (gmem_ext::modulated_conv2d_lowrank and its backward),
// written once for both devices on top of the device kernel lowrank_forward (see modulated_ops.h).
//
// Forward: per task group (only the tasks present in the batch) the weight is built straight from
// the factors, the style rebuild fused into the weight build, into one reused buffer; then one ATen
// convolution per group, as in modulated_ops.cpp.
// Backward: per group one convolution_backward; its weight gradient is reduced to the dense style
// gradients dGamma, dB of that task ([P, O, I] for the P tasks present, never for all T stored),
// then the factor gradients come from a few small batched GEMMs (DESIGN.md):
//   du = (dG v) * s,   dv = (dG^T u) * s,   ds = sum_o (dG v) * u.
#include "modulated_internal.h"
#include "modulated_ops.h"

namespace gmem_ext {
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
  const char* op = "gmem_ext::modulated_conv2d_lowrank";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  const int64_t out_ch = weight_norm.size(0), in_ch = weight_norm.size(1);
  const Factors gamma{gamma_u, gamma_s, gamma_v}, beta{beta_u, beta_s, beta_v};
  const LowRankInfo styles = check_lowrank_styles(op, gamma, beta, x, out_ch, in_ch);
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  const at::Tensor bias_table = check_bias(op, bias, styles.num_tasks, styles.stacked, out_ch, x);
  auto bias_of = [&](int64_t t) { return bias_table.defined() ? bias_table.select(0, t) : at::Tensor(); };
  at::Tensor weight = at::empty_like(weight_norm, at::MemoryFormat::Contiguous);

  if (!styles.stacked) {
    build_lowrank_weight_into(k, weight_norm, gamma, beta, weight);
    return conv(x, weight, bias_of(0), stride, padding, dilation);
  }
  const TaskGroups groups = group_by_task(op, ids, styles.num_tasks);
  if (groups.task.empty()) {  // empty batch: the shape comes from a convolution of nothing
    return conv(x, weight_norm, bias_of(0), stride, padding, dilation);
  }
  if (groups.task.size() == 1) {  // one task in the batch: no gather
    const int64_t t = groups.task[0];
    build_lowrank_weight_into(k, weight_norm, gamma.at(t), beta.at(t), weight);
    return conv(x, weight, bias_of(t), stride, padding, dilation);
  }
  // One weight buffer reused by every group (stream-ordered on CUDA).
  at::Tensor out;
  for (size_t g = 0; g < groups.task.size(); ++g) {
    const int64_t t = groups.task[g];
    build_lowrank_weight_into(k, weight_norm, gamma.at(t), beta.at(t), weight);
    at::Tensor part = conv(take_rows(x, groups, g), weight, bias_of(t), stride, padding, dilation);
    if (!out.defined()) {
      std::vector<int64_t> shape(part.sizes().begin(), part.sizes().end());
      shape[0] = x.size(0);
      out = at::empty(shape, part.options().memory_format(part.suggest_memory_format()));
    }
    put_rows(out, groups, g, part);
  }
  return out;
}

LowRankGrads modulated_conv2d_lowrank_backward(
    const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_norm,
    const at::Tensor& gamma_u, const at::Tensor& gamma_s, const at::Tensor& gamma_v, const at::Tensor& beta_u,
    const at::Tensor& beta_s, const at::Tensor& beta_v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  const char* op = "gmem_ext::modulated_conv2d_lowrank_backward";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  check_same(op, "grad_out", grad_out, x);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight_norm.size(0), op,
              ": grad_out must be [N, C_out, H_out, W_out], got ", grad_out.sizes());
  const int64_t out_ch = weight_norm.size(0), in_ch = weight_norm.size(1);
  const Factors gamma{gamma_u, gamma_s, gamma_v}, beta{beta_u, beta_s, beta_v};
  const LowRankInfo styles = check_lowrank_styles(op, gamma, beta, x, out_ch, in_ch);
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  check_bias(op, bias, styles.num_tasks, styles.stacked, out_ch, x);
  const bool need_x = output_mask[0], need_gamma = output_mask[1], need_beta = output_mask[2];
  const bool need_style = need_gamma || need_beta, need_bias = output_mask[3] && bias.has_value();
  at::Tensor dx, dbias, dense_gamma, dense_beta;  // dense style gradients: [O, I] or [P, O, I]
  at::Tensor present;                             // the P tasks of dense_gamma/dense_beta (stacked only)

  if (!styles.stacked) {
    // The weight values only matter for dx; the weight gradient needs the shape alone.
    at::Tensor weight = weight_norm;
    if (need_x) {
      weight = at::empty_like(weight_norm, at::MemoryFormat::Contiguous);
      build_lowrank_weight_into(k, weight_norm, gamma, beta, weight);
    }
    std::optional<at::IntArrayRef> bias_sizes;
    std::vector<int64_t> bias_shape{out_ch};
    if (need_bias) bias_sizes = at::IntArrayRef(bias_shape);
    at::Tensor dweight;
    std::tie(dx, dweight, dbias) = at::convolution_backward(grad_out, x, weight, bias_sizes, stride, padding,
                                                            dilation, false, {0, 0}, 1,
                                                            {need_x, need_style, need_bias});
    if (need_style) {
      dense_gamma = at::empty({out_ch, in_ch}, x.options());
      dense_beta = at::empty({out_ch, in_ch}, x.options());
      reduce_weight_grad_into(k, dweight, weight_norm, dense_gamma, dense_beta);
    }
  } else {
    const TaskGroups groups = group_by_task(op, ids, styles.num_tasks);
    const int64_t num_present = static_cast<int64_t>(groups.task.size());
    at::Tensor weight = need_x ? at::empty_like(weight_norm, at::MemoryFormat::Contiguous) : weight_norm;
    if (need_x) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (need_style) {
      dense_gamma = at::empty({num_present, out_ch, in_ch}, x.options());
      dense_beta = at::empty({num_present, out_ch, in_ch}, x.options());
      present = at::tensor(groups.task, at::TensorOptions().dtype(at::kLong)).to(x.device());
    }
    if (need_bias) dbias = at::zeros({styles.num_tasks, out_ch}, x.options());
    for (size_t g = 0; g < groups.task.size(); ++g) {
      const int64_t t = groups.task[g];
      const at::Tensor xg = take_rows(x, groups, g), dyg = take_rows(grad_out, groups, g);
      if (need_x || need_style) {
        if (need_x) build_lowrank_weight_into(k, weight_norm, gamma.at(t), beta.at(t), weight);
        auto [dxg, dwg, unused] = at::convolution_backward(dyg, xg, weight, std::nullopt, stride, padding, dilation,
                                                           false, {0, 0}, 1, {need_x, need_style, false});
        if (need_x) put_rows(dx, groups, g, dxg);
        if (need_style) {
          at::Tensor dg = dense_gamma[g], db = dense_beta[g];
          reduce_weight_grad_into(k, dwg, weight_norm, dg, db);
        }
      }
      if (need_bias) dbias[t].copy_(dyg.sum({0, 2, 3}));
    }
  }

  auto style_grads = [&](bool need, const at::Tensor& dense, const Factors& f) {
    if (!need) return std::make_tuple(empty_grad(x), empty_grad(x), empty_grad(x));
    return styles.stacked ? stacked_factor_grads(dense, present, f) : factor_grads(dense, f);
  };
  auto [dgu, dgs, dgv] = style_grads(need_gamma, dense_gamma, gamma);
  auto [dbu, dbs, dbv] = style_grads(need_beta, dense_beta, beta);
  return {need_x ? dx : empty_grad(x), dgu, dgs, dgv, dbu, dbs, dbv,
          need_bias ? dbias.view(bias->sizes()) : empty_grad(x)};
}

}  // namespace gmem_ext
