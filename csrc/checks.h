// Argument checks and small helpers shared by the op wrappers (*.cpp), in the manner of
// flash-attention's flash_api.cpp: every failure names the op, the argument and what it got.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#ifdef LSR_CPU_EMULATION
// The CPU emulation build (tests on machines without a GPU, csrc/cpu_emulation/): the same op
// wrappers over CPU tensors, registered as lsr_kernels_emu::* for the CPU dispatch key.
#define LSR_OPS_NAMESPACE lsr_kernels_emu
#define LSR_DISPATCH_KEY CPU
#define LSR_IS_DEVICE_TENSOR(x) (x).is_cpu()
#define LSR_DEVICE_KIND "CPU (emulation build)"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define LSR_OPS_NAMESPACE lsr_kernels
#define LSR_DISPATCH_KEY CUDA
#define LSR_IS_DEVICE_TENSOR(x) (x).is_cuda()
#define LSR_DEVICE_KIND "CUDA"
#endif
// One level of indirection so that the namespace and key macros expand before TORCH_LIBRARY_*
// pastes them into identifiers.
#define LSR_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LSR_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

#include "lsr_common.h"

#define CHECK_DEVICE(OP, NAME, x)                                                                      \
  TORCH_CHECK(LSR_IS_DEVICE_TENSOR(x), OP, ": ", NAME, " must be a " LSR_DEVICE_KIND " tensor, got device ", \
              (x).device())
#define CHECK_SAME_DEVICE(OP, NAME, x, ref)                                                          \
  TORCH_CHECK((x).device() == (ref).device(), OP, ": ", NAME, " is on ", (x).device(), ", expected ", \
              (ref).device())
#define CHECK_CONTIGUOUS(OP, NAME, x) \
  TORCH_CHECK((x).is_contiguous(), OP, ": ", NAME, " must be contiguous, got strides ", (x).strides(), \
              " for shape ", (x).sizes())
#define CHECK_SHAPE(OP, NAME, x, ...)                                                                         \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), OP, ": ", NAME, " must have shape ", \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(OP, NAME, x, dtype)                                                         \
  TORCH_CHECK_TYPE((x).scalar_type() == (dtype), OP, ": ", NAME, " must have dtype ", dtype, ", got ", \
                   (x).scalar_type())

namespace lsr {

inline DType to_dtype(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;  // unreachable
}

// float for fp32 / fp16 / bf16 features, double for fp64.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A feature matrix: CUDA, [rows, D] with rows >= 1 and 1 <= D, contiguous, a supported dtype,
// small enough for 32-bit row / column indices (with room for a tile past the last row: grid sizes
// are ceil_div in int).
constexpr int64_t kMaxRows = std::numeric_limits<int>::max() - 1024;
inline void check_features(const at::Tensor& x, const char* op, const char* name) {
  CHECK_DEVICE(op, name, x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be a 2-D [rows, D] matrix, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(1) >= 1, op, ": ", name, " must be non-empty, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) <= kMaxRows && x.size(1) <= std::numeric_limits<int>::max(), op, ": ", name,
                    " is too large for 32-bit indices (at most ", kMaxRows, " rows), got shape ", x.sizes());
  to_dtype(x.scalar_type(), op, name);
  CHECK_CONTIGUOUS(op, name, x);
}

// `x` must match `ref` in device and dtype; `rows` < 0 means any number of rows.
inline void check_like(const at::Tensor& x, const at::Tensor& ref, int64_t rows, const char* op, const char* name,
                       const char* ref_name) {
  check_features(x, op, name);
  CHECK_SAME_DEVICE(op, name, x, ref);
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == ref.size(1), op, ": ", name, " has width ", x.size(1), " but ", ref_name,
                    " has width ", ref.size(1), " (shapes ", x.sizes(), " and ", ref.sizes(), ")");
  if (rows >= 0) {
    TORCH_CHECK_VALUE(x.size(0) == rows, op, ": ", name, " must have ", rows, " rows like ", ref_name, ", got shape ",
                      x.sizes(), " vs ", ref.sizes());
  }
}

// A one-element floating tensor on `like`'s device, returned as a contiguous [1] tensor of the
// accumulation type (a device-side cast: no host synchronisation).
inline at::Tensor scalar_arg(const at::Tensor& x, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.numel() == 1, op, ": ", name, " must have exactly one element, got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                   x.scalar_type());
  CHECK_SAME_DEVICE(op, name, x, like);
  return x.reshape({1}).to(acc_type(like.scalar_type())).contiguous();
}

// info_nce's shapes: symmetric needs a square X (b like a, offset 0); one-way, b has M >= N rows and
// the positives sit at columns offset .. offset + N - 1.
inline void check_offset(const at::Tensor& a, const at::Tensor& b, bool symmetric, int64_t offset, const char* op) {
  const int64_t n = a.size(0), m = b.size(0);
  TORCH_CHECK_VALUE(!symmetric || offset == 0, op, ": symmetric needs offset 0, got offset ", offset);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= m - n, op, ": offset must lie in [0, M - N] = [0, ", m - n,
                    "] for a of shape ", a.sizes(), " and b of shape ", b.sizes(), ", got ", offset);
}

// Saved statistics: [n] contiguous vectors of the accumulation type on `like`'s device.
inline void check_stats(const at::Tensor& x, const at::Tensor& like, int64_t n, const char* op, const char* name) {
  CHECK_SAME_DEVICE(op, name, x, like);
  CHECK_DTYPE(op, name, x, acc_type(like.scalar_type()));
  CHECK_SHAPE(op, name, x, n);
  CHECK_CONTIGUOUS(op, name, x);
}

// ------------------------------------------------------------------- device, stream, limits
#ifdef LSR_CPU_EMULATION
struct DeviceScope {
  explicit DeviceScope(const at::Tensor&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int max_smem_optin() { return 166912; }  // sm_80's limit: the strictest supported target
inline int multiprocessor_count() { return 3; }  // few persistent blocks: exercises their tile loop
inline void check_arch(const at::Tensor&, const char*) {}
inline std::string launch_error_string(cudaError_t err) {
  return "error code " + std::to_string(static_cast<int>(err));
}
#else
// The op runs on its inputs' device, on that device's current stream.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& x) : guard(x.device()) {}
  c10::cuda::CUDAGuard guard;
};
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
inline int max_smem_optin() {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return value;
}
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// fp16 / bf16 run on tensor cores with cp.async: sm_80 or newer.
inline void check_arch(const at::Tensor& x, const char* op) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, op, ": float16 / bfloat16 need an sm_80 or newer GPU (Ampere, Hopper), got sm_",
              prop->major, prop->minor, "; use float32");
}
inline std::string launch_error_string(cudaError_t err) { return cudaGetErrorString(err); }
#endif

// 16-byte vector loads are legal: 2-byte elements, rows a multiple of 8 elements, aligned bases.
inline bool can_vectorize(std::initializer_list<at::Tensor> xs, int64_t d) {
  for (const auto& x : xs) {
    if (x.element_size() != 2 || d % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  }
  return true;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", launch_error_string(err),
              err == cudaErrorInvalidConfiguration
                  ? " (the kernel needs more shared memory per block than this GPU offers; sm_80 or newer)"
                  : "");
}

}  // namespace lsr
