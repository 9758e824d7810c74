// The gmem_ext operator schema (one TORCH_LIBRARY for every device) and the Python module entry.
//
// The Python layer (gmem/ops/library.py) owns the public gmem:: ops, their autograd and dispatch by
// backend name; the "cpu" and "cuda" backends (gmem/ops/_cpp_backend.py) call these gmem_ext ops.
// Device implementations: cpu/ops_cpu.cpp, cuda/ops_cuda.cpp. Fake (meta) implementations for
// torch.compile are registered in Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gmem_ext, m) {
  // gamma * weight_norm + beta: weight_norm [O, I, kh, kw], gamma/beta [O, I] | [T, O, I]
  m.def("madafm_weight(Tensor weight_norm, Tensor gamma, Tensor beta) -> Tensor");
  // (dgamma, dbeta) = window sums of grad_weight * weight_norm and of grad_weight
  m.def("madafm_weight_backward(Tensor grad_weight, Tensor weight_norm) -> (Tensor, Tensor)");
  m.def(
      "modulated_conv2d(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, "
      "Tensor? task_ids, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // gradients not asked for by output_mask (x, gamma, beta, bias) come back as empty tensors
  m.def(
      "modulated_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, "
      "Tensor? bias, Tensor? task_ids, int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "modulated_linear(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, "
      "Tensor? task_ids) -> Tensor");
  // (output, x_wn): also the shared product x_wn = x @ weight_norm^T [M, O] that the backward would
  // otherwise recompute (one GEMM); the eager autograd path keeps it
  m.def(
      "modulated_linear_forward(Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, Tensor? bias, "
      "Tensor? task_ids) -> (Tensor, Tensor)");
  m.def(
      "modulated_linear_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma, Tensor beta, "
      "Tensor? bias, Tensor? task_ids, bool[4] output_mask, Tensor? x_wn=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // low-rank styles gamma = gamma_u diag(gamma_s) gamma_v^T (beta likewise): u [O, r], s [r], v [I, r]
  // for one task, [T, O, r], [T, r], [T, I, r] with task_ids for stacked tasks
  m.def(
      "modulated_conv2d_lowrank(Tensor x, Tensor weight_norm, Tensor gamma_u, Tensor gamma_s, Tensor gamma_v, "
      "Tensor beta_u, Tensor beta_s, Tensor beta_v, Tensor? bias, Tensor? task_ids, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  // (dx, du, ds, dv of gamma, du, ds, dv of beta, dbias); output_mask over (x, gamma, beta, bias)
  m.def(
      "modulated_conv2d_lowrank_backward(Tensor grad_out, Tensor x, Tensor weight_norm, Tensor gamma_u, "
      "Tensor gamma_s, Tensor gamma_v, Tensor beta_u, Tensor beta_s, Tensor beta_v, Tensor? bias, Tensor? task_ids, "
      "int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import gmem._C` loads this library, which registers the ops above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gmem compiled ops (torch.ops.gmem_ext)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
