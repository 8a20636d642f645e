// Shared by the kernels of csrc/: vector access helpers.
#pragma once

namespace quickllm {

// N elements of T moved as one vector access (16 bytes for 8 bf16, 4 float, 16 fp8): the host
// checks alignment before a kernel uses it.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N elements at p; ALIGNED: one vector access (the host checked alignment), else N scalar ones.
template <bool ALIGNED, int N, typename T>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  if constexpr (ALIGNED) {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  } else {
    Pack<T, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
    return r;
  }
}

template <bool ALIGNED, int N, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& x) {
  if constexpr (ALIGNED) {
    *reinterpret_cast<Pack<T, N>*>(p) = x;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = x.v[i];
  }
}

}  // namespace quickllm
