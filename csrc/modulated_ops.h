// The gmem ops written once for every device on top of a few device kernels.
//
// The device files (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) provide the element kernels (mAdaFM
// weight build and its backward reduction, the mFiLM epilogues) through a DeviceKernels table and
// register these functions for their dispatch key. Convolutions and GEMMs go through ATen
// (oneDNN / cuDNN / BLAS), so the grouping logic here is shared by both devices.
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
#include <optional>
#include <tuple>

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
// gamma's and beta's ranks may differ. Only the tasks present in the batch are rebuilt (lowrank_ops.cpp).
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

}  // namespace gmem
