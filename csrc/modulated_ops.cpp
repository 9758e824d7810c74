// Device-independent parts of the gmem ops: argument checks, grouping of mixed-task batches,
// and the ATen convolutions / GEMMs around the device element kernels (see modulated_ops.h).
#include "modulated_ops.h"
#include "modulated_internal.h"

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gmem {
// The helpers below are shared with lowrank_ops.cpp through modulated_internal.h.
namespace internal {

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

// Number of stacked style sets (1 for one task) and whether gamma/beta are stacked. (A struct, not
// structured bindings: lambdas may capture its copies under C++17, which torch 2.11 builds use.)
struct StyleInfo {
  int64_t num_tasks;
  bool stacked;
};

// gamma/beta [*style] (one task) or [T, *style].
StyleInfo check_styles(const char* op, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& like,
                       at::IntArrayRef style) {
  check_same(op, "gamma", gamma, like);
  check_same(op, "beta", beta, like);
  const int64_t k = static_cast<int64_t>(style.size());
  const bool stacked = gamma.dim() == k + 1;
  TORCH_CHECK((gamma.dim() == k || stacked) && gamma.sizes().slice(gamma.dim() - k) == style, op,
              ": gamma must be ", style, " or [T, ", style, "], got ", gamma.sizes());
  TORCH_CHECK(beta.sizes() == gamma.sizes(), op, ": beta must have the shape of gamma ", gamma.sizes(), ", got ",
              beta.sizes());
  return {stacked ? gamma.size(0) : 1, stacked};
}

// Contiguous int64 task ids [N], or an undefined tensor for a single-task call.
at::Tensor check_task_ids(const char* op, const std::optional<at::Tensor>& task_ids, bool stacked, int64_t n,
                          const at::Tensor& like) {
  if (!stacked) {
    TORCH_CHECK(!task_ids.has_value(), op, ": task_ids given but gamma is a single style set");
    return at::Tensor();
  }
  TORCH_CHECK(task_ids.has_value(), op, ": gamma is stacked [T, ...]: task_ids [N] is required");
  const at::Tensor& ids = *task_ids;
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": task_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n, op, ": task_ids must be [", n, "], got ", ids.sizes());
  TORCH_CHECK(ids.device() == like.device(), op, ": task_ids is on ", ids.device(), ", expected ", like.device());
  return ids.contiguous();
}

// Bias as a contiguous [T, O] table (T = 1 for one task), or undefined.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t num_tasks, bool stacked,
                      int64_t out_features, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  check_same(op, "bias", b, like);
  if (stacked) {
    TORCH_CHECK(b.dim() == 2 && b.size(0) == num_tasks && b.size(1) == out_features, op, ": bias must be [",
                num_tasks, ", ", out_features, "] for stacked styles, got ", b.sizes());
  } else {
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, op, ": bias must be [", out_features, "], got ",
                b.sizes());
  }
  return b.reshape({num_tasks, out_features}).contiguous();  // an expanded [T, O] view gets materialised
}

// (TaskGroups: see modulated_internal.h)
TaskGroups group_by_task(const char* op, const at::Tensor& task_ids, int64_t num_tasks) {
  const at::Tensor ids = task_ids.to(at::kCPU).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t n = ids.numel();
  std::vector<int64_t> counts(num_tasks, 0);
  bool sorted = true;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < num_tasks, op, ": task_ids must lie in [0, ", num_tasks, "), got ", p[i]);
    counts[p[i]]++;
    sorted = sorted && (i == 0 || p[i] >= p[i - 1]);
  }
  TaskGroups groups;
  std::vector<int64_t> next(num_tasks, 0);
  for (int64_t t = 0, offset = 0; t < num_tasks; offset += counts[t], ++t) {
    next[t] = offset;
    if (counts[t]) {
      groups.task.push_back(t);
      groups.start.push_back(offset);
      groups.count.push_back(counts[t]);
    }
  }
  if (!sorted) {
    at::Tensor order = at::empty({n}, ids.options());
    int64_t* o = order.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) o[next[p[i]]++] = i;
    groups.order = order.to(task_ids.device());
  }
  return groups;
}

at::Tensor take_rows(const at::Tensor& t, const TaskGroups& groups, size_t g) {
  return groups.order.defined() ? t.index_select(0, groups.rows(g)) : t.narrow(0, groups.start[g], groups.count[g]);
}

void put_rows(at::Tensor& out, const TaskGroups& groups, size_t g, const at::Tensor& part) {
  if (groups.order.defined()) {
    out.index_copy_(0, groups.rows(g), part);
  } else {
    out.narrow(0, groups.start[g], groups.count[g]).copy_(part);
  }
}

// weight [P, O, I, kh, kw] <- gamma/beta [P, O, I] (or [O, I, kh, kw] <- [O, I]); weight contiguous.
void build_weight_into(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                       const at::Tensor& beta, at::Tensor& weight) {
  const int64_t rows = weight_norm.size(0) * weight_norm.size(1);
  if (weight.numel() == 0) return;
  const int64_t window = weight_norm.numel() / rows;
  const int64_t tasks = gamma.numel() / rows;
  at::Tensor out = weight.view({tasks, rows, window});
  k.madafm_forward(weight_norm.contiguous().view({rows, window}), gamma.contiguous().view({tasks, rows}),
                   beta.contiguous().view({tasks, rows}), out);
}

// A fresh CPU tensor of several megabytes comes from the system (mmap) on every call, and writing it
// first costs one page fault per 4 KiB page, which dominates a weight build of that size (stacked
// tasks). Asking for transparent huge pages on it (Linux, THP in "madvise" mode or "always") makes
// that one fault per 2 MiB. A hint only: nothing changes where the kernel refuses it.
at::Tensor empty_for_writing(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(out.nbytes());
  if (out.device().is_cpu() && bytes >= 2 * kHuge) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

at::Tensor build_weight(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                        const at::Tensor& beta) {
  std::vector<int64_t> shape(gamma.sizes().begin(), gamma.sizes().end());
  shape.push_back(weight_norm.size(2));
  shape.push_back(weight_norm.size(3));
  at::Tensor weight = empty_for_writing(shape, weight_norm.options());
  build_weight_into(k, weight_norm, gamma, beta, weight);
  return weight;
}

// dgamma, dbeta [(P,) O, I] (contiguous, possibly views) <- grad_weight [(P,) O, I, kh, kw].
void reduce_weight_grad_into(const DeviceKernels& k, const at::Tensor& grad_weight, const at::Tensor& weight_norm,
                             at::Tensor& dgamma, at::Tensor& dbeta) {
  const int64_t rows = weight_norm.size(0) * weight_norm.size(1);
  if (dgamma.numel() == 0) return;
  const int64_t window = weight_norm.numel() / rows;
  if (window == 0) {
    dgamma.zero_();
    dbeta.zero_();
    return;
  }
  const int64_t tasks = dgamma.numel() / rows;
  at::Tensor dg = dgamma.view({tasks, rows}), db = dbeta.view({tasks, rows});
  k.madafm_backward(grad_weight.contiguous().view({tasks, rows, window}),
                    weight_norm.contiguous().view({rows, window}), dg, db);
}

std::pair<at::Tensor, at::Tensor> reduce_weight_grad(const DeviceKernels& k, const at::Tensor& grad_weight,
                                                     const at::Tensor& weight_norm) {
  const auto style = grad_weight.sizes().slice(0, grad_weight.dim() - 2);
  at::Tensor dgamma = at::empty(style, grad_weight.options());
  at::Tensor dbeta = at::empty(style, grad_weight.options());
  reduce_weight_grad_into(k, grad_weight, weight_norm, dgamma, dbeta);
  return {dgamma, dbeta};
}

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight_norm, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C_in, H, W], got ", x.sizes());
  TORCH_CHECK(weight_norm.dim() == 4, op, ": weight_norm must be [C_out, C_in, kh, kw], got ", weight_norm.sizes());
  check_same(op, "weight_norm", weight_norm, x);
  TORCH_CHECK(x.size(1) == weight_norm.size(1), op, ": x has ", x.size(1), " channels, the weight expects ",
              weight_norm.size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two entries each");
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_row, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::optional<at::Tensor> bias;
  if (bias_row.defined()) bias = bias_row;
  return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, 1);
}

TaskGroups task_groups(const char* op, const at::Tensor& ids, bool stacked, int64_t num_tasks, int64_t batch) {
  if (stacked) return group_by_task(op, ids, num_tasks);
  TaskGroups whole;
  if (batch > 0) whole.task = {0}, whole.start = {0}, whole.count = {batch};
  return whole;
}

at::Tensor conv_by_task(const at::Tensor& x, const at::Tensor& weight_norm, const TaskGroups& groups,
                        const at::Tensor& bias_table, const BuildWeight& build_weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto bias_of = [&](int64_t t) { return bias_table.defined() ? bias_table.select(0, t) : at::Tensor(); };
  if (groups.task.empty()) {  // empty batch: the shape comes from a convolution of nothing
    return conv(x, weight_norm, bias_of(0), stride, padding, dilation);
  }
  at::Tensor weight = at::empty_like(weight_norm, at::MemoryFormat::Contiguous);
  at::Tensor out;
  for (size_t g = 0; g < groups.task.size(); ++g) {
    const int64_t t = groups.task[g];
    build_weight(t, weight);
    at::Tensor part = conv(take_rows(x, groups, g), weight, bias_of(t), stride, padding, dilation);
    if (groups.task.size() == 1) return part;  // the whole batch: nothing to write back
    if (!out.defined()) {
      std::vector<int64_t> shape(part.sizes().begin(), part.sizes().end());
      shape[0] = x.size(0);
      out = at::empty(shape, part.options().memory_format(part.suggest_memory_format()));
    }
    put_rows(out, groups, g, part);
  }
  return out;
}

at::Tensor conv_backward_by_task(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_norm,
                                 const TaskGroups& groups, const BuildWeight& build_weight, bool need_x,
                                 bool need_style, const ReduceStyle& reduce_style, at::Tensor& dbias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const bool need_bias = dbias.defined(), whole_batch = groups.task.size() == 1;
  at::Tensor dx;
  if (need_x && !whole_batch) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (!(need_x || need_style || need_bias)) return dx;
  at::Tensor weight = need_x ? at::empty_like(weight_norm, at::MemoryFormat::Contiguous) : weight_norm;
  const std::vector<int64_t> bias_shape{weight_norm.size(0)};
  std::optional<at::IntArrayRef> bias_sizes;
  if (need_bias) bias_sizes = at::IntArrayRef(bias_shape);
  for (size_t g = 0; g < groups.task.size(); ++g) {
    const int64_t t = groups.task[g];
    if (need_x) build_weight(t, weight);
    auto [dxg, dwg, dbg] = at::convolution_backward(take_rows(grad_out, groups, g), take_rows(x, groups, g), weight,
                                                    bias_sizes, stride, padding, dilation, false, {0, 0}, 1,
                                                    {need_x, need_style, need_bias});
    if (need_x && whole_batch) {
      dx = dxg;
    } else if (need_x) {
      put_rows(dx, groups, g, dxg);
    }
    if (need_style) reduce_style(g, t, dwg);
    if (need_bias) dbias[t].copy_(dbg);
  }
  return dx;
}

}  // namespace internal

using namespace internal;

namespace {

// Task t's weight from dense styles gamma/beta ([O, I], or [T, O, I] when stacked).
BuildWeight dense_weights(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                          const at::Tensor& beta, bool stacked) {
  return [&k, weight_norm, gamma, beta, stacked](int64_t t, at::Tensor& weight) {
    build_weight_into(k, weight_norm, stacked ? gamma[t] : gamma, stacked ? beta[t] : beta, weight);
  };
}

}  // namespace

at::Tensor madafm_weight(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                         const at::Tensor& beta) {
  const char* op = "gmem::madafm_weight";
  TORCH_CHECK(weight_norm.dim() == 4, op, ": weight_norm must be [O, I, kh, kw], got ", weight_norm.sizes());
  check_styles(op, gamma, beta, weight_norm, weight_norm.sizes().slice(0, 2));
  return build_weight(k, weight_norm, gamma, beta);
}

std::tuple<at::Tensor, at::Tensor> madafm_weight_backward(const DeviceKernels& k, const at::Tensor& grad_weight,
                                                          const at::Tensor& weight_norm) {
  const char* op = "gmem::madafm_weight_backward";
  TORCH_CHECK(weight_norm.dim() == 4, op, ": weight_norm must be [O, I, kh, kw], got ", weight_norm.sizes());
  check_same(op, "grad_weight", grad_weight, weight_norm);
  TORCH_CHECK((grad_weight.dim() == 4 || grad_weight.dim() == 5) &&
                  grad_weight.sizes().slice(grad_weight.dim() - 4) == weight_norm.sizes(),
              op, ": grad_weight must be [(T,) ", weight_norm.sizes(), "], got ", grad_weight.sizes());
  auto [dgamma, dbeta] = reduce_weight_grad(k, grad_weight, weight_norm);
  return {dgamma, dbeta};
}

at::Tensor modulated_conv2d(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                            const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& task_ids, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "gmem::modulated_conv2d";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  const StyleInfo styles = check_styles(op, gamma, beta, x, weight_norm.sizes().slice(0, 2));
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  const at::Tensor bias_table = check_bias(op, bias, styles.num_tasks, styles.stacked, weight_norm.size(0), x);
  const TaskGroups groups = task_groups(op, ids, styles.stacked, styles.num_tasks, x.size(0));
  const BuildWeight build = dense_weights(k, weight_norm, gamma, beta, styles.stacked);
  return conv_by_task(x, weight_norm, groups, bias_table, build, stride, padding, dilation);
}

Grads modulated_conv2d_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                std::array<bool, 4> output_mask) {
  const char* op = "gmem::modulated_conv2d_backward";
  check_conv(op, x, weight_norm, stride, padding, dilation);
  check_same(op, "grad_out", grad_out, x);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight_norm.size(0), op,
              ": grad_out must be [N, C_out, H_out, W_out], got ", grad_out.sizes());
  const int64_t out_ch = weight_norm.size(0);
  const StyleInfo styles = check_styles(op, gamma, beta, x, weight_norm.sizes().slice(0, 2));
  const at::Tensor ids = check_task_ids(op, task_ids, styles.stacked, x.size(0), x);
  check_bias(op, bias, styles.num_tasks, styles.stacked, out_ch, x);
  const bool need_style = output_mask[1] || output_mask[2];
  const bool need_bias = output_mask[3] && bias.has_value();
  const TaskGroups groups = task_groups(op, ids, styles.stacked, styles.num_tasks, x.size(0));

  // Style gradients reduced straight into their task's rows (tasks absent from the batch keep
  // exact zeros); the bias gradient as a [T, O] table (T = 1 for one task).
  at::Tensor dgamma, dbeta, dbias;
  if (need_style) {
    dgamma = at::zeros_like(gamma, at::MemoryFormat::Contiguous);
    dbeta = at::zeros_like(beta, at::MemoryFormat::Contiguous);
  }
  if (need_bias) dbias = at::zeros({styles.num_tasks, out_ch}, x.options());
  const BuildWeight build = dense_weights(k, weight_norm, gamma, beta, styles.stacked);
  auto reduce = [&](size_t, int64_t t, const at::Tensor& grad_weight) {
    at::Tensor dg = styles.stacked ? dgamma[t] : dgamma, db = styles.stacked ? dbeta[t] : dbeta;
    reduce_weight_grad_into(k, grad_weight, weight_norm, dg, db);
  };
  const at::Tensor dx = conv_backward_by_task(grad_out, x, weight_norm, groups, build, output_mask[0], need_style,
                                              reduce, dbias, stride, padding, dilation);
  return {output_mask[0] ? dx : empty_grad(x), output_mask[1] ? dgamma : empty_grad(x),
          output_mask[2] ? dbeta : empty_grad(x), need_bias ? dbias.view(bias->sizes()) : empty_grad(x)};
}

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
