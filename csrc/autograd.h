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

// gmem._C.madafm_weight(weight_norm, gamma, beta) -> Tensor | None: gmem.ops.madafm_weight's call in
// one step for a backend whose kernels are this extension's: the common valid call (plain tensors,
// a conv weight, gamma/beta [O, I] or [T, O, I], one dtype and device, autocast off) runs the op with
// this thread's flag set; any other call returns None and the Python function takes it (and raises
// the errors). A METH_FASTCALL function of the module.
PyObject* madafm_weight_entry(PyObject* const* args, Py_ssize_t nargs);

// Autograd kernel of gmem::madafm_weight (registered for AutogradCPU and, in CUDA builds, AutogradCUDA).
at::Tensor madafm_weight_autograd(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta);

}  // namespace gmem
