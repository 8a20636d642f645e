// Lets `import quickllm_kernels._C_sm90a` load the Hopper-only library (setup.py's ahead-of-time
// build), which runs its TORCH_LIBRARY_IMPL registrations; the module itself is empty.
#ifdef QUICKLLM_PYTHON_MODULE
#include <Python.h>

extern "C" PyObject* PyInit__C_sm90a(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
