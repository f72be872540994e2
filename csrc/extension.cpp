// Module entry point of the compiled extension `lsr_kernels._C`. The ops register themselves with
// the dispatcher (TORCH_LIBRARY_FRAGMENT in info_nce.cpp, exp_gram.cpp, itc.cpp) when the shared
// library loads; importing the module is only the way Python loads it (extension-cpp's pattern).
// The JIT build (lsr_kernels.backends.cuda.load_jit) loads the same library with
// torch.ops.load_library and never calls this function.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lsr_kernels CUDA ops (torch.ops.lsr_kernels)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}
