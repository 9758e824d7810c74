// gmem::modulated_conv2d and its backward (dense styles, one task or mixed tasks), written once for
// both devices and registered for the CPU and CUDA keys: per task group (the tasks present in the
// batch) the weight is built by the element kernel k.madafm_forward (csrc/cpu/madafm_cpu.cpp,
// csrc/cuda/madafm_cuda.cpp) into one reused buffer, then one ATen convolution (oneDNN / cuDNN). Also
// the grouping of mixed-task batches and the by-task convolution loops that conv_lowrank.cpp shares.
#include "ops.h"

#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace gmem {
namespace internal {

// (TaskGroups: see ops.h)
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

}  // namespace gmem

TORCH_LIBRARY_IMPL(gmem, CPU, m) {
  m.impl("modulated_conv2d",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d(gmem::cpu_kernels(), x, wn, g, b, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_backward(gmem::cpu_kernels(), dy, x, wn, g, b, bias, tid, s, p, d, mask);
         });
}

#ifdef GMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(gmem, CUDA, m) {
  m.impl("modulated_conv2d",
         [](const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid, at::IntArrayRef s,
            at::IntArrayRef p, at::IntArrayRef d) {
           return gmem::modulated_conv2d(gmem::cuda_kernels(), x, wn, g, b, bias, tid, s, p, d);
         });
  m.impl("modulated_conv2d_backward",
         [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wn, const at::Tensor& g,
            const at::Tensor& b, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tid,
            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 4> mask) {
           return gmem::modulated_conv2d_backward(gmem::cuda_kernels(), dy, x, wn, g, b, bias, tid, s, p, d, mask);
         });
}
#endif
