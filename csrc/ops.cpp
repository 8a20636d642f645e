// The quickllm operator library: every schema, defined once from quickllm_kernels/ops/schemas.def.
// Kernels register themselves in their own files with TORCH_LIBRARY_IMPL(quickllm, CUDA, m).
#include <torch/library.h>

TORCH_LIBRARY(quickllm, m) {
  // Public op, plus `_cuda_<name>`: the same signature bound to the CUDA kernel alone, which the
  // Python package calls when the "cuda" backend is chosen.
#define QUICKLLM_OP(name, signature) \
  m.def(#name signature);            \
  m.def("_cuda_" #name signature);
#define QUICKLLM_COMPOSITE(name, signature) m.def(#name signature);
#include "quickllm_kernels/ops/schemas.def"
#undef QUICKLLM_OP
#undef QUICKLLM_COMPOSITE
}

#ifdef QUICKLLM_PYTHON_MODULE
// Lets `import quickllm_kernels._C` load the library (and so run the registrations above);
// the module itself is empty: everything is reached through torch.ops.quickllm.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
