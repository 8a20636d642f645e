// The quickllm operator library's CUDA side, from the schemas in quickllm_kernels/schemas.def.
// Kernels register themselves in their own files with TORCH_LIBRARY_IMPL(quickllm, CUDA, m).
//
// Inside the Python package (the ahead-of-time `_C` module or the just-in-time library) the package
// defines every public schema itself; this file adds `_cuda_<name>`, the same signature bound to the
// CUDA kernel alone, which the package calls when the "cuda" backend is chosen. Because only a
// fragment is added, the library can be loaded at any time, also after the package has registered
// its ops. The standalone library (CMake, QUICKLLM_STANDALONE) serves C++ and serving engines
// without the package: there it defines the public schemas too.
#include <torch/library.h>

#ifdef QUICKLLM_STANDALONE
TORCH_LIBRARY(quickllm, m) {
#define QUICKLLM_OP(name, signature) \
  m.def(#name signature);            \
  m.def("_cuda_" #name signature);
#define QUICKLLM_COMPOSITE(name, signature) m.def(#name signature);
#else
TORCH_LIBRARY_FRAGMENT(quickllm, m) {
#define QUICKLLM_OP(name, signature) m.def("_cuda_" #name signature);
#define QUICKLLM_COMPOSITE(name, signature)
#endif
#include "quickllm_kernels/schemas.def"
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
