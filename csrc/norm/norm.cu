// RMSNorm and fused residual-add + RMSNorm, forward and backward.
//
// x [..., H] (any leading strides, unit last stride; the host views it as [B, S, H], copying only when
// the leading dims cannot be viewed that way), weight [H] of x's dtype:
//   rstd = rsqrt(mean(x^2) + eps) in float32,
//   offset == 0 (transformers' LlamaRMSNorm): y = T(float(T(x * rstd)) * w), the normalised value cast
//     to x's dtype first, then the product in x's dtype (exact in float32 for 16-bit types, rounded once);
//   otherwise (GemmaRMSNorm, offset 1): y = T(x * rstd * (offset + w)) in float32, cast once.
// add_rms_norm first forms new_residual = T(x + residual) and normalises that rounded sum.
//
// Forward: one pass over x. Each row is spread over a power-of-two group of threads (blockDim.x, up to
// 1024), each thread holding ITEMS 16-byte vectors in registers across the row's reduction; short rows
// share a block (blockDim.y rows, 256 threads in all) so every block keeps enough bytes in flight.
// Rows too long for ITEMS <= 4 (or not 16-byte aligned: scalar accesses) take a second pass over the
// row, which comes from L1/L2. rstd float32 [rows] is written for the backward.
// Backward: a grid-stride loop over rows, blocks sized to the occupancy; each thread keeps its columns'
// partial weight gradient in float32 registers over the rows it visits, the block writes one float32
// row of partial sums [P, H], and a second kernel sums those rows in a fixed order: deterministic, no
// atomics. grad_x = rstd * (g w' - xhat * mean(g w' xhat)) (+ grad_residual), w' = offset + w.
// Offsets are 64-bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/host_checks.h"
#include "csrc/common/vec.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

namespace quickllm {
namespace {

constexpr int kFwdMaxThreads = 1024;  // threads of one row, forward
constexpr int kBwdMaxThreads = 512;   // backward: x, g and the partial gradient live in registers
constexpr int kBlockThreads = 256;    // threads of a block that holds several short rows
constexpr int kMaxItems = 4;          // 16-byte vectors a thread holds in registers
constexpr int kMaxRowsWithSmem = 8;   // rows per block when a row needs more than one warp (<= 256 / 32)

struct RowsView {  // a [B, S, H] tensor with unit last stride: the strides of B and S
  int64_t sb, ss;
};

struct FwdParams {
  const void* x;
  const void* residual;  // add_rms_norm only
  const void* weight;
  void* y;
  void* new_residual;  // add_rms_norm only
  float* rstd;         // null: not wanted (in place)
  RowsView xs, rs, ys, zs;
  int64_t rows, S;
  int H;
  float inv_h, eps, offset;
  bool llama;  // offset == 0: cast x * rstd to x's dtype before the weight
};

struct BwdParams {
  const void* grad_y;
  const void* grad_residual;  // null when absent
  const void* x;
  const void* weight;
  const float* rstd;
  void* grad_x;     // contiguous [rows, H]
  float* partial;   // [gridDim.x * (loop kernel: blockDim.y), H]
  RowsView gs, grs, xs;
  int64_t rows, S;
  int H;
  float inv_h, offset;
};

// Sum of v over the blockDim.x threads of this row (a power of two), in every one of them. smem holds
// 32 floats per row of the block; the call ends with the block synchronised when blockDim.x > 32, so
// it may be called again (every thread of the block must call it).
__device__ __forceinline__ float row_sum(float v, float* smem) {
  const int nx = blockDim.x;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < nx) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (nx <= 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = smem + threadIdx.y * 32;
  if (lane == 0) mine[warp] = v;
  __syncthreads();
  v = lane < (nx >> 5) ? mine[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();
  return v;
}

// rsqrt(sum / H + eps), with the two roundings torch's mean and add make (no fused multiply-add).
__device__ __forceinline__ float rstd_of(float sum, float inv_h, float eps) {
  return rsqrtf(__fadd_rn(__fmul_rn(sum, inv_h), eps));
}

template <typename T>
__device__ __forceinline__ T scaled(float h, float w, bool llama, float offset) {
  if (llama) return static_cast<T>(static_cast<float>(static_cast<T>(h)) * w);
  return static_cast<T>(h * (offset + w));
}

template <typename T, int VEC, int ITEMS, bool ADD>
__global__ void __launch_bounds__(kFwdMaxThreads) fwd_kernel(const FwdParams p) {
  __shared__ float red[kMaxRowsWithSmem * 32];
  constexpr bool ALIGNED = VEC > 1;  // the host checked 16-byte alignment of every row and H % VEC == 0
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  const int64_t b = active ? row / p.S : 0;
  const int64_t s = active ? row - b * p.S : 0;
  // No __restrict__: in place, y and new_residual are x and residual (each element is read before
  // the same thread writes it).
  const T* x = static_cast<const T*>(p.x) + b * p.xs.sb + s * p.xs.ss;
  const T* r = ADD ? static_cast<const T*>(p.residual) + b * p.rs.sb + s * p.rs.ss : nullptr;
  T* y = static_cast<T*>(p.y) + b * p.ys.sb + s * p.ys.ss;
  T* z = ADD ? static_cast<T*>(p.new_residual) + b * p.zs.sb + s * p.zs.ss : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  const int nvec = p.H / VEC;

  auto input = [&](int i) {  // vector i of the row: x, or the rounded x + residual
    Pack<T, VEC> v = load<ALIGNED, VEC>(x + static_cast<int64_t>(i) * VEC);
    if constexpr (ADD) {
      const auto rv = load<ALIGNED, VEC>(r + static_cast<int64_t>(i) * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<T>(static_cast<float>(v.v[e]) + static_cast<float>(rv.v[e]));
    }
    return v;
  };
  auto square_sum = [](const Pack<T, VEC>& v, float acc) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = static_cast<float>(v.v[e]);
      acc += f * f;
    }
    return acc;
  };
  auto output = [&](int i, const Pack<T, VEC>& v, float rstd) {
    const int64_t off = static_cast<int64_t>(i) * VEC;
    if constexpr (ADD) store<ALIGNED, VEC>(z + off, v);
    const auto wv = load<ALIGNED, VEC>(w + off);
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      out.v[e] = scaled<T>(static_cast<float>(v.v[e]) * rstd, static_cast<float>(wv.v[e]), p.llama, p.offset);
    store<ALIGNED, VEC>(y + off, out);
  };

  float ss = 0.f;
  if constexpr (ITEMS > 0) {
    Pack<T, VEC> v[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (active && i < nvec) {
        v[k] = input(i);
        ss = square_sum(v[k], ss);
      }
    }
    const float rstd = rstd_of(row_sum(ss, red), p.inv_h, p.eps);
    if (!active) return;
    if (p.rstd != nullptr && threadIdx.x == 0) p.rstd[row] = rstd;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nvec) output(i, v[k], rstd);
    }
  } else {
    // Two passes; the second reads x (and residual) again and recomputes the sum, so in place
    // nothing is written before every read of it.
    for (int i = threadIdx.x; active && i < nvec; i += blockDim.x) ss = square_sum(input(i), ss);
    const float rstd = rstd_of(row_sum(ss, red), p.inv_h, p.eps);
    if (!active) return;
    if (p.rstd != nullptr && threadIdx.x == 0) p.rstd[row] = rstd;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) output(i, input(i), rstd);
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kBwdMaxThreads) bwd_kernel(const BwdParams p) {
  extern __shared__ float dw_rows[];  // [blockDim.y][ITEMS * blockDim.x * VEC], when blockDim.y > 1
  __shared__ float red[kMaxRowsWithSmem * 32];
  constexpr bool ALIGNED = VEC > 1;
  const int nvec = p.H / VEC;
  const T* w = static_cast<const T*>(p.weight);
  const bool resid = p.grad_residual != nullptr;
  [[maybe_unused]] float dw[ITEMS > 0 ? ITEMS : 1][VEC] = {};
  [[maybe_unused]] float* my_partial = p.partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * p.H;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  // The loop runs while the block's first row exists, the same for all its threads (row_sum syncs).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < p.rows; first += step) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < p.rows;
    const int64_t b = active ? row / p.S : 0;
    const int64_t s = active ? row - b * p.S : 0;
    const T* x = static_cast<const T*>(p.x) + b * p.xs.sb + s * p.xs.ss;
    const T* g = static_cast<const T*>(p.grad_y) + b * p.gs.sb + s * p.gs.ss;
    const T* gr = resid ? static_cast<const T*>(p.grad_residual) + b * p.grs.sb + s * p.grs.ss : nullptr;
    T* dx = static_cast<T*>(p.grad_x) + (active ? row : 0) * p.H;
    const float rstd = active ? p.rstd[row] : 0.f;

    // dx from one vector of x, g and w (and the row's c = mean(g w' xhat)); dw accumulates g xhat.
    auto grad = [&](int i, const Pack<T, VEC>& xv, const Pack<T, VEC>& gv, float c, float (&acc)[VEC]) {
      const int64_t off = static_cast<int64_t>(i) * VEC;
      const auto wv = load<ALIGNED, VEC>(w + off);
      Pack<T, VEC> rv{};
      if (resid) rv = load<ALIGNED, VEC>(gr + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xh = static_cast<float>(xv.v[e]) * rstd;
        const float gf = static_cast<float>(gv.v[e]);
        float d = (gf * (p.offset + static_cast<float>(wv.v[e])) - xh * c) * rstd;
        if (resid) d += static_cast<float>(rv.v[e]);
        out.v[e] = static_cast<T>(d);
        acc[e] += gf * xh;
      }
      store<ALIGNED, VEC>(dx + off, out);
    };
    auto dot = [&](const Pack<T, VEC>& xv, const Pack<T, VEC>& gv, int i, float acc) {
      const auto wv = load<ALIGNED, VEC>(w + static_cast<int64_t>(i) * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        acc += static_cast<float>(gv.v[e]) * (p.offset + static_cast<float>(wv.v[e])) * static_cast<float>(xv.v[e]);
      return acc;
    };

    float acc = 0.f;
    if constexpr (ITEMS > 0) {
      Pack<T, VEC> xv[ITEMS], gv[ITEMS];
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (active && i < nvec) {
          xv[k] = load<ALIGNED, VEC>(x + static_cast<int64_t>(i) * VEC);
          gv[k] = load<ALIGNED, VEC>(g + static_cast<int64_t>(i) * VEC);
          acc = dot(xv[k], gv[k], i, acc);
        }
      }
      const float c = row_sum(acc, red) * rstd * p.inv_h;  // mean(g w' xhat) = rstd mean(g w' x)
      if (active) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
          const int i = threadIdx.x + k * blockDim.x;
          if (i < nvec) grad(i, xv[k], gv[k], c, dw[k]);
        }
      }
    } else {
      for (int i = threadIdx.x; active && i < nvec; i += blockDim.x) {
        const int64_t off = static_cast<int64_t>(i) * VEC;
        acc = dot(load<ALIGNED, VEC>(x + off), load<ALIGNED, VEC>(g + off), i, acc);
      }
      const float c = row_sum(acc, red) * rstd * p.inv_h;
      for (int i = threadIdx.x; active && i < nvec; i += blockDim.x) {
        const int64_t off = static_cast<int64_t>(i) * VEC;
        float part[VEC] = {};
        grad(i, load<ALIGNED, VEC>(x + off), load<ALIGNED, VEC>(g + off), c, part);
#pragma unroll
        for (int e = 0; e < VEC; ++e) my_partial[off + e] += part[e];  // this thread's own columns
      }
    }
  }

  if constexpr (ITEMS > 0) {
    float* out = p.partial + static_cast<int64_t>(blockIdx.x) * p.H;
    if (blockDim.y == 1) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[static_cast<int64_t>(i) * VEC + e] = dw[k][e];
        }
      }
    } else {  // the block's rows summed in shared memory, in row order, into one partial row
      const int width = ITEMS * blockDim.x * VEC;
      float* mine = dw_rows + threadIdx.y * width;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) mine[(k * blockDim.x + threadIdx.x) * VEC + e] = dw[k][e];
      }
      __syncthreads();
      for (int j = threadIdx.y * blockDim.x + threadIdx.x; j < p.H; j += blockDim.x * blockDim.y) {
        float t = 0.f;
        for (int yy = 0; yy < static_cast<int>(blockDim.y); ++yy) t += dw_rows[yy * width + j];
        out[j] = t;
      }
    }
  }
}

// out[col] = sum over rows of partial[row][col], rows in a fixed order (32 columns x 8 row lanes).
template <typename T>
__global__ void __launch_bounds__(256) sum_rows_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                                       int64_t n_rows, int H) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float a = 0.f;
  if (col < H)
    for (int64_t r = threadIdx.y; r < n_rows; r += 8) a += partial[r * H + col];
  acc[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && col < H) {
    float t = 0.f;
#pragma unroll
    for (int yy = 0; yy < 8; ++yy) t += acc[yy][threadIdx.x];
    out[col] = static_cast<T>(t);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

struct Layout {
  int threads_x, rows_y, items;  // items 0: the two-pass kernel
};

// Threads per row: enough that each holds at most `per_thread` vectors (more would leave the row's
// reduction to few threads), at most max_threads; rows share a block up to kBlockThreads threads.
Layout layout(int64_t nvec, bool aligned, int per_thread, int max_threads) {
  Layout l;
  l.threads_x = std::min<int>(max_threads, next_pow2((nvec + per_thread - 1) / per_thread));
  const int items = next_pow2((nvec + l.threads_x - 1) / l.threads_x);
  l.items = aligned && items <= kMaxItems ? items : 0;
  l.rows_y = std::max(1, kBlockThreads / l.threads_x);
  return l;
}

// [..., H] -> [B, S, H] with a unit last stride (a view where the strides allow, else a copy).
at::Tensor as_3d(at::Tensor t) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) t = t.contiguous();
  if (t.dim() == 1) return t.view({1, 1, t.size(0)});
  if (t.dim() == 2) return t.unsqueeze(0);
  if (t.dim() > 3) return t.flatten(0, -3);
  return t;
}

RowsView rows_of(const at::Tensor& t3) { return RowsView{stride_of(t3, 0), stride_of(t3, 1)}; }

template <typename T>
bool vec_ok(int H, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int VEC = 16 / sizeof(T);
  if (H % VEC != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr) continue;
    if (!aligned16(t->data_ptr())) return false;
    if (t->dim() == 3 && (stride_of(*t, 0) % VEC != 0 || stride_of(*t, 1) % VEC != 0)) return false;
  }
  return true;
}

void check_x_weight(const char* op, const at::Tensor& x, const at::Tensor& weight, double offset) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be a tensor [..., H], got a 0-d tensor");
  const int64_t H = x.size(-1);
  TORCH_CHECK(H > 0, op, ": x has no columns (H = x.shape[-1] = 0)");
  TORCH_CHECK(H <= std::numeric_limits<int>::max(), op, ": H = x.shape[-1] = ", H, " must fit in int32");
  check_float(op, x, "x");
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got x on ", x.device());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must be [H] = [", H,
              "] (x.shape[-1]), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype (", x.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(), ", got ",
              weight.device());
  TORCH_CHECK(std::isfinite(offset), op, ": weight_offset must be finite, got ", offset);
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be a positive finite number, got ", eps);
}

// The forward over x3 (+ r3) into y3 (+ z3), all [B, S, H] with unit last strides.
void forward(const at::Tensor& x3, const at::Tensor* r3, const at::Tensor& weight, const at::Tensor& y3,
             const at::Tensor* z3, float* rstd, double eps, double offset, const char* op) {
  const int64_t rows = x3.size(0) * x3.size(1);
  if (rows == 0) return;
  const int H = static_cast<int>(x3.size(2));
  FwdParams p;
  p.x = x3.data_ptr();
  p.residual = r3 ? r3->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.y = y3.data_ptr();
  p.new_residual = z3 ? z3->data_ptr() : nullptr;
  p.rstd = rstd;
  p.xs = rows_of(x3);
  p.rs = r3 ? rows_of(*r3) : RowsView{0, 0};
  p.ys = rows_of(y3);
  p.zs = z3 ? rows_of(*z3) : RowsView{0, 0};
  p.rows = rows;
  p.S = x3.size(1);
  p.H = H;
  p.inv_h = static_cast<float>(1.0 / H);
  p.eps = static_cast<float>(eps);
  p.offset = static_cast<float>(offset);
  p.llama = offset == 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<TorchTypes>(x3.scalar_type(), op, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool aligned = vec_ok<T>(H, {&x3, r3, &weight, &y3, z3});
    const Layout l = layout(aligned ? H / VEC : H, aligned, kMaxItems, kFwdMaxThreads);
    const int64_t blocks = (rows + l.rows_y - 1) / l.rows_y;
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": too many rows (", rows, ") for one launch");
    const dim3 grid(static_cast<unsigned>(blocks)), block(l.threads_x, l.rows_y);
    auto go = [&](auto kernel) { kernel<<<grid, block, 0, stream>>>(p); };
    auto by_items = [&](auto add) {
      constexpr bool ADD = decltype(add)::value;
      if (!aligned) return go(fwd_kernel<T, 1, 0, ADD>);
      switch (l.items) {
        case 1: return go(fwd_kernel<T, VEC, 1, ADD>);
        case 2: return go(fwd_kernel<T, VEC, 2, ADD>);
        case 4: return go(fwd_kernel<T, VEC, 4, ADD>);
        default: return go(fwd_kernel<T, VEC, 0, ADD>);
      }
    };
    if (r3 != nullptr) by_items(std::true_type{});
    else by_items(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight_in, double eps,
                                                 double offset) {
  check_x_weight("rms_norm", x, weight_in, offset);
  check_eps("rms_norm", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_3d(x), weight = weight_in.contiguous();
  auto y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  forward(x3, nullptr, weight, y.view(x3.sizes()), nullptr, rstd.data_ptr<float>(), eps, offset, "rms_norm");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                 const at::Tensor& weight_in, double eps,
                                                                 double offset) {
  check_x_weight("add_rms_norm", x, weight_in, offset);
  check_like("add_rms_norm", residual, "residual", x);
  check_eps("add_rms_norm", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_3d(x), r3 = as_3d(residual), weight = weight_in.contiguous();
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto y = at::empty(x.sizes(), opts), z = at::empty(x.sizes(), opts);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const at::Tensor z3 = z.view(x3.sizes());
  forward(x3, &r3, weight, y.view(x3.sizes()), &z3, rstd.data_ptr<float>(), eps, offset, "add_rms_norm");
  return {y, z, rstd};
}

void add_rms_norm_cuda_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight_in, double eps,
                        double offset) {
  check_x_weight("add_rms_norm_", x, weight_in, offset);
  check_like("add_rms_norm_", residual, "residual", x);
  check_eps("add_rms_norm_", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_3d(x), r3 = as_3d(residual), weight = weight_in.contiguous();
  if (x3.is_alias_of(x) && r3.is_alias_of(residual)) {
    forward(x3, &r3, weight, x3, &r3, nullptr, eps, offset, "add_rms_norm_");
    return;
  }
  // A layout the kernel cannot write through (leading dims that do not merge, a non-unit last
  // stride): out of place, then copied back.
  auto [y, z, rstd] = add_rms_norm_cuda(x, residual, weight, eps, offset);
  residual.copy_(z);
  x.copy_(y);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y,
                                                          const std::optional<at::Tensor>& grad_residual,
                                                          const at::Tensor& x, const at::Tensor& weight_in,
                                                          const at::Tensor& rstd_in, double offset) {
  const char* op = "rms_norm_backward";
  check_x_weight(op, x, weight_in, offset);
  check_like(op, grad_y, "grad_y", x);
  if (grad_residual.has_value()) check_like(op, *grad_residual, "grad_residual", x);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(rstd_in.sizes() == lead, op, ": rstd must have x's leading shape ", lead, ", got ", rstd_in.sizes());
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat, op, ": rstd must be float32 (the forward's), got ",
              rstd_in.scalar_type());
  TORCH_CHECK(rstd_in.device() == x.device(), op, ": rstd must be on x's device ", x.device(), ", got ",
              rstd_in.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_3d(x), g3 = as_3d(grad_y), weight = weight_in.contiguous();
  const at::Tensor gr3 = grad_residual.has_value() ? as_3d(*grad_residual) : at::Tensor();
  const at::Tensor rstd = rstd_in.contiguous();
  auto dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = x3.size(0) * x3.size(1);
  const int H = static_cast<int>(x3.size(2));
  if (rows == 0) return {dx, at::zeros_like(weight)};
  auto dw = at::empty_like(weight);

  BwdParams p;
  p.grad_y = g3.data_ptr();
  p.grad_residual = gr3.defined() ? gr3.data_ptr() : nullptr;
  p.x = x3.data_ptr();
  p.weight = weight.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  p.grad_x = dx.data_ptr();
  p.gs = rows_of(g3);
  p.grs = gr3.defined() ? rows_of(gr3) : RowsView{0, 0};
  p.xs = rows_of(x3);
  p.rows = rows;
  p.S = x3.size(1);
  p.H = H;
  p.inv_h = static_cast<float>(1.0 / H);
  p.offset = static_cast<float>(offset);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  dispatch_float<TorchTypes>(x.scalar_type(), op, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool aligned = vec_ok<T>(H, {&x3, &g3, gr3.defined() ? &gr3 : nullptr, &weight, &dx});
    const Layout l = layout(aligned ? H / VEC : H, aligned, 2, kBwdMaxThreads);
    const dim3 block(l.threads_x, l.rows_y);
    const int threads = l.threads_x * l.rows_y;
    auto go = [&](auto kernel, size_t smem) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
      const int64_t tiles = (rows + l.rows_y - 1) / l.rows_y;
      const int64_t resident = static_cast<int64_t>(sms) * std::max(per_sm, 1);
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(tiles, resident));
      // The two-pass kernel accumulates into its partial rows in place (one per row of the block).
      const int64_t partial_rows = l.items > 0 ? blocks : blocks * l.rows_y;
      auto partial = l.items > 0 ? at::empty({partial_rows, H}, x.options().dtype(at::kFloat))
                                 : at::zeros({partial_rows, H}, x.options().dtype(at::kFloat));
      p.partial = partial.data_ptr<float>();
      kernel<<<static_cast<unsigned>(blocks), block, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_rows_kernel<T><<<(H + 31) / 32, dim3(32, 8), 0, stream>>>(p.partial, dw.data_ptr<T>(), partial_rows, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const size_t smem = l.rows_y > 1 ? sizeof(float) * l.rows_y * l.items * l.threads_x * VEC : 0;
    if (!aligned) return go(bwd_kernel<T, 1, 0>, 0);
    switch (l.items) {
      case 1: return go(bwd_kernel<T, VEC, 1>, smem);
      case 2: return go(bwd_kernel<T, VEC, 2>, smem);
      case 4: return go(bwd_kernel<T, VEC, 4>, smem);
      default: return go(bwd_kernel<T, VEC, 0>, 0);
    }
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_rms_norm", &rms_norm_cuda);
  m.impl("_cuda_add_rms_norm", &add_rms_norm_cuda);
  m.impl("_cuda_add_rms_norm_", &add_rms_norm_cuda_);
  m.impl("_cuda_rms_norm_backward", &rms_norm_backward_cuda);
#ifdef QUICKLLM_STANDALONE
  // The CMake library serves C++ and serving-engine users without the Python package's backend
  // choice: there the public ops run the CUDA kernels directly.
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("add_rms_norm_", &add_rms_norm_cuda_);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
#endif
}

}  // namespace quickllm
