// The `gmem._C` Python module entry. Importing it loads this library, whose static initialisers
// register the C++ kernels on the gmem:: ops (cpu/ops_cpu.cpp: TORCH_LIBRARY_IMPL(gmem, CPU);
// cuda/ops_cuda.cpp: TORCH_LIBRARY_IMPL(gmem, CUDA)). The op schemas, their autograd, fakes and
// Autocast kernels are defined once in Python (gmem/ops/_ops.py), so that the ops exist, with the
// reference kernels, where no extension is built; the module itself holds nothing.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gmem compiled kernels (torch.ops.gmem)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
