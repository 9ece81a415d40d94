/* A stand-in for the NVIDIA driver library (libcuda.so.1) on a build machine that has no driver.
 *
 * TVM's CUDA runtime (libtvm_runtime_cuda.so) links the driver library; hwcompress loads that
 * runtime at build time only so that TVM's compiler puts nvcc's compiled kernels into the library
 * (the module factory lives in it). Nothing here ever launches a kernel: every entry point reports
 * that there is no device, as the CUDA toolkit's own link stubs do. On a machine with a driver the
 * real library is used and this file is never built. */
#define CUDA_ERROR_NO_DEVICE 100

int cuDeviceGetName(void) { return CUDA_ERROR_NO_DEVICE; }
int cuFuncSetAttribute(void) { return CUDA_ERROR_NO_DEVICE; }
int cuLaunchKernelEx(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleGetFunction(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleLoadData(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleUnload(void) { return CUDA_ERROR_NO_DEVICE; }
int cuTensorMapEncodeTiled(void) { return CUDA_ERROR_NO_DEVICE; }

int cuGetErrorName(int error, const char **name) {
  (void)error;
  if (name) *name = "CUDA_ERROR_NO_DEVICE";
  return 0;
}

int cuGetErrorString(int error, const char **text) {
  (void)error;
  if (text) *text = "no NVIDIA driver on this machine (hwcompress build-time stand-in)";
  return 0;
}
