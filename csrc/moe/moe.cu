// MoE routing: router logits [T, E] -> float32 weights and int32 expert ids [T, top_k].
//
// One warp per token. Lane l holds experts l, l + 32, ... (PER of them, E <= 32 * PER) in registers:
// scores (softmax over the row, or sigmoid), choice scores (+ correction bias, NaN as -inf), the
// group-limited mask (each group scored by the sum of its two best choice scores, the topk_group best
// kept), then top_k rounds of a warp argmax (highest choice, then lowest expert id) over the experts
// not taken yet. Semantics: quickllm_kernels/moe/reference.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace quickllm {
namespace {

constexpr int kWarps = 4;          // tokens per block
constexpr int kMaxTopK = 32;
constexpr int kMaxGroups = 64;
constexpr int kMaxExperts = 1024;  // 32 lanes x 32 per lane
constexpr float kSigmoidEps = 1e-20f;

struct RouteParams {
  const void* logits;
  int64_t stride_t;
  const float* bias;  // [E] or nullptr
  float* w_out;
  int32_t* id_out;
  int64_t T;
  int E, top_k, n_group, topk_group;
  bool sigmoid, renormalize;
  float scale;
};

// The better of two candidates: higher value, then lower index (an index of INT_MAX is no candidate).
__device__ __forceinline__ bool better(float v, int i, float v2, int i2) {
  return i2 == INT_MAX || (i != INT_MAX && (v > v2 || (v == v2 && i < i2)));
}

__device__ __forceinline__ void warp_best(float& v, int& i, float& extra) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, off);
    const int i2 = __shfl_xor_sync(0xffffffffu, i, off);
    const float x2 = __shfl_xor_sync(0xffffffffu, extra, off);
    if (better(v2, i2, v, i)) v = v2, i = i2, extra = x2;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The best candidate of the warp among the experts e (slot i of each lane) that ok(i, e) admits, with
// x of that expert carried along.
template <int PER, typename Ok>
__device__ __forceinline__ void warp_best_of(const float (&c)[PER], const float (&x)[PER], int lane, Ok ok, float& v,
                                             int& idx, float& extra) {
  v = -INFINITY, idx = INT_MAX, extra = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = lane + 32 * i;
    if (ok(i, e) && better(c[i], e, v, idx)) v = c[i], idx = e, extra = x[i];
  }
  warp_best(v, idx, extra);
}

template <typename T, int PER>
__global__ void __launch_bounds__(32 * kWarps) route_kernel(const RouteParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= p.T) return;  // whole warps leave together
  const T* row = static_cast<const T*>(p.logits) + t * p.stride_t;
  const float ninf = -INFINITY;

  float s[PER], c[PER];
  bool avail[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = lane + 32 * i;
    s[i] = e < p.E ? static_cast<float>(row[e]) : ninf;
  }
  if (p.sigmoid) {
#pragma unroll
    for (int i = 0; i < PER; ++i) s[i] = lane + 32 * i < p.E ? 1.f / (1.f + expf(-s[i])) : 0.f;
  } else {
    float m = ninf;
#pragma unroll
    for (int i = 0; i < PER; ++i) m = fmaxf(m, s[i]);
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      s[i] = lane + 32 * i < p.E ? expf(s[i] - m) : 0.f;
      sum += s[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < PER; ++i) s[i] /= sum;
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = lane + 32 * i;
    const float x = e < p.E ? s[i] + (p.bias ? p.bias[e] : 0.f) : ninf;
    c[i] = x == x ? x : ninf;  // NaN is never chosen over a number
    avail[i] = e < p.E;
  }

  if (p.n_group > 1) {
    const int gsize = p.E / p.n_group;
    uint64_t keep = 0;
    float gscore[kMaxGroups];
    for (int g = 0; g < p.n_group; ++g) {
      // best and second best choice score of group g
      float v, v2, unused;
      int idx, idx2;
      warp_best_of(c, s, lane, [&](int, int e) { return e < p.E && e / gsize == g; }, v, idx, unused);
      warp_best_of(c, s, lane, [&](int, int e) { return e < p.E && e / gsize == g && e != idx; }, v2, idx2, unused);
      const float sc = gsize > 1 ? v + v2 : v;
      gscore[g] = sc == sc ? sc : ninf;
    }
    for (int r = 0; r < p.topk_group; ++r) {  // every lane picks the same groups
      int best = -1;
      for (int g = 0; g < p.n_group; ++g)
        if (!((keep >> g) & 1) && (best < 0 || gscore[g] > gscore[best])) best = g;
      keep |= uint64_t{1} << best;
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = lane + 32 * i;
      if (e < p.E && !((keep >> (e / gsize)) & 1)) c[i] = ninf;
    }
  }

  float w_sel[kMaxTopK];
  int id_sel[kMaxTopK];
  float total = 0.f;
  for (int r = 0; r < p.top_k; ++r) {
    float v, w;
    int idx;
    warp_best_of(c, s, lane, [&](int i, int) { return avail[i]; }, v, idx, w);
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (lane + 32 * i == idx) avail[i] = false;
    w_sel[r] = w;
    id_sel[r] = idx;
    total += w;
  }
  if (lane == 0) {
    const float div = p.renormalize ? (p.sigmoid ? total + kSigmoidEps : total) : 1.f;
    for (int r = 0; r < p.top_k; ++r) {
      p.w_out[t * p.top_k + r] = w_sel[r] / div * p.scale;
      p.id_out[t * p.top_k + r] = id_sel[r];
    }
  }
}

template <typename T, int PER>
void launch(const RouteParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.T + kWarps - 1) / kWarps);
  route_kernel<T, PER><<<blocks, 32 * kWarps, 0, stream>>>(p);
}

template <typename T>
void launch_per(const RouteParams& p, cudaStream_t stream) {
  const int per = (p.E + 31) / 32;
  if (per <= 1) launch<T, 1>(p, stream);
  else if (per <= 2) launch<T, 2>(p, stream);
  else if (per <= 4) launch<T, 4>(p, stream);
  else if (per <= 8) launch<T, 8>(p, stream);
  else if (per <= 16) launch<T, 16>(p, stream);
  else launch<T, 32>(p, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                  int64_t top_k, bool sigmoid, bool renormalize, int64_t n_group,
                                                  int64_t topk_group, double routed_scaling_factor) {
  TORCH_CHECK(logits.is_cuda(), "moe_route: the CUDA kernel needs CUDA tensors, got router_logits on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "moe_route: router_logits must be [tokens, experts], got ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "moe_route: the CUDA kernel takes 1 to ", kMaxExperts, " experts, got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, kMaxTopK), "moe_route: top_k must lie in [1, min(E, ",
              kMaxTopK, ")], got ", top_k);
  TORCH_CHECK(E <= 1 || logits.stride(1) == 1, "moe_route: router_logits' last dim must have stride 1");
  const bool grouped = n_group > 1;
  TORCH_CHECK(!grouped || (n_group <= kMaxGroups && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group &&
                           top_k <= topk_group * (E / n_group)),
              "moe_route: groups must divide the experts (n_group <= ", kMaxGroups, ", 1 <= topk_group <= n_group, "
              "top_k <= topk_group * E / n_group), got n_group ", n_group, ", topk_group ", topk_group);
  if (bias) {
    TORCH_CHECK(bias->device() == logits.device() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == E && (E == 1 || bias->stride(0) == 1),
                "moe_route: correction_bias must be a contiguous float32 [", E, "] on router_logits' device");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto w = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  if (T == 0) return {w, ids};
  const RouteParams p{logits.data_ptr(), logits.stride(0), bias ? bias->data_ptr<float>() : nullptr,
                      w.data_ptr<float>(), ids.data_ptr<int32_t>(), T, static_cast<int>(E),
                      static_cast<int>(top_k), grouped ? static_cast<int>(n_group) : 1,
                      grouped ? static_cast<int>(topk_group) : 1, sigmoid, renormalize,
                      static_cast<float>(routed_scaling_factor)};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<TorchTypes>(logits.scalar_type(), "moe_route", [&](auto t) { launch_per<decltype(t)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, ids};
}

}  // namespace quickllm

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_moe_route", &quickllm::moe_route_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("moe_route", &quickllm::moe_route_cuda);
#endif
}
