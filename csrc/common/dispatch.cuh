// Shared by the kernels of csrc/: the one way a host function picks the element type of a kernel.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace quickllm {

// The 16-bit element types a family's kernels are written for: CUDA's own (__half, __nv_bfloat16,
// for code that calls their intrinsics) or torch's (c10::Half, c10::BFloat16, whose arithmetic
// goes through float).
struct CudaTypes {
  using Half = __half;
  using BFloat16 = __nv_bfloat16;
};
struct TorchTypes {
  using Half = c10::Half;
  using BFloat16 = c10::BFloat16;
};

// f(T{}) with T the element type of `st` (float32, float16 or bfloat16); any other dtype is an error
// naming the op. Use: dispatch_float<TorchTypes>(st, "apply_rope", [&](auto t) { using T = decltype(t); ... });
template <typename Types, typename F>
void dispatch_float(c10::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case c10::ScalarType::Float: f(float{}); return;
    case c10::ScalarType::Half: f(typename Types::Half{}); return;
    case c10::ScalarType::BFloat16: f(typename Types::BFloat16{}); return;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st, " (the kernel takes float32, float16 or bfloat16)");
  }
}

}  // namespace quickllm
