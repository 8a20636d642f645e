// Chosen-token log-probabilities and entropy: one block per row, one online pass over the vocabulary.
//
// logits [..., V] with token_ids int64 [...]; the host code views logits as [B, S, V] (any B and S
// strides, unit last stride; a copy only when the leading dims cannot be viewed that way).
// Forward keeps per thread the running max m, sum exp(z - m) and sum exp(z - m) * z (z = logits / T),
// merges them across the block, and writes float32 logprob = z[id] - lse, entropy = lse - sum p z, lse.
// Backward re-reads the row and writes grad = (g_lp (onehot - p) - g_ent p (z - lse + H)) / T.
// Rows with id == ignore_index give 0 and no gradient; an id outside [0, V) is never read and gives
// NaN. Offsets are 64-bit: rows x V may pass 2**31.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/vec.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace quickllm {
namespace {

constexpr int kThreads = 512;

struct Stats {
  float m;  // running max of z
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * z
};

__device__ __forceinline__ void stats_add(Stats& a, float z) {
  if (z == -INFINITY) return;  // masked vocabulary entries contribute nothing
  if (z > a.m) {
    const float scale = a.m == -INFINITY ? 0.f : expf(a.m - z);
    a.s = a.s * scale + 1.f;
    a.t = a.t * scale + z;
    a.m = z;
  } else {
    const float e = expf(z - a.m);
    a.s += e;
    a.t += e * z;
  }
}

__device__ __forceinline__ Stats stats_merge(const Stats& a, const Stats& b) {
  // "saw nothing" is s == 0 (not m == -inf: a thread that saw only NaN has m == -inf and s == NaN,
  // and that NaN must reach the result)
  if (b.s == 0.f) return a;
  if (a.s == 0.f) return b;
  const float m = fmaxf(a.m, b.m);
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  return {m, a.s * ea + b.s * eb, a.t * ea + b.t * eb};
}

__device__ Stats block_reduce(Stats st) {
  __shared__ Stats warp_stats[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    Stats o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
            __shfl_xor_sync(0xffffffffu, st.t, off)};
    st = stats_merge(st, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? warp_stats[lane] : Stats{-INFINITY, 0.f, 0.f};
    for (int off = 16; off > 0; off >>= 1) {
      Stats o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
              __shfl_xor_sync(0xffffffffu, st.t, off)};
      st = stats_merge(st, o);
    }
  }
  return st;  // valid in thread 0
}

struct RowView {
  int64_t S, sb, ss, V;
};

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_base(const scalar_t* logits, const RowView& r, int64_t row) {
  const int64_t b = row / r.S;
  return logits + b * r.sb + (row - b * r.S) * r.ss;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ids, float* __restrict__ lp_out,
               float* __restrict__ ent_out, float* __restrict__ lse_out, const RowView r, const float inv_t,
               const int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const scalar_t* base = row_base(logits, r, row);
  Stats st{-INFINITY, 0.f, 0.f};
  const int64_t v_vec = VEC > 1 ? r.V / VEC * VEC : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < v_vec; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto x = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + i);
#pragma unroll
    for (int e = 0; e < VEC; ++e) stats_add(st, static_cast<float>(x.v[e]) * inv_t);
  }
  for (int64_t i = v_vec + threadIdx.x; i < r.V; i += blockDim.x) stats_add(st, static_cast<float>(base[i]) * inv_t);
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const float lse = st.m + logf(st.s);
    const float ent = lse - (st.s > 0.f ? st.t / st.s : 0.f);  // an all -inf row: -inf, as the reference
    const int64_t tok = ids[row];
    const bool keep = tok != ignore_index;
    const bool in_range = tok >= 0 && tok < r.V;
    float lp = 0.f;
    if (keep) lp = in_range ? static_cast<float>(base[tok]) * inv_t - lse : NAN;
    lp_out[row] = lp;
    ent_out[row] = keep ? ent : 0.f;
    lse_out[row] = lse;
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const float* __restrict__ g_lp, const float* __restrict__ g_ent, const scalar_t* __restrict__ logits,
               const int64_t* __restrict__ ids, const float* __restrict__ lse_in, const float* __restrict__ ent_in,
               scalar_t* __restrict__ grad, const RowView r, const float inv_t, const int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const scalar_t* base = row_base(logits, r, row);
  scalar_t* out = grad + row * r.V;
  const int64_t tok = ids[row];
  const bool keep = tok != ignore_index;
  if (!keep) {  // ignored rows: zero gradient, and their logits are not even read
    for (int64_t i = threadIdx.x; i < r.V; i += blockDim.x) out[i] = static_cast<scalar_t>(0.f);
    return;
  }
  const float glp = g_lp[row];
  const float gent = g_ent[row];
  const float lse = lse_in[row], ent = ent_in[row];
  auto grad_of = [&](float x, int64_t i) {
    const float z = x * inv_t;
    const float p = expf(z - lse);
    const float dent = p > 0.f ? p * (z - lse + ent) : 0.f;
    return (glp * ((i == tok ? 1.f : 0.f) - p) - gent * dent) * inv_t;
  };
  const int64_t v_vec = VEC > 1 ? r.V / VEC * VEC : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < v_vec; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto x = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + i);
    Pack<scalar_t, VEC> y;
#pragma unroll
    for (int e = 0; e < VEC; ++e) y.v[e] = static_cast<scalar_t>(grad_of(static_cast<float>(x.v[e]), i + e));
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + i) = y;
  }
  for (int64_t i = v_vec + threadIdx.x; i < r.V; i += blockDim.x)
    out[i] = static_cast<scalar_t>(grad_of(static_cast<float>(base[i]), i));
}

// [..., V] -> [B, S, V] with a unit last stride (a view where possible).
at::Tensor as_3d(at::Tensor x) {
  if (x.size(-1) > 1 && x.stride(-1) != 1) x = x.contiguous();
  if (x.dim() == 2) return x.unsqueeze(0);
  if (x.dim() > 3) return x.flatten(0, -3);
  return x;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& ids, const char* op) {
  TORCH_CHECK(logits.dim() >= 2, op, ": logits must be [..., V] with at least one leading dim, got ", logits.sizes());
  TORCH_CHECK(logits.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got logits on ", logits.device());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(logits.size(-1) > 0, op, ": logits has an empty vocabulary");
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": token_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": token_ids must have logits' leading shape ", logits.sizes().slice(0, logits.dim() - 1), ", got ",
              ids.sizes());
  TORCH_CHECK(ids.device() == logits.device(), op, ": token_ids must be on logits' device");
  TORCH_CHECK(ids.numel() <= std::numeric_limits<int>::max(), op, ": too many rows for one launch");
}

RowView rows_of(const at::Tensor& l3) {
  auto stride = [&](int d) { return l3.size(d) == 1 ? int64_t{0} : l3.stride(d); };
  return RowView{std::max<int64_t>(l3.size(1), 1), stride(0), stride(1), l3.size(2)};
}

template <typename scalar_t>
bool vec_ok(const RowView& r, const void* p, const void* out = nullptr) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  auto al = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return r.sb % VEC == 0 && r.ss % VEC == 0 && al(p) && (out == nullptr || (al(out) && r.V % VEC == 0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                                   const at::Tensor& ids_in, double temperature,
                                                                   int64_t ignore_index) {
  check_inputs(logits_in, ids_in, "token_logprobs");
  const at::Tensor logits = as_3d(logits_in);
  const at::Tensor ids = ids_in.reshape({-1}).contiguous();
  const RowView r = rows_of(logits);
  TORCH_CHECK(temperature > 0, "token_logprobs: temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto opts = logits.options().dtype(at::kFloat);
  const int64_t n = ids.numel();
  const auto lead = logits_in.sizes().slice(0, logits_in.dim() - 1);
  auto lp = at::empty(lead, opts), ent = at::empty(lead, opts), lse = at::empty(lead, opts);
  if (n == 0) return {lp, ent, lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch_float<TorchTypes>(logits.scalar_type(), "token_logprobs", [&](auto t) {
    using scalar_t = decltype(t);
    const auto* x = logits.data_ptr<scalar_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (vec_ok<scalar_t>(r, x))
      fwd_kernel<scalar_t, VEC><<<n, kThreads, 0, stream>>>(x, ids.data_ptr<int64_t>(), lp.data_ptr<float>(),
                                                            ent.data_ptr<float>(), lse.data_ptr<float>(), r, inv_t,
                                                            ignore_index);
    else
      fwd_kernel<scalar_t, 1><<<n, kThreads, 0, stream>>>(x, ids.data_ptr<int64_t>(), lp.data_ptr<float>(),
                                                          ent.data_ptr<float>(), lse.data_ptr<float>(), r, inv_t,
                                                          ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lp, ent, lse};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& g_lp_in, const at::Tensor& g_ent_in,
                                        const at::Tensor& logits_in, const at::Tensor& ids_in,
                                        const at::Tensor& lse_in, const at::Tensor& ent_in, double temperature,
                                        int64_t ignore_index) {
  check_inputs(logits_in, ids_in, "token_logprobs_backward");
  const at::Tensor logits = as_3d(logits_in);
  const RowView r = rows_of(logits);
  const at::Tensor ids = ids_in.reshape({-1}).contiguous();
  const int64_t n = ids.numel();
  auto flat = [&](const at::Tensor& t) {
    TORCH_CHECK(t.numel() == n && t.device() == logits.device() && t.is_floating_point(),
                "token_logprobs_backward: gradients and saved statistics must have token_ids' shape on logits' device");
    return t.reshape({-1}).to(at::kFloat).contiguous();
  };
  const at::Tensor g_lp = flat(g_lp_in), g_ent = flat(g_ent_in), lse = flat(lse_in), ent = flat(ent_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty(logits_in.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return grad;
  auto stream = at::cuda::getCurrentCUDAStream();
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch_float<TorchTypes>(logits.scalar_type(), "token_logprobs_backward", [&](auto t) {
    using scalar_t = decltype(t);
    const auto* x = logits.data_ptr<scalar_t>();
    auto* out = grad.data_ptr<scalar_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    auto args = [&](auto kernel) {
      kernel<<<n, kThreads, 0, stream>>>(g_lp.data_ptr<float>(), g_ent.data_ptr<float>(), x,
                                         ids.data_ptr<int64_t>(), lse.data_ptr<float>(), ent.data_ptr<float>(), out,
                                         r, inv_t, ignore_index);
    };
    if (vec_ok<scalar_t>(r, x, out)) args(bwd_kernel<scalar_t, VEC>);
    else args(bwd_kernel<scalar_t, 1>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_token_logprobs", &token_logprobs_cuda);
  m.impl("_cuda_token_logprobs_backward", &token_logprobs_backward_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
#endif
}

}  // namespace quickllm
