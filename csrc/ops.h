// The gmem ops written once for every device on top of a few device element kernels.
//
// One file per op holds its body and registers it for both devices (madafm.cpp, conv.cpp,
// conv_lowrank.cpp, linear.cpp); the element kernels (mAdaFM weight build and its backward
// reduction, the mFiLM epilogues, the low-rank weight build) come in a DeviceKernels table,
// cpu_kernels() or cuda_kernels() (cpu/device_cpu.cpp, cuda/device_cuda.cpp): k.madafm_forward is
// madafm_forward_cpu in csrc/cpu/madafm_cpu.cpp or madafm_forward_cuda in csrc/cuda/madafm_cuda.cpp,
// k.film_* are in cpu/linear_cpu.cpp and cuda/linear_cuda.cpp, k.lowrank_forward in
// cpu/conv_lowrank_cpu.cpp and cuda/conv_lowrank_cuda.cpp.
// Convolutions and GEMMs go through ATen (oneDNN / cuDNN / BLAS), so the grouping logic is shared
// by both devices.
//
// Argument conventions are those of gmem/ops/reference.py (canonical, already validated by the
// Python layer; the checks here guard direct calls of torch.ops.gmem.*):
//   conv:   x [N, I, H, W], weight_norm [O, I, kh, kw], gamma/beta [O, I] or [T, O, I],
//           bias None | [O] (one task) | [T, O] (mixed), task_ids None | int64 [N]
//   linear: x [M, I], weight_norm [O, I], gamma/beta [O] or [T, O], bias likewise.
// Backward ops return an empty tensor (numel 0) for every gradient that output_mask does not ask for.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace gmem {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Element kernels of one device; every tensor argument is contiguous and of one dtype.
struct DeviceKernels {
  // weight [P, R, K] = gamma [P, R] * weight_norm [R, K] + beta [P, R]
  void (*madafm_forward)(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta,
                         at::Tensor& weight);
  // dgamma, dbeta [P, R] = window sums of grad_weight [P, R, K] * weight_norm [R, K] and of grad_weight
  void (*madafm_backward)(const at::Tensor& grad_weight, const at::Tensor& weight_norm, at::Tensor& dgamma,
                          at::Tensor& dbeta);
  // in place: h [M, O] <- gamma[t] * h + beta[t] * rowsum[:, None] + bias[t]; bias/task_ids may be undefined.
  // The film kernels trust task_ids to lie in [0, T): the CPU glue checks them on the host, and on
  // CUDA gmem.ops checks them before any op is called (a check here would add a device sync).
  void (*film_forward)(at::Tensor& h, const at::Tensor& rowsum, const at::Tensor& gamma, const at::Tensor& beta,
                       const at::Tensor& bias, const at::Tensor& task_ids);
  // gdy [M, O] = grad * gamma[t], rowdot [M] = sum_o grad * beta[t]
  void (*film_backward_input)(const at::Tensor& grad, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& task_ids, at::Tensor& gdy, at::Tensor& rowdot);
  // per-task sums [T, O] over the rows of each task (undefined outputs are skipped), written into
  // outputs the caller has zeroed (the CPU kernel adds to them, the CUDA one overwrites them):
  // dgamma = sum grad * h, dbeta = sum grad * rowsum, dbias = sum grad
  void (*film_backward_style)(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& rowsum,
                              const at::Tensor& task_ids, at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& dbias);
  // one task, styles from low-rank factors: weight [O*I, K] = Gamma * weight_norm [O*I, K] + B with
  // Gamma = gu [O, rg] diag(gs [rg]) gvt [rg, I] and B = bu [O, rb] diag(bs [rb]) bvt [rb, I] (v transposed)
  void (*lowrank_forward)(const at::Tensor& weight_norm, const at::Tensor& gu, const at::Tensor& gs,
                          const at::Tensor& gvt, const at::Tensor& bu, const at::Tensor& bs, const at::Tensor& bvt,
                          at::Tensor& weight);
};

at::Tensor madafm_weight(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                         const at::Tensor& beta);

std::tuple<at::Tensor, at::Tensor> madafm_weight_backward(const DeviceKernels& k, const at::Tensor& grad_weight,
                                                          const at::Tensor& weight_norm);

at::Tensor modulated_conv2d(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                            const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& task_ids, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation);

Grads modulated_conv2d_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                std::array<bool, 4> output_mask);

at::Tensor modulated_linear(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                            const at::Tensor& gamma, const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& task_ids);

// The output and the shared product x_wn = x @ weight_norm^T [M, O] (kept for the backward).
std::tuple<at::Tensor, at::Tensor> modulated_linear_forward(const DeviceKernels& k, const at::Tensor& x,
                                                            const at::Tensor& weight_norm, const at::Tensor& gamma,
                                                            const at::Tensor& beta,
                                                            const std::optional<at::Tensor>& bias,
                                                            const std::optional<at::Tensor>& task_ids);

// x_wn: the forward's x @ weight_norm^T, used for dgamma instead of a second GEMM (else recomputed).
Grads modulated_linear_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                std::array<bool, 4> output_mask, const std::optional<at::Tensor>& x_wn = std::nullopt);

// Convolution with low-rank styles: gamma = gu diag(gs) gv^T, beta = bu diag(bs) bv^T, factors
// u [O, r], s [r], v [I, r] (one task) or [T, O, r], [T, r], [T, I, r] (stacked, with task_ids);
// gamma's and beta's ranks may differ. Only the tasks present in the batch are rebuilt (conv_lowrank.cpp).
at::Tensor modulated_conv2d_lowrank(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight_norm,
                                    const at::Tensor& gamma_u, const at::Tensor& gamma_s, const at::Tensor& gamma_v,
                                    const at::Tensor& beta_u, const at::Tensor& beta_s, const at::Tensor& beta_v,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& task_ids,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// (dx, du, ds, dv of gamma, du, ds, dv of beta, dbias); output_mask = (x, gamma, beta, bias)
using LowRankGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor>;

LowRankGrads modulated_conv2d_lowrank_backward(
    const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_norm,
    const at::Tensor& gamma_u, const at::Tensor& gamma_s, const at::Tensor& gamma_v, const at::Tensor& beta_u,
    const at::Tensor& beta_s, const at::Tensor& beta_v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 4> output_mask);

// The element kernels of each device: cpu/device_cpu.cpp; cuda/device_cuda.cpp (CUDA builds only).
const DeviceKernels& cpu_kernels();
const DeviceKernels& cuda_kernels();

// Helpers shared by the op files (checks.cpp; madafm.cpp: the weight build and its reduction;
// conv.cpp: grouping by task and the ATen convolutions). Not part of the extension's interface.
namespace internal {

// Number of stacked style sets (1 for one task) and whether gamma/beta are stacked. (A struct, not
// structured bindings: lambdas may capture its copies under C++17, which torch 2.11 builds use.)
struct StyleInfo {
  int64_t num_tasks;
  bool stacked;
};

// gamma/beta [*style] (one task) or [T, *style].
StyleInfo check_styles(const char* op, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& like,
                       at::IntArrayRef style);

// weight [P, O, I, kh, kw] <- gamma/beta [P, O, I] (or [O, I, kh, kw] <- [O, I]); weight contiguous.
void build_weight_into(const DeviceKernels& k, const at::Tensor& weight_norm, const at::Tensor& gamma,
                       const at::Tensor& beta, at::Tensor& weight);

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
