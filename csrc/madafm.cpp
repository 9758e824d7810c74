// gmem::madafm_weight and gmem::madafm_weight_backward: the weight build gamma * weight_norm + beta
// and its backward reduction, written once for both devices on the element kernels
// k.madafm_forward / k.madafm_backward (csrc/cpu/madafm_cpu.cpp, csrc/cuda/madafm_cuda.cpp), registered for
// the CPU and CUDA keys; and the op's Autograd kernel in C++.
//
// The Autograd kernel (AutogradCPU, AutogradCUDA) on the schema gmem/ops/_ops.py defines. Why in
// C++: the weight build is a few microseconds of memory traffic, and the Python Autograd
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
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gmem {
namespace internal {

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

}  // namespace internal

using namespace internal;

namespace {

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

std::pair<at::Tensor, at::Tensor> reduce_weight_grad(const DeviceKernels& k, const at::Tensor& grad_weight,
                                                     const at::Tensor& weight_norm) {
  const auto style = grad_weight.sizes().slice(0, grad_weight.dim() - 2);
  at::Tensor dgamma = at::empty(style, grad_weight.options());
  at::Tensor dbeta = at::empty(style, grad_weight.options());
  reduce_weight_grad_into(k, grad_weight, weight_norm, dgamma, dbeta);
  return {dgamma, dbeta};
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

// ---- the Autograd kernel ------------------------------------------------------------------------
namespace {


thread_local bool device_kernels_selected = false;
PyObject* python_autograd = nullptr;  // gmem.ops._ops.python_autograd (a new reference, never released)

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MadafmWeightOp = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>;

const MadafmWeightOp& madafm_weight_op() {
  static const MadafmWeightOp op = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("gmem::madafm_weight", "")
                                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op;
}

// the op below autograd: its device kernel
at::Tensor call_madafm_weight(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return madafm_weight_op().call(weight_norm, gamma, beta);
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

// The extension loaded by an import of its own (``import gmem._C`` before any op call): gmem.ops has
// not handed over its Python Autograd kernel yet, so fetch it. Holds the GIL; false with a Python error set.
bool import_python_autograd() {
  PyObject* module = PyImport_ImportModule("gmem.ops._ops");
  if (module == nullptr) return false;
  PyObject* callable = PyObject_GetAttrString(module, "python_autograd");
  Py_DECREF(module);
  if (callable == nullptr) return false;
  if (python_autograd == nullptr) python_autograd = callable;  // (the import may have set it already)
  else Py_DECREF(callable);
  return true;
}

// The Python Autograd kernel of the op (gmem.ops._ops.python_autograd(name, *args)).
at::Tensor python_madafm_weight(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  PyGILState_STATE gil = PyGILState_Ensure();
  if (python_autograd == nullptr && !import_python_autograd()) {
    python_error error;
    error.persist();
    PyGILState_Release(gil);
    throw error;
  }
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

// ---- the Python entry of the public function --------------------------------------------------
namespace {

// Sets the per-thread flag for one call and puts back what was there, also when the call throws.
class DeviceKernelsSelected {
 public:
  DeviceKernelsSelected() : previous_(select_device_kernels(true)) {}
  ~DeviceKernelsSelected() { select_device_kernels(previous_); }
  DeviceKernelsSelected(const DeviceKernelsSelected&) = delete;
  DeviceKernelsSelected& operator=(const DeviceKernelsSelected&) = delete;

 private:
  bool previous_;
};

// The GIL released for the op call (as torch.ops calls do), taken back also when the call throws.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  ~GilReleased() { PyEval_RestoreThread(state_); }
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;

 private:
  PyThreadState* state_;
};

// A plain tensor argument: a torch.Tensor or nn.Parameter, no other subclass (it may define
// __torch_function__, which the Python call reaches first).
bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

// The call gmem.ops.madafm_weight takes in one step: a conv weight [O, I, kh, kw] with gamma/beta
// [O, I] or [T, O, I], one strided dtype and device, a dtype the kernels compute in, autocast off.
bool common_call(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  if (weight_norm.dim() != 4 || (gamma.dim() != 2 && gamma.dim() != 3) || beta.sizes() != gamma.sizes()) return false;
  if (gamma.sizes().slice(gamma.dim() - 2) != weight_norm.sizes().slice(0, 2)) return false;
  const at::Device device = weight_norm.device();
  if (!(device.is_cpu() || device.is_cuda()) || gamma.device() != device || beta.device() != device) return false;
  const at::ScalarType dtype = weight_norm.scalar_type();
  if (gamma.scalar_type() != dtype || beta.scalar_type() != dtype || !at::isFloatingType(dtype)) return false;
  if (device.is_cpu() && dtype != at::kFloat && dtype != at::kDouble) return false;  // computed in float32 by Python
  if (weight_norm.layout() != at::kStrided || gamma.layout() != at::kStrided || beta.layout() != at::kStrided) {
    return false;
  }
  return !at::autocast::is_autocast_enabled(device.type());
}

}  // namespace

PyObject* madafm_weight_entry(PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  // (a torch function mode active, e.g. a TorchFunctionMode: the Python call goes through it)
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  if (nargs != 3 || !plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2])) Py_RETURN_NONE;
  const at::Tensor& weight_norm = THPVariable_Unpack(args[0]);
  const at::Tensor& gamma = THPVariable_Unpack(args[1]);
  const at::Tensor& beta = THPVariable_Unpack(args[2]);
  if (!common_call(weight_norm, gamma, beta)) Py_RETURN_NONE;
  at::Tensor out;
  {
    GilReleased no_gil;
    DeviceKernelsSelected selected;
    out = madafm_weight_op().call(weight_norm, gamma, beta);  // from the top: autograd, functorch, ...
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace gmem

TORCH_LIBRARY_IMPL(gmem, CPU, m) {
  m.impl("madafm_weight", [](const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b) {
    return gmem::madafm_weight(gmem::cpu_kernels(), wn, g, b);
  });
  m.impl("madafm_weight_backward", [](const at::Tensor& dw, const at::Tensor& wn) {
    return gmem::madafm_weight_backward(gmem::cpu_kernels(), dw, wn);
  });
}

#ifdef GMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(gmem, CUDA, m) {
  m.impl("madafm_weight", [](const at::Tensor& wn, const at::Tensor& g, const at::Tensor& b) {
    return gmem::madafm_weight(gmem::cuda_kernels(), wn, g, b);
  });
  m.impl("madafm_weight_backward", [](const at::Tensor& dw, const at::Tensor& wn) {
    return gmem::madafm_weight_backward(gmem::cuda_kernels(), dw, wn);
  });
}
#endif

TORCH_LIBRARY_IMPL(gmem, AutogradCPU, m) { m.impl("madafm_weight", gmem::madafm_weight_autograd); }
#ifdef GMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(gmem, AutogradCUDA, m) { m.impl("madafm_weight", gmem::madafm_weight_autograd); }
#endif
