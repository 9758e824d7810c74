// The Python module of the extension (gmem._C; a JIT build names it after its hash, through
// TORCH_EXTENSION_NAME). Importing it loads this library, whose static initialisers register the
// C++ kernels on the gmem:: ops: each op file (madafm.cpp, conv.cpp, conv_lowrank.cpp, linear.cpp)
// registers its op for the CPU and (CUDA builds) CUDA keys, madafm.cpp also the C++ Autograd
// kernel. The op schemas, their fakes and Autocast kernels are defined once in Python
// (gmem/ops/_ops.py), so that the ops exist, with the reference kernels, where no extension is
// built. The module holds the two setters of autograd.h and the one-step entry of
// gmem.ops.madafm_weight.
#include <Python.h>

#include "autograd.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define GMEM_CONCAT_(a, b) a##b
#define GMEM_CONCAT(a, b) GMEM_CONCAT_(a, b)
#define GMEM_STRING_(a) #a
#define GMEM_STRING(a) GMEM_STRING_(a)

namespace {

// select_device_kernels(selected: bool) -> bool (the previous value); METH_O: one call costs ~50 ns
PyObject* select_device_kernels(PyObject*, PyObject* selected) {
  const int on = PyObject_IsTrue(selected);
  if (on < 0) return nullptr;
  return PyBool_FromLong(gmem::select_device_kernels(on != 0));
}

PyObject* set_python_autograd(PyObject*, PyObject* callable) {
  if (!PyCallable_Check(callable)) {
    PyErr_SetString(PyExc_TypeError, "set_python_autograd: expected a callable");
    return nullptr;
  }
  gmem::set_python_autograd(callable);
  Py_RETURN_NONE;
}

PyObject* madafm_weight(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return gmem::madafm_weight_entry(args, nargs);
}

PyMethodDef methods[] = {
    {"madafm_weight", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(madafm_weight)), METH_FASTCALL,
     "madafm_weight(weight_norm, gamma, beta) -> Tensor | None: gmem.ops.madafm_weight's common call in one "
     "step with this extension's kernels (None: not that call, gmem.ops takes it)"},
    {"select_device_kernels", select_device_kernels, METH_O,
     "select_device_kernels(selected) -> previous: whether this thread's current op call runs the "
     "extension's kernels (set by gmem.ops.backends.call_with)"},
    {"set_python_autograd", set_python_autograd, METH_O,
     "set_python_autograd(fn): the Python Autograd kernel the C++ ones call for other backends"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC GMEM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, GMEM_STRING(TORCH_EXTENSION_NAME),
                                          "gmem compiled kernels (torch.ops.gmem)", -1, methods};
  return PyModule_Create(&module_def);
}
