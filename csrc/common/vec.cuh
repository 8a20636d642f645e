// Shared by the kernels of csrc/: vector access helpers.
#pragma once

namespace quickllm {

// N elements of T moved as one vector access (16 bytes for 8 bf16, 4 float, 16 fp8): the host
// checks alignment before a kernel uses it.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace quickllm
