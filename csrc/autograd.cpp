// The Autograd kernel of gmem::madafm_weight in C++ (AutogradCPU here; AutogradCUDA in
// cuda/ops_cuda.cpp), on the schema gmem/ops/_ops.py defines.
//
// Why in C++: the weight build is a few microseconds of memory traffic, and the Python Autograd
// kernel (dispatcher -> Python, backend choice, a torch.autograd.Function and its Python backward)
// cost more than the arithmetic up to GP-GAN layer sizes. This kernel registers for the device
// keys, so it shadows the Python kernel of the Autograd alias on those devices and is what every
// call reaches, eager or compiled; it runs the C++ path only where Python has told it the call's
// backend is this extension's kernels, and else calls the Python Autograd kernel, which chooses:
//
// * gmem.ops.backends.call_with (what the public functions do with the backend they resolved)
//   sets a per-thread flag, through gmem._C.select_device_kernels, around one synchronous op call
//   when that backend is "cpu" or "cuda" (Backend.kernel_switch): a direct torch.ops.gmem call,
//   a reference/Triton backend, or tracing under torch.compile leave it unset;
// * the C++ path then computes as the Python kernel does with those backends: the forward below
//   autograd (the device kernel), first-order gradients from the fused backward op, and, when
//   autograd records the backward (create_graph, e.g. the R1 penalty), differentiable ATen window
//   sums, so double backward works;
// * CPU float16/bfloat16 (computed in float32 by the Python layer) also take the Python kernel.
#include "autograd.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

namespace gmem {
namespace {

thread_local bool device_kernels_selected = false;
PyObject* python_autograd = nullptr;  // gmem.ops._ops.python_autograd (a new reference, never released)

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_madafm_weight(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gmem::madafm_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(weight_norm, gamma, beta);
}

class MadafmWeightFunction : public torch::autograd::Function<MadafmWeightFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight_norm, const at::Tensor& gamma,
                            const at::Tensor& beta) {
    ctx->save_for_backward({weight_norm});
    return call_madafm_weight(weight_norm, gamma, beta);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor weight_norm = ctx->get_saved_variables()[0];
    const at::Tensor& grad = grads[0];
    if (at::GradMode::is_enabled()) {  // double backward: the reference's differentiable window sums
      return {at::Tensor(), (grad * weight_norm).sum({-2, -1}), grad.sum({-2, -1})};
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gmem::madafm_weight_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dgamma, dbeta] = op.call(grad.contiguous(), weight_norm);
    return {at::Tensor(), dgamma, dbeta};
  }
};

// The Python Autograd kernel of the op (gmem.ops._ops.python_autograd(name, *args)).
at::Tensor python_madafm_weight(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  TORCH_CHECK(python_autograd != nullptr,
              "gmem::madafm_weight: the extension is loaded but gmem.ops has not given it its Python "
              "autograd (import gmem.ops first)");
  PyGILState_STATE gil = PyGILState_Ensure();
  PyObject* result = PyObject_CallFunction(python_autograd, "sNNN", "madafm_weight", THPVariable_Wrap(weight_norm),
                                           THPVariable_Wrap(gamma), THPVariable_Wrap(beta));
  if (result == nullptr) {
    python_error error;
    error.persist();
    PyGILState_Release(gil);
    throw error;
  }
  at::Tensor out = THPVariable_Unpack(result);
  Py_DECREF(result);
  PyGILState_Release(gil);
  return out;
}

}  // namespace

bool select_device_kernels(bool selected) {
  const bool previous = device_kernels_selected;
  device_kernels_selected = selected;
  return previous;
}

void set_python_autograd(PyObject* callable) {
  Py_XINCREF(callable);
  Py_XDECREF(python_autograd);
  python_autograd = callable;
}

at::Tensor madafm_weight_autograd(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  // (CPU float16/bfloat16 go to the Python kernel, which computes them in float32)
  const bool own_dtype = !weight_norm.is_cpu() || weight_norm.scalar_type() == at::kFloat ||
                         weight_norm.scalar_type() == at::kDouble;
  if (!device_kernels_selected || !own_dtype) return python_madafm_weight(weight_norm, gamma, beta);
  if (at::GradMode::is_enabled() && (gamma.requires_grad() || beta.requires_grad())) {
    return MadafmWeightFunction::apply(weight_norm, gamma, beta);
  }
  return call_madafm_weight(weight_norm, gamma, beta);
}

}  // namespace gmem

TORCH_LIBRARY_IMPL(gmem, AutogradCPU, m) { m.impl("madafm_weight", gmem::madafm_weight_autograd); }
