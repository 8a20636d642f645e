// FP8 (float8_e4m3fn, range +-448) kernels for DeepSeek-V3 style block quantisation.
//
// weight_dequant  w [M, N] fp8 * scale_inv [ceil(M/bm), ceil(N/bn)] -> [M, N] in out_dtype.
// act_quant       x [..., K] -> (fp8 [..., K], float32 scales [..., ceil(K/group)]), one scale per
//                 group of `group` along K.
// fp8_block_gemm  C [M, N] = (a * a_scales) (b * b_scales)^T: a [M, K] with one scale per row and
//                 128-wide K block, b [N, K] with one scale per 128x128 block, on the FP8 tensor
//                 cores of sm_89+ (mma.sync m16n8k32 e4m3).
//
// The first two match the PyTorch reference bit for bit: every value goes through the same fp32
// operations (one multiply; IEEE divisions, never reciprocals) and the same round-to-nearest-even
// conversions. The GEMM accumulates in fp32; its summation order is the tensor cores'.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/vec.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace quickllm {
namespace {

constexpr float kFp8Max = 448.0f;
// Dims are int32 in the kernels; the margin keeps indices rounded up to a whole tile in range too.
constexpr int64_t kMaxDim = std::numeric_limits<int>::max() - 4096;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// e4m3 -> half is exact (every e4m3 value, subnormals included, is a half), and so is half -> float.
__device__ __forceinline__ float fp8_to_float(uint8_t v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3)));
}
// Two fp8 in one 16-bit word, the lower byte first (one cvt instruction on sm_89+).
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t v) {
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3)));
}

// fp32 -> output type, round to nearest even (what torch's .to() does).
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
// Two adjacent outputs, p aligned to two elements.
__device__ __forceinline__ void store2(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void store2(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
// Sixteen outputs, p 16-byte aligned: 16-byte stores only.
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&v)[16]) {
  Pack<T, 16> r;
#pragma unroll
  for (int i = 0; i < 16; i += 2) store2(&r.v[i], v[i], v[i + 1]);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r) / 16); ++i)
    reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(&r)[i];
}

bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// ------------------------------------------------------------------------------------------------
// weight_dequant: pure streaming (1 byte in, 2-4 bytes out per element). A block covers
// blockDim.x * 16 columns and blockDim.y * kDqRows rows; each thread owns 16 consecutive columns
// (one 16-byte load on the vector path) in kDqRows rows, so its loads are all in flight together.
// The vector path needs 16 | block_n: then a thread's 16 columns share one scale column, computed
// once; only the row block is recomputed (a 32-bit division per 16 elements).

constexpr int kDqRows = 4;

struct DequantParams {
  const uint8_t* w;
  int64_t ldw;  // row stride of w in elements (= bytes)
  const float* s;
  int64_t ss0, ss1;
  void* out;  // [M, N] contiguous
  int M, N, bm, bn;
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(256) weight_dequant_kernel(const DequantParams p) {
  T* out = static_cast<T*>(p.out);
  const int tile_rows = blockDim.y * kDqRows;
  const int row_tiles = static_cast<int>((static_cast<int64_t>(p.M) + tile_rows - 1) / tile_rows);
  const int col_base = blockIdx.x * blockDim.x * 16;
  if constexpr (VEC) {
    const int j0 = col_base + threadIdx.x * 16;
    if (j0 >= p.N) return;  // N % 16 == 0: a chunk is wholly inside or outside the row
    const int64_t scol = static_cast<int64_t>(j0 / p.bn) * p.ss1;
    for (int rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      const int r0 = rt * tile_rows + threadIdx.y;
      uint4 raw[kDqRows];
#pragma unroll
      for (int i = 0; i < kDqRows; ++i) {
        const int r = r0 + i * blockDim.y;
        if (r < p.M) raw[i] = *reinterpret_cast<const uint4*>(p.w + static_cast<int64_t>(r) * p.ldw + j0);
      }
#pragma unroll
      for (int i = 0; i < kDqRows; ++i) {
        const int r = r0 + i * blockDim.y;
        if (r >= p.M) break;
        const float s = p.s[static_cast<int64_t>(r / p.bm) * p.ss0 + scol];
        const uint32_t words[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
        float f[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 lo = fp8x2_to_float2(words[q] & 0xFFFFu), hi = fp8x2_to_float2(words[q] >> 16);
          f[4 * q] = lo.x * s;
          f[4 * q + 1] = lo.y * s;
          f[4 * q + 2] = hi.x * s;
          f[4 * q + 3] = hi.y * s;
        }
        store16(out + static_cast<int64_t>(r) * p.N + j0, f);
      }
    }
  } else {
    // Any stride, alignment and block_n: byte loads, coalesced across the warp, one scale each.
    for (int rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      for (int i = 0; i < kDqRows; ++i) {
        const int r = rt * tile_rows + threadIdx.y + i * blockDim.y;
        if (r >= p.M) break;
        const uint8_t* wr = p.w + static_cast<int64_t>(r) * p.ldw;
        const float* sr = p.s + static_cast<int64_t>(r / p.bm) * p.ss0;
        T* orow = out + static_cast<int64_t>(r) * p.N;
#pragma unroll 4
        for (int e = 0; e < 16; ++e) {
          const int j = col_base + threadIdx.x + e * blockDim.x;
          if (j < p.N) store1(orow + j, fp8_to_float(wr[j]) * sr[static_cast<int64_t>(j / p.bn) * p.ss1]);
        }
      }
    }
  }
}

template <typename T>
void launch_dequant(const DequantParams& p, bool vec, cudaStream_t stream) {
  // Narrow matrices get fewer threads per row and more rows per block, so no thread idles.
  const int chunks = (p.N + 15) / 16;
  int tx = 1;
  while (tx < chunks && tx < 64) tx *= 2;
  const int ty = 256 / tx;
  const int64_t row_tiles = (static_cast<int64_t>(p.M) + ty * kDqRows - 1) / (ty * kDqRows);
  const dim3 grid(static_cast<unsigned>((p.N + tx * 16 - 1) / (tx * 16)),
                  static_cast<unsigned>(std::min<int64_t>(row_tiles, 65535)));
  const dim3 block(tx, ty);
  if (vec) weight_dequant_kernel<T, true><<<grid, block, 0, stream>>>(p);
  else weight_dequant_kernel<T, false><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor weight_dequant_cuda(const at::Tensor& w, const at::Tensor& scale_inv, int64_t block_m, int64_t block_n,
                               at::ScalarType out_dtype) {
  TORCH_CHECK(w.dim() == 2, "weight_dequant: w must be [M, N], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, "weight_dequant: w must be float8_e4m3fn, got ",
              w.scalar_type());
  TORCH_CHECK(w.is_cuda(), "weight_dequant: the CUDA kernel needs CUDA tensors, got w on ", w.device());
  TORCH_CHECK(scale_inv.device() == w.device(), "weight_dequant: scale_inv must be on w's device ", w.device(),
              ", got ", scale_inv.device());
  TORCH_CHECK(scale_inv.scalar_type() == at::kFloat, "weight_dequant: scale_inv must be float32, got ",
              scale_inv.scalar_type());
  TORCH_CHECK(block_m > 0 && block_n > 0 && block_m <= kMaxDim && block_n <= kMaxDim,
              "weight_dequant: block_m and block_n must be positive int32, got ", block_m, " and ", block_n);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "weight_dequant: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const int64_t M = w.size(0), N = w.size(1);
  TORCH_CHECK(M <= kMaxDim && N <= kMaxDim, "weight_dequant: w's dims must be below 2^31 - 4096, got ", w.sizes());
  const int64_t sm = (M + block_m - 1) / block_m, sn = (N + block_n - 1) / block_n;
  TORCH_CHECK(scale_inv.dim() == 2 && scale_inv.size(0) == sm && scale_inv.size(1) == sn,
              "weight_dequant: scale_inv must be [", sm, ", ", sn, "] for a [", M, ", ", N, "] weight with [",
              block_m, ", ", block_n, "] blocks, got ", scale_inv.sizes());
  TORCH_CHECK(N <= 1 || w.stride(1) == 1, "weight_dequant: w's last dim must have stride 1, got strides ",
              w.strides());
  auto out = at::empty({M, N}, w.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const c10::cuda::CUDAGuard guard(w.device());
  const DequantParams p{static_cast<const uint8_t*>(w.data_ptr()), M == 1 ? 0 : w.stride(0),
                        scale_inv.data_ptr<float>(), scale_inv.stride(0), scale_inv.stride(1), out.data_ptr(),
                        static_cast<int>(M), static_cast<int>(N), static_cast<int>(block_m), static_cast<int>(block_n)};
  const bool vec = N % 16 == 0 && block_n % 16 == 0 && p.ldw % 16 == 0 && aligned_to(p.w, 16) &&
                   aligned_to(p.out, 16);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(out_dtype, "weight_dequant", [&](auto t) { launch_dequant<decltype(t)>(p, vec, stream); });
  return out;
}

// ------------------------------------------------------------------------------------------------
// act_quant: one warp per (row, group). group == 128 keeps the group in registers (4 elements per
// lane, one 16- or 8-byte load); any other group size loops over the group twice (the second pass
// reads from L1/L2).

struct QuantParams {
  const void* x;
  int64_t ldx;  // row stride of the [R, K] view
  uint8_t* q;   // [R, K] contiguous
  float* s;     // [R, G] contiguous
  int64_t rows;
  int K, group, groups;
  bool ue8m0;
};

// Max that propagates NaN like torch.amax (fmaxf would drop it): a group holding a NaN gets a NaN
// scale, as in the reference, instead of a scale from its other values.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float group_scale(float amax, bool ue8m0) {
  // The 1e-10 floor gives an all-zero group a tiny positive scale: its values quantise to 0 / s = 0,
  // never 0 / 0 (written so that NaN passes, as through torch.clamp). The division is IEEE (no
  // reciprocal) so the scale is the reference's to the bit.
  float s = __fdiv_rn(amax < 1e-10f ? 1e-10f : amax, kFp8Max);
  if (ue8m0) {
    // Round up to a power of two (an 8-bit exponent-only scale). For a positive normal s, clearing
    // the mantissa and adding one to the exponent is exact; inf and NaN (exponent all ones) pass
    // unchanged, as in the reference.
    uint32_t u = __float_as_uint(s);
    if ((u & 0x7FFFFFu) && (u & 0x7F800000u) != 0x7F800000u) u = (u & 0xFF800000u) + 0x800000u;
    s = __uint_as_float(u);
  }
  return s;
}

// x / s rounded to e4m3 (nearest even). SATFINITE saturates finite overflow and infinities to
// +-448, which is exactly the reference's clamp to [-448, 448] followed by the conversion, and it
// keeps NaN a NaN as torch.clamp does.
__device__ __forceinline__ uint32_t quant1(float x, float s) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(x, s), __NV_SATFINITE, __NV_E4M3);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(256) act_quant128_kernel(const QuantParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t total = p.rows * p.groups;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5); w < total;
       w += static_cast<int64_t>(gridDim.x) * 8) {
    const int64_t row = w / p.groups;
    const int g = static_cast<int>(w - row * p.groups);
    const int k0 = g * 128 + lane * 4;
    const T* src = static_cast<const T*>(p.x) + row * p.ldx + k0;
    float v[4] = {0.f, 0.f, 0.f, 0.f};  // zeros past K leave the group's max unchanged
    if constexpr (VEC) {
      if (k0 < p.K) {  // K % 4 == 0: a lane's 4 elements are all inside or all outside
        const Pack<T, 4> pk = *reinterpret_cast<const Pack<T, 4>*>(src);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = to_float(pk.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k0 + e < p.K) v[e] = to_float(src[e]);
    }
    const float amax = max_nan(max_nan(fabsf(v[0]), fabsf(v[1])), max_nan(fabsf(v[2]), fabsf(v[3])));
    const float s = group_scale(warp_max(amax), p.ue8m0);
    uint8_t* dst = p.q + row * p.K + k0;
    if constexpr (VEC) {
      if (k0 < p.K)
        *reinterpret_cast<uint32_t*>(dst) =
            quant1(v[0], s) | (quant1(v[1], s) << 8) | (quant1(v[2], s) << 16) | (quant1(v[3], s) << 24);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k0 + e < p.K) dst[e] = static_cast<uint8_t>(quant1(v[e], s));
    }
    if (lane == 0) p.s[w] = s;  // scales are [R, G] contiguous: (row, g) is warp item w
  }
}

template <typename T>
__global__ void __launch_bounds__(256) act_quant_any_kernel(const QuantParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t total = p.rows * p.groups;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5); w < total;
       w += static_cast<int64_t>(gridDim.x) * 8) {
    const int64_t row = w / p.groups;
    const int k0 = static_cast<int>(w - row * p.groups) * p.group;
    const int len = min(p.group, p.K - k0);  // the last group of a row may be partial
    const T* src = static_cast<const T*>(p.x) + row * p.ldx + k0;
    float amax = 0.f;
    for (int k = lane; k < len; k += 32) amax = max_nan(amax, fabsf(to_float(src[k])));
    const float s = group_scale(warp_max(amax), p.ue8m0);
    uint8_t* dst = p.q + row * p.K + k0;
    for (int k = lane; k < len; k += 32) dst[k] = static_cast<uint8_t>(quant1(to_float(src[k]), s));
    if (lane == 0) p.s[w] = s;
  }
}

template <typename T>
void launch_act_quant(const QuantParams& p, bool fast, cudaStream_t stream) {
  const int64_t items = p.rows * p.groups;  // one warp each, 8 warps a block
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 7) / 8, static_cast<int64_t>(sms) * 64));
  if (fast) {
    const bool vec = p.K % 4 == 0 && p.ldx % 4 == 0 && aligned_to(p.x, 4 * sizeof(T));
    if (vec) act_quant128_kernel<T, true><<<blocks, 256, 0, stream>>>(p);
    else act_quant128_kernel<T, false><<<blocks, 256, 0, stream>>>(p);
  } else {
    act_quant_any_kernel<T><<<blocks, 256, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> act_quant_cuda(const at::Tensor& x, int64_t group, bool ue8m0) {
  TORCH_CHECK(x.dim() >= 1, "act_quant: x must be [..., K], got a 0-dim tensor");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "act_quant: x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.is_cuda(), "act_quant: the CUDA kernel needs CUDA tensors, got x on ", x.device());
  TORCH_CHECK(group > 0, "act_quant: group must be positive, got ", group);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= kMaxDim, "act_quant: x's last dim (", K, ") must be below 2^31 - 4096");
  const int64_t G = (K + group - 1) / group;
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = G;
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto s = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const int64_t rows = K == 0 ? 0 : x.numel() / K;
  if (rows == 0) return {q, s};
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x2 = x.reshape({rows, K});  // a view where the leading dims allow, else a copy
  if (K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  // A group longer than the row is the whole row.
  const QuantParams p{x2.data_ptr(), rows == 1 ? 0 : x2.stride(0), static_cast<uint8_t*>(q.data_ptr()),
                      s.data_ptr<float>(), rows, static_cast<int>(K), static_cast<int>(std::min<int64_t>(group, K)),
                      static_cast<int>(G), ue8m0};
  const bool fast = group == 128;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(st, "act_quant", [&](auto t) { launch_act_quant<decltype(t)>(p, fast, stream); });
  return {q, s};
}

// ------------------------------------------------------------------------------------------------
// fp8_block_gemm. Both operands are K-contiguous, the "row.col" layout of mma.sync m16n8k32, so a
// fragment register is 4 consecutive fp8 along K and ldmatrix.x4 (8 rows x 16 bytes per matrix)
// delivers a whole A fragment or two B fragments in one instruction.
//
// A block tile is BM x BN x 128 (BK = one scale block of K). For each K block the warps accumulate
// the raw fp8 product in a fresh fp32 `part`, then "promote" it: acc += part * (sa[m] * sb). The
// tensor cores only ever sum 128 products before the result is scaled and added in full fp32 (FP8
// tensor-core accumulation is not guaranteed to keep fp32 precision over long sums: DeepSeek-V3
// measured about 14 bits on Hopper), and the scales are applied exactly as the block format
// defines them. BN divides 128 so a tile's columns share one
// b_scales row. Out-of-range rows and k are zero-filled by cp.async, so a partial last K block
// contributes exactly 0 * 0 = 0.
//
// Shared memory rows are 128 + 16 bytes: 144 bytes = 36 words, so the 8 row addresses of each
// ldmatrix phase fall on 8 disjoint groups of 4 banks (row * 36 mod 32 = row * 4), and the 16-byte
// cp.async writes of a quarter warp cover one contiguous row. The scales of each K block travel
// through the same cp.async pipeline (4-byte copies) and sit after the tiles of their stage.
//
// Small grids (decode: M <= 64, or narrow N) split K across blockIdx.z, each split writing fp32
// partial sums to a workspace that a second kernel adds in a fixed order (deterministic).
//
// sm_89 and sm_12x run this mma natively; sm_90 has no FP8 mma.sync (its FP8 path is wgmma) and
// ptxas lowers it to exact e4m3 -> f16 conversions and f16 MMAs with fp32 accumulation: same
// numbers, f16 tensor-core rate. The large tile's 32 x 32 warp tiles leave room for those registers.

constexpr int kPitch = 144;

template <int BM_, int BN_, int WARPS_M, int WARPS_N, int STAGES_, int MIN_BLOCKS_, int SPLIT_TARGET_>
struct GemmCfg {
  static constexpr int BM = BM_, BN = BN_, kWarpsN = WARPS_N, STAGES = STAGES_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;
  static constexpr int kSplitTarget = SPLIT_TARGET_;  // aim for this many blocks per SM when splitting K
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr int kScaleOff = (BM + BN) * kPitch;
  static constexpr int kStageBytes = kScaleOff + BM * 4 + 16;
  static constexpr int kSmem = STAGES * kStageBytes;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "a warp tile is whole m16 tiles and pairs of n8 tiles");
  static_assert(128 % BN == 0, "a block tile must not straddle a 128-row block of b_scales");
  static_assert((BM * 8) % kThreads == 0 && (BN * 8) % kThreads == 0, "even cp.async split");
  static_assert(kThreads > BM, "threads 0..BM-1 copy a_scales, thread BM copies the b scale");
  static_assert(MT >= 1 && NT % 2 == 0 && kWarpsN >= 1, "whole warp tiles");
};

using CfgDecode = GemmCfg<16, 64, 1, 4, 4, 4, 2>;    // M <= 16 (both small tiles stay under 48 KB)
using CfgSmall = GemmCfg<32, 64, 2, 2, 3, 4, 2>;     // M <= 64
using CfgLarge4 = GemmCfg<128, 64, 4, 2, 4, 1, 1>;  // 110 KB of smem: sm_90 and the like
using CfgLarge3 = GemmCfg<128, 64, 4, 2, 3, 1, 1>;  // 83 KB: sm_89 / sm_120 (99 KB per block)

struct GemmParams {
  const uint8_t* a;
  const uint8_t* b;
  int64_t lda, ldb;
  const float* as;
  int64_t as0, as1;
  const float* bs;
  int64_t bs0, bs1;
  void* out;  // [M, N] out_dtype, or the float32 split workspace [splits, M, N]
  int M, N, K;
  int kb_total, kb_per_split;
};

[[maybe_unused]] __device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
[[maybe_unused]] __device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
[[maybe_unused]] __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
[[maybe_unused]] __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
[[maybe_unused]] __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) fp8_gemm_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, MT = Cfg::MT, NT = Cfg::NT;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int kb_begin = blockIdx.z * p.kb_per_split;
  const int nkb = min(p.kb_total, kb_begin + p.kb_per_split) - kb_begin;  // >= 1 (host)
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  auto load_stage = [&](int stage, int kb) {
    const uint32_t sa = smem_base + stage * Cfg::kStageBytes;
    const uint32_t sb = sa + BM * kPitch;
    const int k0 = kb * 128;
#pragma unroll
    for (int c = tid; c < BM * 8; c += Cfg::kThreads) {
      const int r = c >> 3, k = k0 + (c & 7) * 16, m = m0 + r;
      const bool ok = m < p.M && k < p.K;  // K % 16 == 0: a 16-byte chunk is all in or all out
      cp_async16(sa + r * kPitch + (c & 7) * 16, p.a + (ok ? m * p.lda + k : 0), ok);
    }
#pragma unroll
    for (int c = tid; c < BN * 8; c += Cfg::kThreads) {
      const int r = c >> 3, k = k0 + (c & 7) * 16, n = n0 + r;
      const bool ok = n < p.N && k < p.K;
      cp_async16(sb + r * kPitch + (c & 7) * 16, p.b + (ok ? n * p.ldb + k : 0), ok);
    }
    const uint32_t ss = sa + Cfg::kScaleOff;
    if (tid < BM) {
      const int m = m0 + tid;
      const bool ok = m < p.M;
      cp_async4(ss + tid * 4, p.as + (ok ? m * p.as0 + kb * p.as1 : 0), ok);
    } else if (tid == BM) {
      cp_async4(ss + BM * 4, p.bs + (n0 / 128) * p.bs0 + kb * p.bs1, true);
    }
  };

  float acc[MT][NT][4] = {};

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkb) load_stage(s, kb_begin + s);
    cp_async_commit();  // always commit, so group i is always K block i
  }

  for (int i = 0; i < nkb; ++i) {
    cp_async_wait<STAGES - 2>();  // K block i has landed (for this thread) ...
    __syncthreads();              // ... for every thread, and block i-1's stage is free again
    {
      const int nx = i + STAGES - 1;
      if (nx < nkb) load_stage(nx % STAGES, kb_begin + nx);
      cp_async_commit();
    }
    const int stage = i % STAGES;
    const uint32_t sa = smem_base + stage * Cfg::kStageBytes;
    const uint32_t sb = sa + BM * kPitch;
    float part[MT][NT][4] = {};
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {  // 4 x k32 = the 128-byte K block
      uint32_t af[MT][4], bf[NT][2];
      // A, 16 rows x 32 k: matrices (rows 0-7 | 8-15) x (k 0-15 | 16-31) = a0, a1, a2, a3; lane l
      // addresses row l & 15, k half l >> 4.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(af[mt], sa + (wm * Cfg::WM + mt * 16 + (lane & 15)) * kPitch + ks * 32 + (lane >> 4) * 16);
      // B, two n8 tiles x 32 k: matrices (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15),
      // (n 8-15, k 16-31) = b0, b1 of tile 2j and b0, b1 of tile 2j+1.
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t r[4];
        ldmatrix_x4(r, sb + (wn * Cfg::WN + j * 16 + (lane >> 4) * 8 + (lane & 7)) * kPitch + ks * 32 +
                           ((lane >> 3) & 1) * 16);
        bf[2 * j][0] = r[0], bf[2 * j][1] = r[1], bf[2 * j + 1][0] = r[2], bf[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          asm volatile(
              "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
              "{%8, %9}, {%0, %1, %2, %3};\n"
              : "+f"(part[mt][nt][0]), "+f"(part[mt][nt][1]), "+f"(part[mt][nt][2]), "+f"(part[mt][nt][3])
              : "r"(af[mt][0]), "r"(af[mt][1]), "r"(af[mt][2]), "r"(af[mt][3]), "r"(bf[nt][0]), "r"(bf[nt][1]));
    }
    // Promotion. C fragment: part[.][.][0..1] are row lane/4, part[.][.][2..3] row lane/4 + 8.
    const float* sc = reinterpret_cast<const float*>(smem + stage * Cfg::kStageBytes + Cfg::kScaleOff);
    const float sbv = sc[BM];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = wm * Cfg::WM + mt * 16 + (lane >> 2);
      const float f0 = sc[r] * sbv, f1 = sc[r + 8] * sbv;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[mt][nt][0] = fmaf(part[mt][nt][0], f0, acc[mt][nt][0]);
        acc[mt][nt][1] = fmaf(part[mt][nt][1], f0, acc[mt][nt][1]);
        acc[mt][nt][2] = fmaf(part[mt][nt][2], f1, acc[mt][nt][2]);
        acc[mt][nt][3] = fmaf(part[mt][nt][3], f1, acc[mt][nt][3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  // Epilogue: element (m, n..n+1) pairs, n even; a pair store when N is even (then it is aligned).
  OutT* out = static_cast<OutT*>(p.out) + static_cast<int64_t>(blockIdx.z) * p.M * p.N;
  const bool pair = (p.N & 1) == 0;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * Cfg::WM + mt * 16 + (lane >> 2) + 8 * h;
      if (m >= p.M) continue;
      OutT* row = out + static_cast<int64_t>(m) * p.N;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = n0 + wn * Cfg::WN + nt * 8 + (lane & 3) * 2;
        const float x = acc[mt][nt][2 * h], y = acc[mt][nt][2 * h + 1];
        if (pair) {
          if (n < p.N) store2(row + n, x, y);
        } else {
          if (n < p.N) store1(row + n, x);
          if (n + 1 < p.N) store1(row + n + 1, y);
        }
      }
    }
#else
  __trap();  // the host never launches this below sm_89 (it checks the loaded binary's arch)
#endif
}

template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const float* __restrict__ ws, T* __restrict__ out,
                                                            int64_t mn, int splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = ws[i];
    for (int z = 1; z < splits; ++z) s += ws[z * mn + i];  // fixed order: deterministic
    store1(out + i, s);
  }
}

template <class Cfg, typename OutT>
void launch_gemm_kernel(const GemmParams& p, dim3 grid, cudaStream_t stream) {
  auto kernel = fp8_gemm_kernel<Cfg, OutT>;
  if constexpr (Cfg::kSmem > 48 * 1024)  // only the large-M tiles, whose runtime dwarfs this call
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Cfg, typename OutT>
void run_gemm(GemmParams p, const at::Tensor& out, int sms, cudaStream_t stream) {
  const int64_t gm = (p.M + Cfg::BM - 1) / Cfg::BM, gn = (p.N + Cfg::BN - 1) / Cfg::BN;
  TORCH_CHECK(gn <= 65535, "fp8_block_gemm: N (", p.N, ") is too large for one launch");
  // Split K only when the tiles alone leave SMs idle, keeping >= 2 K blocks per split.
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(Cfg::kSplitTarget * sms / (gm * gn), p.kb_total / 2));
  p.kb_per_split = static_cast<int>((p.kb_total + splits - 1) / splits);
  splits = (p.kb_total + p.kb_per_split - 1) / p.kb_per_split;  // no empty split
  // grid.x walks M: the blocks resident at once share few b tiles, which L2 then serves to all.
  const dim3 grid(static_cast<unsigned>(gm), static_cast<unsigned>(gn), static_cast<unsigned>(splits));
  if (splits == 1) {
    p.out = out.data_ptr();
    launch_gemm_kernel<Cfg, OutT>(p, grid, stream);
    return;
  }
  const at::Tensor ws = at::empty({splits, p.M, p.N}, out.options().dtype(at::kFloat));
  p.out = ws.data_ptr();
  launch_gemm_kernel<Cfg, float>(p, grid, stream);
  const int64_t mn = static_cast<int64_t>(p.M) * p.N;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((mn + 255) / 256, static_cast<int64_t>(sms) * 8));
  splitk_reduce_kernel<OutT><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), static_cast<OutT*>(out.data_ptr()),
                                                         mn, static_cast<int>(splits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename OutT>
void dispatch_gemm(const GemmParams& p, const at::Tensor& out, const cudaDeviceProp& prop, cudaStream_t stream) {
  const int sms = prop.multiProcessorCount;
  if (p.M <= 16) run_gemm<CfgDecode, OutT>(p, out, sms, stream);
  else if (p.M <= 64) run_gemm<CfgSmall, OutT>(p, out, sms, stream);
  else if (prop.sharedMemPerBlockOptin >= static_cast<size_t>(CfgLarge4::kSmem))
    run_gemm<CfgLarge4, OutT>(p, out, sms, stream);
  else run_gemm<CfgLarge3, OutT>(p, out, sms, stream);
}

// An sm_89 GPU runs the sm_80 binary when the build has no sm_89 code (sm_90 binaries do not run
// there), and that binary has no FP8 MMA: refuse rather than launch it.
void check_fp8_mma(const cudaDeviceProp& prop) {
  TORCH_CHECK(prop.major > 8 || (prop.major == 8 && prop.minor >= 9), "fp8_block_gemm: FP8 tensor cores need sm_89+, ",
              "but ", prop.name, " is sm_", prop.major, prop.minor);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fp8_gemm_kernel<CfgDecode, float>));
  TORCH_CHECK(attr.binaryVersion >= 89, "fp8_block_gemm: FP8 tensor cores need sm_89+ code, but this build runs ",
              "its sm_", attr.binaryVersion, " binary on ", prop.name, " (sm_", prop.major, prop.minor, "); add \"",
              prop.major, prop.minor, "\" to cuda_archs in csrc/build.json");
}

at::Tensor fp8_block_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                               const at::Tensor& b_scales, at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2, "fp8_block_gemm: a must be [M, K], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "fp8_block_gemm: b must be [N, K], got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn, "fp8_block_gemm: a must be float8_e4m3fn, got ", a.scalar_type());
  TORCH_CHECK(a.is_cuda(), "fp8_block_gemm: the CUDA kernel needs CUDA tensors, got a on ", a.device());
  const auto dev = a.device();
  auto check_aux = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
    TORCH_CHECK(t.device() == dev, "fp8_block_gemm: ", name, " must be on a's device ", dev, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == want, "fp8_block_gemm: ", name, " must be ", want, ", got ", t.scalar_type());
  };
  check_aux(b, "b", at::kFloat8_e4m3fn);
  check_aux(a_scales, "a_scales", at::kFloat);
  check_aux(b_scales, "b_scales", at::kFloat);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "fp8_block_gemm: out_dtype must be bfloat16, float16 or float32, got ", out_dtype);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b.size(1) == K, "fp8_block_gemm: b must be [N, K] with a's K (", K, "), got ", b.sizes());
  TORCH_CHECK(M <= kMaxDim && N <= kMaxDim && K <= kMaxDim,
              "fp8_block_gemm: M, N and K must be below 2^31 - 4096, got a ", a.sizes(), " and b ", b.sizes());
  const int64_t kb = (K + 127) / 128;
  TORCH_CHECK(a_scales.dim() == 2 && a_scales.size(0) == M && a_scales.size(1) == kb,
              "fp8_block_gemm: a_scales must be [M, ceil(K/128)] = [", M, ", ", kb, "], got ", a_scales.sizes());
  TORCH_CHECK(b_scales.dim() == 2 && b_scales.size(0) == (N + 127) / 128 && b_scales.size(1) == kb,
              "fp8_block_gemm: b_scales must be [ceil(N/128), ceil(K/128)] = [", (N + 127) / 128, ", ", kb,
              "], got ", b_scales.sizes());
  const auto opts = a.options().dtype(out_dtype);
  if (M == 0 || N == 0) return at::empty({M, N}, opts);
  if (K == 0) return at::zeros({M, N}, opts);
  TORCH_CHECK(K % 16 == 0, "fp8_block_gemm: K (", K, ") must be a multiple of 16");
  // A dim of size 1 is only indexed at 0: its stride does not matter.
  const int64_t lda = M == 1 ? 0 : a.stride(0), ldb = N == 1 ? 0 : b.stride(0);
  TORCH_CHECK(a.stride(1) == 1 && lda % 16 == 0, "fp8_block_gemm: a must have unit stride along K and a row ",
              "stride that is a multiple of 16, got strides ", a.strides());
  TORCH_CHECK(b.stride(1) == 1 && ldb % 16 == 0, "fp8_block_gemm: b must have unit stride along K and a row ",
              "stride that is a multiple of 16, got strides ", b.strides());
  TORCH_CHECK(aligned_to(a.data_ptr(), 16), "fp8_block_gemm: a's data must be 16-byte aligned");
  TORCH_CHECK(aligned_to(b.data_ptr(), 16), "fp8_block_gemm: b's data must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(dev);
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  check_fp8_mma(prop);
  auto out = at::empty({M, N}, opts);
  const GemmParams p{static_cast<const uint8_t*>(a.data_ptr()), static_cast<const uint8_t*>(b.data_ptr()), lda, ldb,
                     a_scales.data_ptr<float>(), a_scales.stride(0), a_scales.stride(1), b_scales.data_ptr<float>(),
                     b_scales.stride(0), b_scales.stride(1), nullptr, static_cast<int>(M), static_cast<int>(N),
                     static_cast<int>(K), static_cast<int>(kb), static_cast<int>(kb)};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(out_dtype, "fp8_block_gemm",
                            [&](auto t) { dispatch_gemm<decltype(t)>(p, out, prop, stream); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_weight_dequant", &weight_dequant_cuda);
  m.impl("_cuda_act_quant", &act_quant_cuda);
  m.impl("_cuda_fp8_block_gemm", &fp8_block_gemm_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("weight_dequant", &weight_dequant_cuda);
  m.impl("act_quant", &act_quant_cuda);
  m.impl("fp8_block_gemm", &fp8_block_gemm_cuda);
#endif
}

}  // namespace quickllm
