// Shared by the host wrappers of csrc/: the argument checks several kernels make before a launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace quickllm {

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A dim of size 1 is only indexed at 0: its stride does not matter (and 0 passes alignment tests).
inline int64_t stride_of(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

inline void check_float(const char* op, const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

}  // namespace quickllm
