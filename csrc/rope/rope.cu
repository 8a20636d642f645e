// Fused rotary position embedding: q and k rotated in one launch, one pass over each.
//
// Layout: q [tokens, Hq, D] or [B, S, Hq, D], k the same with Hk heads; any strides with a unit
// stride on the last dim (q and k are usually views into one fused qkv projection). positions has
// the leading shape of q, contiguous. cos_sin_cache [max_positions, R]: cos in [:R/2], sin in [R/2:].
// The first R dims of each head rotate; dims R..D pass through (copied when out of place).
// A position outside [0, max_positions) writes NaN into that token's rotated dims: the kernel
// never reads outside the cache and never syncs with the host to check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/vec.cuh"

#include <cstdint>
#include <limits>
#include <tuple>

namespace quickllm {
namespace {

struct HeadsView {
  const void* in;
  void* out;
  int64_t in_sb, in_ss, in_sh;  // strides of the batch, sequence and head dims of the input
  int64_t out_sb, out_ss, out_sh;
  int heads;
};

struct RopeParams {
  HeadsView q, k;
  int64_t tokens;
  int64_t seq;  // tokens = batch * seq; for 3-D inputs seq = tokens and batch = 1
  int64_t max_positions;
  int head_dim;
  int rot_dim;
  int copy_tail;  // 1: copy dims rot_dim..head_dim (out of place); 0: leave them (in place)
  float sin_sign;  // +1 rotates by +angle, -1 by -angle (the backward)
};

// One token per threadIdx.y row; threads along x walk (head, chunk) work items of both q and k.
// Each item rotates WIDTH elements of each half (neox) or WIDTH/2 adjacent pairs (gptj).
template <typename scalar_t, typename cache_t, typename pos_t, int WIDTH, bool ALIGNED, bool NEOX>
__global__ void rope_kernel(const RopeParams p, const pos_t* __restrict__ positions,
                            const cache_t* __restrict__ cache) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.tokens) return;
  const int64_t b = t / p.seq;
  const int64_t s = t - b * p.seq;
  const int64_t pos = static_cast<int64_t>(positions[t]);
  const bool valid = pos >= 0 && pos < p.max_positions;
  const int half = p.rot_dim / 2;
  const cache_t* cos_row = cache + (valid ? pos : 0) * p.rot_dim;
  const cache_t* sin_row = cos_row + half;
  const float nan = std::numeric_limits<float>::quiet_NaN();

  constexpr int PASS_WIDTH = ALIGNED ? WIDTH : 1;
  const int rot_items = (NEOX ? half : p.rot_dim) / WIDTH;
  const int pass_items = p.copy_tail ? (p.head_dim - p.rot_dim) / PASS_WIDTH : 0;
  const int per_head = rot_items + pass_items;
  const int total = (p.q.heads + p.k.heads) * per_head;

  // This token's rows of q and k, computed once; the loop only adds head offsets.
  const scalar_t* q_in = static_cast<const scalar_t*>(p.q.in) + b * p.q.in_sb + s * p.q.in_ss;
  const scalar_t* k_in = static_cast<const scalar_t*>(p.k.in) + b * p.k.in_sb + s * p.k.in_ss;
  scalar_t* q_out = static_cast<scalar_t*>(p.q.out) + b * p.q.out_sb + s * p.q.out_ss;
  scalar_t* k_out = static_cast<scalar_t*>(p.k.out) + b * p.k.out_sb + s * p.k.out_ss;

  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    int h = i / per_head;
    const int j = i - h * per_head;
    const bool is_q = h < p.q.heads;
    if (!is_q) h -= p.q.heads;
    const scalar_t* in = is_q ? q_in + h * p.q.in_sh : k_in + h * p.k.in_sh;
    scalar_t* out = is_q ? q_out + h * p.q.out_sh : k_out + h * p.k.out_sh;

    if (j >= rot_items) {
      const int off = p.rot_dim + (j - rot_items) * PASS_WIDTH;
      store<ALIGNED, PASS_WIDTH>(out + off, load<ALIGNED, PASS_WIDTH>(in + off));
      continue;
    }
    if constexpr (NEOX) {
      const int off = j * WIDTH;
      const auto x1 = load<ALIGNED, WIDTH>(in + off);
      const auto x2 = load<ALIGNED, WIDTH>(in + half + off);
      Pack<cache_t, WIDTH> c{}, sn{};
      if (valid) {  // an invalid position reads nothing (the cache may even have no rows)
        c = load<ALIGNED, WIDTH>(cos_row + off);
        sn = load<ALIGNED, WIDTH>(sin_row + off);
      }
      Pack<scalar_t, WIDTH> y1, y2;
#pragma unroll
      for (int e = 0; e < WIDTH; ++e) {
        const float a = static_cast<float>(x1.v[e]);
        const float bb = static_cast<float>(x2.v[e]);
        const float cc = static_cast<float>(c.v[e]);
        const float ss = p.sin_sign * static_cast<float>(sn.v[e]);
        y1.v[e] = static_cast<scalar_t>(valid ? a * cc - bb * ss : nan);
        y2.v[e] = static_cast<scalar_t>(valid ? bb * cc + a * ss : nan);
      }
      store<ALIGNED, WIDTH>(out + off, y1);
      store<ALIGNED, WIDTH>(out + half + off, y2);
    } else {
      constexpr int PAIRS = WIDTH / 2;
      const int off = j * WIDTH;
      const auto x = load<ALIGNED, WIDTH>(in + off);
      Pack<cache_t, PAIRS> c{}, sn{};
      if (valid) {
        c = load<ALIGNED, PAIRS>(cos_row + off / 2);
        sn = load<ALIGNED, PAIRS>(sin_row + off / 2);
      }
      Pack<scalar_t, WIDTH> y;
#pragma unroll
      for (int e = 0; e < PAIRS; ++e) {
        const float a = static_cast<float>(x.v[2 * e]);
        const float bb = static_cast<float>(x.v[2 * e + 1]);
        const float cc = static_cast<float>(c.v[e]);
        const float ss = p.sin_sign * static_cast<float>(sn.v[e]);
        y.v[2 * e] = static_cast<scalar_t>(valid ? a * cc - bb * ss : nan);
        y.v[2 * e + 1] = static_cast<scalar_t>(valid ? bb * cc + a * ss : nan);
      }
      store<ALIGNED, WIDTH>(out + off, y);
    }
  }
}

bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

HeadsView make_view(const at::Tensor& in, const at::Tensor& out) {
  HeadsView v;
  v.in = in.data_ptr();
  v.out = out.data_ptr();
  const bool four_d = in.dim() == 4;
  // A dim of size 1 is only ever indexed at 0: its stride is irrelevant, so it is zeroed and does
  // not spoil the alignment test (sliced decode inputs keep the vector path).
  auto st = [](const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  v.in_sb = four_d ? st(in, 0) : 0;
  v.in_ss = four_d ? st(in, 1) : st(in, 0);
  v.in_sh = st(in, -2);
  v.out_sb = four_d ? st(out, 0) : 0;
  v.out_ss = four_d ? st(out, 1) : st(out, 0);
  v.out_sh = st(out, -2);
  v.heads = static_cast<int>(in.size(-2));
  return v;
}

bool view_aligned(const HeadsView& v, int64_t elem_bytes, int64_t width) {
  const int64_t strides[6] = {v.in_sb, v.in_ss, v.in_sh, v.out_sb, v.out_ss, v.out_sh};
  for (int64_t st : strides)
    if (st % width != 0) return false;
  return aligned_to(v.in, elem_bytes * width) && aligned_to(v.out, elem_bytes * width);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& cache) {
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4,
              "apply_rope: q must be [tokens, heads, head_dim] or [batch, seq, heads, head_dim], got ",
              q.dim(), " dims");
  TORCH_CHECK(k.dim() == q.dim(), "apply_rope: k must have q's number of dims (", q.dim(), "), got ",
              k.dim());
  const int64_t lead = q.dim() - 2;
  TORCH_CHECK(positions.dim() == lead, "apply_rope: positions must have q's leading shape ",
              q.sizes().slice(0, lead), ", got ", positions.sizes());
  for (int64_t d = 0; d < lead; ++d) {
    TORCH_CHECK(positions.size(d) == q.size(d), "apply_rope: positions must have q's leading shape ",
                q.sizes().slice(0, lead), ", got ", positions.sizes());
    TORCH_CHECK(k.size(d) == q.size(d), "apply_rope: k must have q's leading shape ",
                q.sizes().slice(0, lead), ", got ", k.sizes().slice(0, lead));
  }
  TORCH_CHECK(k.size(-1) == q.size(-1), "apply_rope: k's head_dim (", k.size(-1),
              ") must equal q's head_dim (", q.size(-1), ")");
  TORCH_CHECK(cache.dim() == 2, "apply_rope: cos_sin_cache must be [max_positions, rotary_dim], got ",
              cache.sizes());
  const int64_t rot = cache.size(1);
  TORCH_CHECK(rot > 0 && rot % 2 == 0, "apply_rope: rotary_dim (cos_sin_cache.shape[-1]) must be even "
              "and positive, got ", rot);
  TORCH_CHECK(rot <= q.size(-1), "apply_rope: rotary_dim (cos_sin_cache.shape[-1] = ", rot,
              ") must not exceed head_dim (", q.size(-1), ")");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "apply_rope: q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st, "apply_rope: k must have q's dtype (", st, "), got ", k.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
              "apply_rope: positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == st,
              "apply_rope: cos_sin_cache must be float32 or q's dtype (", st, "), got ", cache.scalar_type());
  const auto dev = q.device();
  TORCH_CHECK(dev.is_cuda(), "apply_rope: the CUDA kernel needs CUDA tensors, got q on ", dev);
  TORCH_CHECK(k.device() == dev, "apply_rope: k must be on q's device ", dev, ", got ", k.device());
  TORCH_CHECK(positions.device() == dev, "apply_rope: positions must be on q's device ", dev, ", got ",
              positions.device());
  TORCH_CHECK(cache.device() == dev, "apply_rope: cos_sin_cache must be on q's device ", dev, ", got ",
              cache.device());
  TORCH_CHECK(q.size(-1) == 0 || q.stride(-1) == 1, "apply_rope: q's last dim must have stride 1");
  TORCH_CHECK(k.size(-1) == 0 || k.stride(-1) == 1, "apply_rope: k's last dim must have stride 1");
  TORCH_CHECK(positions.is_contiguous(), "apply_rope: positions must be contiguous");
  TORCH_CHECK(cache.is_contiguous(), "apply_rope: cos_sin_cache must be contiguous");
  TORCH_CHECK((q.size(-2) + k.size(-2)) * q.size(-1) <= std::numeric_limits<int>::max(),
              "apply_rope: (q heads + k heads) * head_dim must fit in int32");
  TORCH_CHECK(positions.numel() <= std::numeric_limits<int>::max(), "apply_rope: too many tokens (",
              positions.numel(), ") for one launch");
  TORCH_CHECK(cache.size(0) > 0 || positions.numel() == 0,
              "apply_rope: cos_sin_cache has no rows (max_positions = 0) but positions is not empty");
}

template <typename scalar_t, typename cache_t, typename pos_t>
void launch_typed(const RopeParams& p, const at::Tensor& positions, const at::Tensor& cache, bool neox) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int half = p.rot_dim / 2;
  bool aligned = (neox ? half % VEC == 0 : p.rot_dim % VEC == 0) &&
                 (!p.copy_tail || (p.head_dim - p.rot_dim) % VEC == 0) &&
                 view_aligned(p.q, sizeof(scalar_t), VEC) && view_aligned(p.k, sizeof(scalar_t), VEC) &&
                 aligned_to(cache.data_ptr(), sizeof(cache_t) * (neox ? VEC : VEC / 2));
  const int width = aligned ? VEC : (neox ? 1 : 2);
  const int pass_width = aligned ? VEC : 1;
  const int per_head = (neox ? half : p.rot_dim) / width +
                       (p.copy_tail ? (p.head_dim - p.rot_dim) / pass_width : 0);
  const int items = (p.q.heads + p.k.heads) * per_head;
  if (items == 0) return;
  const int bx = std::min(256, (items + 31) / 32 * 32);
  const int by = std::max(1, 256 / bx);
  const dim3 block(bx, by);
  const dim3 grid(static_cast<unsigned>((p.tokens + by - 1) / by));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* pos = positions.data_ptr<pos_t>();
  const auto* cs = static_cast<const cache_t*>(cache.data_ptr());
#define QUICKLLM_ROPE_LAUNCH(W, AL, NX) \
  rope_kernel<scalar_t, cache_t, pos_t, W, AL, NX><<<grid, block, 0, stream>>>(p, pos, cs)
  if (aligned) {
    if (neox) QUICKLLM_ROPE_LAUNCH(VEC, true, true);
    else QUICKLLM_ROPE_LAUNCH(VEC, true, false);
  } else {
    if (neox) QUICKLLM_ROPE_LAUNCH(1, false, true);
    else QUICKLLM_ROPE_LAUNCH(2, false, false);
  }
#undef QUICKLLM_ROPE_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_for_scalar(const RopeParams& p, const at::Tensor& positions, const at::Tensor& cache, bool neox) {
  const bool cache_f32 = cache.scalar_type() == at::kFloat;
  const bool pos_i64 = positions.scalar_type() == at::kLong;
  if (cache_f32) {
    if (pos_i64) launch_typed<scalar_t, float, int64_t>(p, positions, cache, neox);
    else launch_typed<scalar_t, float, int32_t>(p, positions, cache, neox);
  } else {
    if (pos_i64) launch_typed<scalar_t, scalar_t, int64_t>(p, positions, cache, neox);
    else launch_typed<scalar_t, scalar_t, int32_t>(p, positions, cache, neox);
  }
}

void rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
                 const at::Tensor& positions, const at::Tensor& cache, bool is_neox, bool inverse,
                 bool copy_tail) {
  const int64_t tokens = positions.numel();
  if (tokens == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  RopeParams p;
  p.q = make_view(q, q_out);
  p.k = make_view(k, k_out);
  p.tokens = tokens;
  p.seq = q.dim() == 4 ? q.size(1) : tokens;
  p.max_positions = cache.size(0);
  p.head_dim = static_cast<int>(q.size(-1));
  p.rot_dim = static_cast<int>(cache.size(1));
  p.copy_tail = copy_tail ? 1 : 0;
  p.sin_sign = inverse ? -1.0f : 1.0f;
  if (p.seq == 0) return;
  dispatch_float<TorchTypes>(q.scalar_type(), "apply_rope",
                             [&](auto t) { launch_for_scalar<decltype(t)>(p, positions, cache, is_neox); });
}

std::tuple<at::Tensor, at::Tensor> apply_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& positions, const at::Tensor& cache,
                                                   bool is_neox, bool inverse) {
  check_inputs(q, k, positions, cache);
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  rope_launch(q, k, q_out, k_out, positions, cache, is_neox, inverse, /*copy_tail=*/true);
  return {q_out, k_out};
}

void apply_rope_cuda_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      const at::Tensor& cache, bool is_neox, bool inverse) {
  check_inputs(q, k, positions, cache);
  rope_launch(q, k, q, k, positions, cache, is_neox, inverse, /*copy_tail=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_apply_rope", &apply_rope_cuda);
  m.impl("_cuda_apply_rope_", &apply_rope_cuda_);
#ifdef QUICKLLM_STANDALONE
  // The CMake library serves C++ and serving-engine users without the Python package's backend
  // choice: there the public ops run the CUDA kernels directly.
  m.impl("apply_rope", &apply_rope_cuda);
  m.impl("apply_rope_", &apply_rope_cuda_);
#endif
}

}  // namespace quickllm
