// The C++ Autograd kernel of gmem::madafm_weight (madafm.cpp) and what the Python module
// (module.cpp) sets on it.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

namespace gmem {

// The per-thread flag: true while the backend Python chose for the current op call is this
// extension's kernels ("cpu"/"cuda"), so the C++ Autograd kernels run them without asking Python.
// Returns the previous value (the caller restores it).
bool select_device_kernels(bool selected);

// gmem.ops._ops.python_autograd: ``(op name, *args) -> result``, the Python Autograd kernel that
// the C++ kernels call for every other call (the reference and Triton backends, tracing, ...).
void set_python_autograd(PyObject* callable);

// Autograd kernel of gmem::madafm_weight (registered for AutogradCPU and, in CUDA builds, AutogradCUDA).
at::Tensor madafm_weight_autograd(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta);

}  // namespace gmem
