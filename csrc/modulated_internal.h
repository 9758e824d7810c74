// Helpers of modulated_ops.cpp shared with the other op files (lowrank_ops.cpp): argument checks,
// grouping of mixed-task batches, the mAdaFM weight-gradient reduction and the ATen convolution.
// Not part of the extension's interface.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "modulated_ops.h"

namespace gmem {
namespace internal {

at::Tensor empty_grad(const at::Tensor& like);

// t has the dtype and device of like (else an error naming op and name).
void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like);

// Contiguous int64 task ids [N], or an undefined tensor for a single-task call.
at::Tensor check_task_ids(const char* op, const std::optional<at::Tensor>& task_ids, bool stacked, int64_t n,
                          const at::Tensor& like);

// Bias as a contiguous [T, O] table (T = 1 for one task), or undefined.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t num_tasks, bool stacked,
                      int64_t out_features, const at::Tensor& like);

// Samples grouped by task: a stable counting sort on the host (one device-to-host copy of the ids).
struct TaskGroups {
  std::vector<int64_t> task, start, count;
  at::Tensor order;  // [N] int64 on the device of the ids; undefined when the ids are already sorted
  // indices (into the batch) of the samples of group g
  at::Tensor rows(size_t g) const { return order.narrow(0, start[g], count[g]); }
};

TaskGroups group_by_task(const char* op, const at::Tensor& task_ids, int64_t num_tasks);

// The groups of a call: by task for stacked styles (ids [N]), else the whole batch as task 0 (no
// gather); an empty batch has no group.
TaskGroups task_groups(const char* op, const at::Tensor& ids, bool stacked, int64_t num_tasks, int64_t batch);

// The rows of t (batch dimension) of group g, and their write-back into out.
at::Tensor take_rows(const at::Tensor& t, const TaskGroups& groups, size_t g);
void put_rows(at::Tensor& out, const TaskGroups& groups, size_t g, const at::Tensor& part);

// dgamma, dbeta [(P,) O, I] (contiguous, possibly views) <- grad_weight [(P,) O, I, kh, kw].
void reduce_weight_grad_into(const DeviceKernels& k, const at::Tensor& grad_weight, const at::Tensor& weight_norm,
                             at::Tensor& dgamma, at::Tensor& dbeta);

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight_norm, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation);

// at::convolution with an optional bias row [O] (undefined: none).
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_row, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation);

// Writes task t's weight [O, I, kh, kw] into the contiguous buffer it is given.
using BuildWeight = std::function<void(int64_t t, at::Tensor& weight)>;

// The modulated convolution by task group, shared by the dense and the low-rank ops: per group
// (the tasks present only) build_weight fills one reused buffer (stream-ordered on CUDA, so the
// next build waits for the previous convolution), then one ATen convolution of the group's samples,
// written back in batch order. bias_table [T, O] or undefined.
at::Tensor conv_by_task(const at::Tensor& x, const at::Tensor& weight_norm, const TaskGroups& groups,
                        const at::Tensor& bias_table, const BuildWeight& build_weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation);

// Its backward: per group one convolution_backward. Returns dx [N, I, H, W] in batch order (with
// need_x; else undefined); with need_style the group's weight gradient [O, I, kh, kw] goes to
// reduce_style(g, t, grad_weight); dbias (if defined, [T, O]) gets row t. build_weight runs only
// for dx: the weight gradient needs the weight's shape alone.
using ReduceStyle = std::function<void(size_t g, int64_t t, const at::Tensor& grad_weight)>;
at::Tensor conv_backward_by_task(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_norm,
                                 const TaskGroups& groups, const BuildWeight& build_weight, bool need_x,
                                 bool need_style, const ReduceStyle& reduce_style, at::Tensor& dbias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace internal
}  // namespace gmem
