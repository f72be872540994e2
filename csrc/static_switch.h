// Compile-time switches over runtime values (flash-attention's static_switch.h pattern): one kernel
// template, instantiated per value, instead of copy-pasted kernels that differ in one flag.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "lsr_common.h"

// BOOL_SWITCH(cond, NAME, [&] { ... NAME ... }) runs the lambda with `constexpr bool NAME = cond`.
#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// DTYPE_SWITCH(dtype, T, [&] { ... T ... }) runs the lambda with T the element type of `dtype`.
// The lambda returns cudaError_t; an unknown dtype is cudaErrorInvalidValue.
#define DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)              \
  [&]() -> cudaError_t {                                 \
    switch (DTYPE) {                                     \
      case ::lsr::DType::kFloat32: {                     \
        using TYPE_NAME = float;                         \
        return __VA_ARGS__();                            \
      }                                                  \
      case ::lsr::DType::kFloat64: {                     \
        using TYPE_NAME = double;                        \
        return __VA_ARGS__();                            \
      }                                                  \
      case ::lsr::DType::kFloat16: {                     \
        using TYPE_NAME = __half;                        \
        return __VA_ARGS__();                            \
      }                                                  \
      case ::lsr::DType::kBFloat16: {                    \
        using TYPE_NAME = __nv_bfloat16;                 \
        return __VA_ARGS__();                            \
      }                                                  \
    }                                                    \
    return cudaErrorInvalidValue;                        \
  }()
