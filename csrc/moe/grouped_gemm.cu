// Grouped GEMMs of a mixture-of-experts layer: the rows of each expert, consecutive in the sorted
// activations, times that expert's weight. Semantics: quickllm_kernels/moe/reference.py.
//
// grouped_mm        y [S, N]: rows offs[e-1]:offs[e] of y = those rows of x [S, K] @ w[e]^T, w [E, N, K]
//                   with any strides (the backward's dx = dy @ w[e] passes w.transpose(1, 2)).
// grouped_mm_wgrad  dw [E, N, K], dw[e] = dy[rows of e]^T @ x[rows of e].
// fp8_grouped_gemm  grouped_mm of float8_e4m3fn a and w with DeepSeek-V3 block scales: fp8.cu's
//                   fp8_block_gemm for each expert's rows, in one launch.
//
// No host sync: the host never reads offs. The forward GEMMs launch an upper bound of row tiles,
// cdiv(S, BM) + min(E, S - 1) (each non-empty segment adds at most one partial tile), times the N
// tiles, and each block finds its segment and row tile by scanning offs on the device, or exits.
// The segments are the E experts plus the rows after offs[E-1], which belong to no expert and are
// written as zeros, so every row of y is written exactly once. A malformed offs cannot send a block
// out of bounds: each value is clamped to [0, S] and the segment ends are their running max. The
// wgrad grid is (N tiles x K tiles, E); a block reduces over its expert's rows (none: zeros).
//
// 16-bit inputs run on the tensor cores (mma.sync m16n8k16), float32 on plain FMAs (no TF32, so it
// is as exact as the reference's float32 matmul up to summation order); both accumulate in fp32
// and round once to the output type (round to nearest even, as the reference's .to()). Shared-memory
// tiles are filled by cp.async (16-byte chunks, zero-filled past every edge, STAGES deep) when each
// operand is 16-byte aligned with its contiguous dim a multiple of 16 bytes; otherwise by masked
// scalar loads that take any strides. Each operand keeps the layout it has in memory: "K-major"
// ([rows][BK], the reduction dim contiguous) or "MN-major" ([BK][rows]); ldmatrix, with .trans for
// MN-major, turns either into mma fragments. So w [E, N, K] and its transpose both stream
// contiguously, and the wgrad's operands (dy and x, reduced over their rows) are MN-major.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/host_checks.h"
#include "csrc/common/mma.cuh"
#include "csrc/common/vec.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace quickllm {
namespace {

// Dims are int32 in the kernels; the margin keeps row and tile arithmetic (end - start + BM) in range.
constexpr int64_t kMaxDim = std::numeric_limits<int>::max() - 4096;

// ------------------------------------------------------------------------------------------------
// Device helpers.

// fp32 -> output type, round to nearest even (what torch's .to() does); store2 needs p 2-aligned.
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
[[maybe_unused]] __device__ __forceinline__ void store2(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void store2(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// ------------------------------------------------------------------------------------------------
// Segments from offs, on the device. All values are >= 0, so 0 is the identity of max and of +.

__device__ __forceinline__ int clamp_row(int32_t v, int S) { return min(max(v, 0), S); }

struct MaxOp {
  __device__ int operator()(int a, int b) const { return max(a, b); }
};
struct SumOp {
  __device__ int operator()(int a, int b) const { return a + b; }
};

// Exclusive scan of one value per thread in thread order; *total gets the whole block's.
template <int THREADS, class Op>
__device__ int block_scan(int v, Op op, int* total) {
  __shared__ int warp_tot[THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v = op(v, u);
  }
  if (lane == 31) warp_tot[warp] = v;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) {
    if (w == warp) before = all;
    all = op(all, warp_tot[w]);
  }
  __syncthreads();  // warp_tot is free for the next scan
  const int prev = __shfl_up_sync(0xffffffffu, v, 1);
  *total = all;
  return op(before, lane == 0 ? 0 : prev);
}

// Rows [row0, row1) of segment seg: an expert (seg < E) or the rows after the last one (seg == E).
struct Tile {
  int seg, row0, row1;
};

// The `tile`-th row tile of bm rows, counting the tiles of segments 0..E in order; false past the
// last. Thread t owns a run of consecutive segments: one max-scan gives each run's start row, one
// sum-scan its first tile, and the owner of `tile` walks its run again to find it.
template <int THREADS>
__device__ bool find_tile(const int32_t* __restrict__ offs, int E, int S, int bm, int tile, Tile* out) {
  __shared__ Tile found;
  const int per = (E + THREADS) / THREADS;  // E + 1 segments
  const int i0 = min(static_cast<int>(threadIdx.x) * per, E + 1), i1 = min(i0 + per, E + 1);
  auto end_of = [&](int i) { return i < E ? clamp_row(__ldg(offs + i), S) : S; };
  int hi = 0, total;
  for (int i = i0; i < i1; ++i) hi = max(hi, end_of(i));
  const int first = block_scan<THREADS>(hi, MaxOp{}, &total);
  int start = first, count = 0;
  for (int i = i0; i < i1; ++i) {
    const int end = max(start, end_of(i));
    count += (end - start + bm - 1) / bm;
    start = end;
  }
  int base = block_scan<THREADS>(count, SumOp{}, &total);
  if (tile >= total) return false;  // uniform over the block
  if (tile >= base && tile < base + count) {
    start = first;
    for (int i = i0; i < i1; ++i) {
      const int end = max(start, end_of(i)), n = (end - start + bm - 1) / bm;
      if (tile < base + n) {
        found = Tile{i, start + (tile - base) * bm, end};
        break;
      }
      base += n;
      start = end;
    }
  }
  __syncthreads();
  *out = found;
  return true;
}

// ------------------------------------------------------------------------------------------------
// One output tile C [BM, BN] = A [BM, kdim] B [BN, kdim]^T, shared by grouped_mm and its wgrad.

template <int BM_, int BN_, int BK_, int WARPS_M, int WARPS_N, int STAGES_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_, kWarpsN = WARPS_N;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
};
using CfgMma = Cfg<64, 128, 32, 2, 4, 3>;    // 16-bit: 8 warps of 32 x 32
using CfgDecode = Cfg<16, 64, 64, 1, 4, 4>;  // 16-bit, few rows per expert: 4 warps of 16 x 16
using CfgFma = Cfg<64, 64, 16, 2, 4, 3>;     // float32: 256 threads of 4 x 4 outputs
constexpr int kFmaT = 4;

// A [R, BK] operand tile in shared memory. Rows are padded by 16 bytes, so the eight 16-byte row
// reads of an ldmatrix phase hit eight disjoint groups of four banks (pitch = 4 mod 32 words, or
// 20 for K-major 16-bit rows of 64 bytes).
template <typename T, int R, int BK, bool KMAJ>
struct SmemTile {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kPitch = (KMAJ ? BK : R) + V;
  static constexpr int kElems = (KMAJ ? R : BK) * kPitch;
  __device__ static int at(int r, int k) { return KMAJ ? r * kPitch + k : k * kPitch + r; }
};

template <typename T, class C, bool A_KMAJ, bool B_KMAJ>
struct Layout {
  using LA = SmemTile<T, C::BM, C::BK, A_KMAJ>;
  using LB = SmemTile<T, C::BN, C::BK, B_KMAJ>;
  static constexpr int kStage = LA::kElems + LB::kElems;  // elements
  static constexpr int kSmem = C::STAGES * kStage * static_cast<int>(sizeof(T));
  static_assert(LA::kPitch * sizeof(T) % 16 == 0 && LB::kPitch * sizeof(T) % 16 == 0, "16-byte aligned rows");
  static_assert(kSmem <= 48 * 1024, "the 16-bit and float32 tiles need no shared-memory opt-in");
};

// Element (r, k) of an operand tile is p[r * sr + k * sk], valid for r < rows and k < kdim.
template <typename T>
struct Operand {
  const T* p;
  int64_t sr, sk;
  int rows;
};
template <typename T>
struct Output {
  T* p;  // element (m, n) at p[m * ld + n], written for m < rows, n < cols
  int64_t ld;
  int rows, cols;
  bool pair;  // ld and p even: two adjacent columns in one store
};

// A warp's m16n8 accumulator tiles, its warp tile at (m0, n0) of out. C fragment: acc[.][.][0..1]
// are row lane/4, columns 2 (lane%4) + {0, 1}; acc[.][.][2..3] the same columns of row lane/4 + 8.
template <int MT, int NT, typename T>
__device__ __forceinline__ void store_frags(const float (&acc)[MT][NT][4], const Output<T>& out, int m0, int n0) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + mt * 16 + (lane >> 2) + 8 * h;
      if (m >= out.rows) continue;
      T* row = out.p + m * out.ld;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = n0 + nt * 8 + (lane & 3) * 2;
        const float x = acc[mt][nt][2 * h], y = acc[mt][nt][2 * h + 1];
        if (out.pair) {
          if (n < out.cols) store2(row + n, x, y);  // cols is even too
        } else {
          if (n < out.cols) store1(row + n, x);
          if (n + 1 < out.cols) store1(row + n + 1, y);
        }
      }
    }
}

template <typename T, int R, int BK, int THREADS, bool KMAJ, bool VEC>
__device__ __forceinline__ void load_tile(T* s, const Operand<T>& o, int k0, int kdim) {
  using L = SmemTile<T, R, BK, KMAJ>;
  constexpr int V = L::V, kRowChunks = (KMAJ ? BK : R) / V, kChunks = (KMAJ ? R : BK) * kRowChunks;
  static_assert(kChunks % THREADS == 0, "even split of the chunks");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int srow = c / kRowChunks, scol = (c % kRowChunks) * V;
    const int r = KMAJ ? srow : scol, k = k0 + (KMAJ ? scol : srow);  // the chunk's first element
    T* dst = s + srow * L::kPitch + scol;
    if constexpr (VEC) {
      // The contiguous dim is a multiple of V: a chunk is wholly inside or outside.
      const bool ok = r < o.rows && k < kdim;
      const T* src = o.p + (!ok ? 0 : KMAJ ? r * o.sr + k : k * o.sk + r);
      cp_async16(smem_addr(dst), src, ok);
    } else {
      Pack<T, V> v;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int rj = KMAJ ? r : r + j, kj = KMAJ ? k + j : k;
        v.v[j] = rj < o.rows && kj < kdim ? o.p[rj * o.sr + kj * o.sk] : T(0.f);
      }
      *reinterpret_cast<Pack<T, V>*>(dst) = v;
    }
  }
}

template <typename T, class C, bool A_KMAJ, bool B_KMAJ, bool VEC>
__device__ __forceinline__ void gemm_tile(uint8_t* smem, const Operand<T>& a, const Operand<T>& b, int kdim,
                                          const Output<T>& out) {
  using Lay = Layout<T, C, A_KMAJ, B_KMAJ>;
  using LA = typename Lay::LA;
  using LB = typename Lay::LB;
  constexpr bool kMma = !std::is_same_v<T, float>;
  constexpr int BK = C::BK, STAGES = C::STAGES;
  T* const tiles = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const int ktiles = (kdim + BK - 1) / BK;

  auto load_stage = [&](int stage, int kt) {
    T* sa = tiles + stage * Lay::kStage;
    load_tile<T, C::BM, BK, C::kThreads, A_KMAJ, VEC>(sa, a, kt * BK, kdim);
    load_tile<T, C::BN, BK, C::kThreads, B_KMAJ, VEC>(sa + LA::kElems, b, kt * BK, kdim);
  };

  // mma: acc[mt][nt] is the m16n8 tile (wm*WM + mt*16, wn*WN + nt*8); FMA: acc[i][j] is element
  // (ty + i*BM/4, tx + j*BN/4) with (ty, tx) = (tid / 16, tid % 16).
  constexpr int AM = kMma ? C::MT : kFmaT, AN = kMma ? C::NT : kFmaT, AE = kMma ? 4 : 1;
  float acc[AM][AN][AE] = {};
  // ldmatrix row this lane addresses: A (m, k) and B (n, k) within a 16 x 16 step, per layout. x4
  // loads A's a0..a3 (m 0-7 | 8-15) x (k 0-7 | 8-15) and B's b0, b1 of two n8 tiles.
  const int a_r = A_KMAJ ? (lane & 15) : ((lane >> 3) & 1) * 8;
  const int a_k = A_KMAJ ? (lane >> 4) * 8 : (lane >> 4) * 8 + (lane & 7);
  const int b_r = B_KMAJ ? (lane >> 4) * 8 + (lane & 7) : (lane >> 4) * 8;
  const int b_k = B_KMAJ ? ((lane >> 3) & 1) * 8 : ((lane >> 3) & 1) * 8 + (lane & 7);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();  // always commit, so group i is always K tile i
  }
  for (int i = 0; i < ktiles; ++i) {
    cp_async_wait<STAGES - 2>();  // K tile i has landed (for this thread) ...
    __syncthreads();              // ... for every thread, and tile i-1's stage is free again
    if (i + STAGES - 1 < ktiles) load_stage((i + STAGES - 1) % STAGES, i + STAGES - 1);
    cp_async_commit();
    const T* sa = tiles + (i % STAGES) * Lay::kStage;
    const T* sb = sa + LA::kElems;
    if constexpr (kMma) {
#pragma unroll
      for (int ks = 0; ks < BK; ks += 16) {
        uint32_t af[C::MT][4], bf[C::NT][2];
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
          ldmatrix_x4<!A_KMAJ>(af[mt], smem_addr(sa + LA::at(wm * C::WM + mt * 16 + a_r, ks + a_k)));
#pragma unroll
        for (int j = 0; j < C::NT / 2; ++j) {
          uint32_t r[4];
          ldmatrix_x4<!B_KMAJ>(r, smem_addr(sb + LB::at(wn * C::WN + j * 16 + b_r, ks + b_k)));
          bf[2 * j][0] = r[0], bf[2 * j][1] = r[1], bf[2 * j + 1][0] = r[2], bf[2 * j + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::NT; ++nt) mma16816<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
      }
    } else {
      const int ty = tid / 16, tx = tid % 16;
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        float av[kFmaT], bv[kFmaT];
#pragma unroll
        for (int j = 0; j < kFmaT; ++j) {
          av[j] = sa[LA::at(ty + j * (C::BM / kFmaT), k)];
          bv[j] = sb[LB::at(tx + j * (C::BN / kFmaT), k)];
        }
#pragma unroll
        for (int y = 0; y < kFmaT; ++y)
#pragma unroll
          for (int x = 0; x < kFmaT; ++x) acc[y][x][0] = fmaf(av[y], bv[x], acc[y][x][0]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  if constexpr (kMma) {
    store_frags(acc, out, wm * C::WM, wn * C::WN);
  } else {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int y = 0; y < kFmaT; ++y) {
      const int m = ty + y * (C::BM / kFmaT);
      if (m >= out.rows) continue;
#pragma unroll
      for (int x = 0; x < kFmaT; ++x) {
        const int n = tx + x * (C::BN / kFmaT);
        if (n < out.cols) store1(out.p + m * out.ld + n, acc[y][x][0]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// grouped_mm and grouped_mm_wgrad kernels: a tile's operands and output, then gemm_tile.

template <typename T>
struct MmParams {
  const T* x;
  int64_t sx0, sx1;  // x [S, K]
  const T* w;
  int64_t sw0, sw1, sw2;  // w [E, N, K]
  const int32_t* offs;
  T* y;  // [S, N] contiguous
  int S, N, K, E;
};

template <typename T, class C, bool B_KMAJ, bool VEC>
__global__ void __launch_bounds__(C::kThreads) grouped_mm_kernel(const MmParams<T> p) {
  extern __shared__ __align__(16) uint8_t smem[];
  Tile t;
  if (!find_tile<C::kThreads>(p.offs, p.E, p.S, C::BM, blockIdx.x, &t)) return;
  const int n0 = blockIdx.y * C::BN, rows = t.row1 - t.row0;
  const bool expert = t.seg < p.E;  // else the rows after the last expert: K = 0 writes zeros
  const Operand<T> a{p.x + t.row0 * p.sx0, p.sx0, p.sx1, rows};
  const Operand<T> b{p.w + (expert ? t.seg * p.sw0 : 0) + n0 * p.sw1, p.sw1, p.sw2, p.N - n0};
  const Output<T> out{p.y + t.row0 * static_cast<int64_t>(p.N) + n0, p.N, rows, p.N - n0, (p.N & 1) == 0};
  gemm_tile<T, C, true, B_KMAJ, VEC>(smem, a, b, expert ? p.K : 0, out);
}

template <typename T>
struct WgradParams {
  const T* dy;
  int64_t sd0, sd1;  // dy [S, N]
  const T* x;
  int64_t sx0, sx1;  // x [S, K]
  const int32_t* offs;
  T* dw;  // [E, N, K] contiguous
  int S, N, K, k_tiles;
};

// dw[e] tile (n0, k0): A = dy^T (rows n, reduced over the expert's rows), B = x^T (rows k).
template <typename T, class C, bool VEC>
__global__ void __launch_bounds__(C::kThreads) grouped_mm_wgrad_kernel(const WgradParams<T> p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int e = blockIdx.y;
  int hi = 0, r0;
  for (int i = threadIdx.x; i < e; i += C::kThreads) hi = max(hi, clamp_row(__ldg(p.offs + i), p.S));
  block_scan<C::kThreads>(hi, MaxOp{}, &r0);  // the running max of the clamped ends before e
  const int r1 = max(r0, clamp_row(__ldg(p.offs + e), p.S));
  const int n0 = (blockIdx.x / p.k_tiles) * C::BM, k0 = (blockIdx.x % p.k_tiles) * C::BN;
  const Operand<T> a{p.dy + r0 * p.sd0 + n0 * p.sd1, p.sd1, p.sd0, p.N - n0};
  const Operand<T> b{p.x + r0 * p.sx0 + k0 * p.sx1, p.sx1, p.sx0, p.K - k0};
  const Output<T> out{p.dw + (static_cast<int64_t>(e) * p.N + n0) * p.K + k0, p.K, p.N - n0, p.K - k0,
                      (p.K & 1) == 0};
  gemm_tile<T, C, false, false, VEC>(smem, a, b, r1 - r0, out);
}

// ------------------------------------------------------------------------------------------------
// fp8_grouped_gemm: fp8.cu's fp8_block_gemm tile (read its comment there) with this file's
// tile-to-expert mapping. Per 128-wide K block the tensor cores sum the raw e4m3 products into a
// fresh fp32 `part`, which is then scaled by a_scales[m, kb] * w_scales[e, n / 128, kb] and added
// to the fp32 accumulator: the tensor cores never sum more than 128 products, and the scales apply
// exactly as the block format defines them. Rows are 128 + 16 bytes (conflict-free ldmatrix); a
// stage's scales follow its tiles. sm_90 has no FP8 mma.sync: ptxas lowers it to exact e4m3 -> f16
// conversions and f16 MMAs with fp32 accumulation, the same numbers.

constexpr int kFp8Pitch = 144;

template <int BM_, int BN_, int WARPS_M, int WARPS_N, int STAGES_>
struct Fp8Cfg {
  static constexpr int BM = BM_, BN = BN_, kWarpsN = WARPS_N, STAGES = STAGES_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
  static constexpr int kScaleOff = (BM + BN) * kFp8Pitch;
  static constexpr int kStageBytes = kScaleOff + BM * 4 + 16;
  static constexpr int kSmem = STAGES * kStageBytes;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "a warp tile is whole m16 tiles and pairs of n8 tiles");
  static_assert(128 % BN == 0, "a block tile must not straddle a 128-row block of w_scales");
  static_assert((BM * 8) % kThreads == 0 && (BN * 8) % kThreads == 0, "even cp.async split");
  static_assert(kThreads > BM, "threads 0..BM-1 copy a_scales, thread BM copies the w scale");
  static_assert(MT >= 1 && NT % 2 == 0 && kWarpsN >= 1, "whole warp tiles");
};
using Fp8Decode = Fp8Cfg<16, 64, 1, 4, 4>;  // 45 KB of shared memory
using Fp8Large = Fp8Cfg<64, 64, 2, 2, 4>;   // 73 KB: opt-in (sm_89+ has at least 99 KB)

struct Fp8Params {
  const uint8_t* a;
  int64_t lda;
  const float* as;
  int64_t as0, as1;
  const uint8_t* w;
  int64_t sw0, sw1;  // expert and row strides of w; K is contiguous
  const float* ws;
  int64_t ws0, ws1, ws2;
  const int32_t* offs;
  void* out;  // [S, N] contiguous
  int S, N, K, E, kb_total;
};

template <class C, typename OutT>
__global__ void __launch_bounds__(C::kThreads) fp8_grouped_kernel(const Fp8Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr int BM = C::BM, BN = C::BN, STAGES = C::STAGES, MT = C::MT, NT = C::NT;
  extern __shared__ __align__(16) uint8_t smem[];
  Tile t;
  if (!find_tile<C::kThreads>(p.offs, p.E, p.S, BM, blockIdx.x, &t)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const int n0 = blockIdx.y * BN, rows = t.row1 - t.row0;
  const bool expert = t.seg < p.E;
  const int nkb = expert ? p.kb_total : 0;  // the rows after the last expert get zeros
  const uint8_t* a = p.a + t.row0 * p.lda;
  const float* as = p.as + t.row0 * p.as0;
  const uint8_t* b = p.w + (expert ? t.seg * p.sw0 : 0) + n0 * p.sw1;
  const float* bs = p.ws + (expert ? t.seg * p.ws0 : 0) + (n0 / 128) * p.ws1;
  const uint32_t smem_base = smem_addr(smem);

  auto load_stage = [&](int stage, int kb) {
    const uint32_t sa = smem_base + stage * C::kStageBytes, sb = sa + BM * kFp8Pitch;
    const int k0 = kb * 128;
#pragma unroll
    for (int c = tid; c < BM * 8; c += C::kThreads) {
      const int r = c >> 3, k = k0 + (c & 7) * 16;
      const bool ok = r < rows && k < p.K;  // K % 16 == 0: a 16-byte chunk is all in or all out
      cp_async16(sa + r * kFp8Pitch + (c & 7) * 16, a + (ok ? r * p.lda + k : 0), ok);
    }
#pragma unroll
    for (int c = tid; c < BN * 8; c += C::kThreads) {
      const int r = c >> 3, k = k0 + (c & 7) * 16;
      const bool ok = n0 + r < p.N && k < p.K;
      cp_async16(sb + r * kFp8Pitch + (c & 7) * 16, b + (ok ? r * p.sw1 + k : 0), ok);
    }
    const uint32_t ss = sa + C::kScaleOff;
    if (tid < BM) {
      const bool ok = tid < rows;
      cp_async4(ss + tid * 4, as + (ok ? tid * p.as0 + kb * p.as1 : 0), ok);
    } else if (tid == BM) {
      cp_async4(ss + BM * 4, bs + kb * p.ws2, true);
    }
  };

  float acc[MT][NT][4] = {};
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkb) load_stage(s, s);
    cp_async_commit();
  }
  for (int i = 0; i < nkb; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (i + STAGES - 1 < nkb) load_stage((i + STAGES - 1) % STAGES, i + STAGES - 1);
    cp_async_commit();
    const int stage = i % STAGES;
    const uint32_t sa = smem_base + stage * C::kStageBytes, sb = sa + BM * kFp8Pitch;
    float part[MT][NT][4] = {};
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {  // 4 x k32 = the 128-byte K block
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4<false>(af[mt], sa + (wm * C::WM + mt * 16 + (lane & 15)) * kFp8Pitch + ks * 32 + (lane >> 4) * 16);
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t r[4];
        ldmatrix_x4<false>(r, sb + (wn * C::WN + j * 16 + (lane >> 4) * 8 + (lane & 7)) * kFp8Pitch + ks * 32 +
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
    const float* sc = reinterpret_cast<const float*>(smem + stage * C::kStageBytes + C::kScaleOff);
    const float sbv = sc[BM];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = wm * C::WM + mt * 16 + (lane >> 2);
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
  cp_async_wait<0>();

  const Output<OutT> out{static_cast<OutT*>(p.out) + t.row0 * static_cast<int64_t>(p.N) + n0, p.N, rows, p.N - n0,
                         (p.N & 1) == 0};
  store_frags(acc, out, wm * C::WM, wn * C::WN);
#else
  __trap();  // the host never launches this below sm_89 (it checks the loaded binary's arch)
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side.

void check_offs(const char* op, const at::Tensor& offs, int64_t E, const at::Tensor& ref) {
  TORCH_CHECK(offs.device() == ref.device(), op, ": offs must be on the inputs' device ", ref.device(), ", got ",
              offs.device());
  TORCH_CHECK(offs.scalar_type() == at::kInt, op, ": offs must be int32, got ", offs.scalar_type());
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == E && (E == 1 || offs.stride(0) == 1), op,
              ": offs must be a contiguous [E] = [", E, "] tensor, got shape ", offs.sizes(), " and strides ",
              offs.strides());
}

// Row tiles of the grid (S >= 1): with n <= min(E + 1, S) non-empty segments of lengths l_i summing
// to S, sum cdiv(l_i, BM) <= floor((S + n (BM - 1)) / BM) = n + floor((S - n) / BM) <= cdiv(S, BM) + n - 1.
unsigned checked_row_tiles(const char* op, int64_t S, int64_t E, int bm) {
  const int64_t tiles = (S + bm - 1) / bm + std::min(E, S - 1);
  TORCH_CHECK(tiles <= std::numeric_limits<int>::max(), op, ": S (", S, ") and E (", E,
              ") are too large for one launch");
  return static_cast<unsigned>(tiles);
}

template <typename Kernel, typename P>
void launch(Kernel kernel, dim3 grid, int threads, int smem, const P& p, cudaStream_t stream) {
  if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// w K-major or N-major with cp.async, else scalar loads into a K-major tile.
template <typename T, class C>
void launch_mm(const MmParams<T>& p, bool k_major, bool n_major, cudaStream_t stream) {
  const int64_t gn = (p.N + C::BN - 1) / C::BN;
  TORCH_CHECK(gn <= 65535, "grouped_mm: N (", p.N, ") is too large for one launch");
  const dim3 grid(checked_row_tiles("grouped_mm", p.S, p.E, C::BM), static_cast<unsigned>(gn));
  constexpr int kSmemK = Layout<T, C, true, true>::kSmem, kSmemN = Layout<T, C, true, false>::kSmem;
  if (k_major) launch(grouped_mm_kernel<T, C, true, true>, grid, C::kThreads, kSmemK, p, stream);
  else if (n_major) launch(grouped_mm_kernel<T, C, false, true>, grid, C::kThreads, kSmemN, p, stream);
  else launch(grouped_mm_kernel<T, C, true, false>, grid, C::kThreads, kSmemK, p, stream);
}

at::Tensor grouped_mm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs) {
  TORCH_CHECK(x.is_cuda(), "grouped_mm: the CUDA kernel needs CUDA tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 2, "grouped_mm: x must be [S, K], got ", x.sizes());
  check_float("grouped_mm", x, "x");
  const int64_t S = x.size(0), K = x.size(1);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == K, "grouped_mm: w must be [E, N, K] with x's K = ", K, ", got ",
              w.sizes());
  TORCH_CHECK(w.device() == x.device(), "grouped_mm: w must be on x's device ", x.device(), ", got ", w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "grouped_mm: w must have x's dtype ", x.scalar_type(), ", got ",
              w.scalar_type());
  const int64_t E = w.size(0), N = w.size(1);
  TORCH_CHECK(E >= 1, "grouped_mm: w must hold at least one expert, got ", w.sizes());
  check_offs("grouped_mm", offs, E, x);
  TORCH_CHECK(S <= kMaxDim && N <= kMaxDim && K <= kMaxDim && E <= kMaxDim,
              "grouped_mm: dims must be below 2^31 - 4096, got x ", x.sizes(), " and w ", w.sizes());
  auto y = at::empty({S, N}, x.options());
  if (S == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(x.scalar_type(), "grouped_mm", [&](auto tag) {
    using T = decltype(tag);
    const MmParams<T> p{static_cast<const T*>(x.data_ptr()), stride_of(x, 0), stride_of(x, 1),
                        static_cast<const T*>(w.data_ptr()), stride_of(w, 0), stride_of(w, 1), stride_of(w, 2),
                        offs.data_ptr<int32_t>(), static_cast<T*>(y.data_ptr()), static_cast<int>(S),
                        static_cast<int>(N), static_cast<int>(K), static_cast<int>(E)};
    // cp.async needs every 16-byte chunk aligned and wholly in or out of its row.
    constexpr int V = 16 / sizeof(T);
    const bool vec = p.sx1 == 1 && p.sx0 % V == 0 && K % V == 0 && aligned16(p.x) && p.sw0 % V == 0 &&
                     aligned16(p.w);
    const bool k_major = vec && p.sw2 == 1 && p.sw1 % V == 0;
    const bool n_major = vec && p.sw1 == 1 && p.sw2 % V == 0 && N % V == 0;
    if constexpr (std::is_same_v<T, float>) launch_mm<T, CfgFma>(p, k_major, n_major, stream);
    else if (S <= 32 * E) launch_mm<T, CfgDecode>(p, k_major, n_major, stream);  // few rows per expert
    else launch_mm<T, CfgMma>(p, k_major, n_major, stream);
  });
  return y;
}

template <typename T, class C, bool VEC>
void launch_wgrad(const WgradParams<T>& p, int64_t E, cudaStream_t stream) {
  const int64_t tiles = static_cast<int64_t>((p.N + C::BM - 1) / C::BM) * p.k_tiles;
  TORCH_CHECK(tiles <= std::numeric_limits<int>::max(), "grouped_mm_wgrad: N x K (", p.N, " x ", p.K,
              ") is too large for one launch");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(E));
  launch(grouped_mm_wgrad_kernel<T, C, VEC>, grid, C::kThreads, Layout<T, C, false, false>::kSmem, p, stream);
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offs,
                                 int64_t num_experts) {
  TORCH_CHECK(x.is_cuda(), "grouped_mm_wgrad: the CUDA kernel needs CUDA tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 2, "grouped_mm_wgrad: x must be [S, K], got ", x.sizes());
  check_float("grouped_mm_wgrad", x, "x");
  const int64_t S = x.size(0), K = x.size(1), E = num_experts;
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == S, "grouped_mm_wgrad: dy must be [S, N] with x's S = ", S, ", got ",
              dy.sizes());
  TORCH_CHECK(dy.device() == x.device(), "grouped_mm_wgrad: dy must be on x's device ", x.device(), ", got ",
              dy.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "grouped_mm_wgrad: dy must have x's dtype ", x.scalar_type(),
              ", got ", dy.scalar_type());
  TORCH_CHECK(E >= 1 && E <= 65535, "grouped_mm_wgrad: num_experts must lie in [1, 65535], got ", E);
  check_offs("grouped_mm_wgrad", offs, E, x);
  const int64_t N = dy.size(1);
  TORCH_CHECK(S <= kMaxDim && N <= kMaxDim && K <= kMaxDim,
              "grouped_mm_wgrad: dims must be below 2^31 - 4096, got dy ", dy.sizes(), " and x ", x.sizes());
  auto dw = at::empty({E, N, K}, x.options());
  if (N == 0 || K == 0) return dw;
  if (S == 0) return dw.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(x.scalar_type(), "grouped_mm_wgrad", [&](auto tag) {
    using T = decltype(tag);
    using C = std::conditional_t<std::is_same_v<T, float>, CfgFma, CfgMma>;
    const WgradParams<T> p{static_cast<const T*>(dy.data_ptr()), stride_of(dy, 0), stride_of(dy, 1),
                           static_cast<const T*>(x.data_ptr()), stride_of(x, 0), stride_of(x, 1),
                           offs.data_ptr<int32_t>(), static_cast<T*>(dw.data_ptr()), static_cast<int>(S),
                           static_cast<int>(N), static_cast<int>(K), static_cast<int>((K + C::BN - 1) / C::BN)};
    constexpr int V = 16 / sizeof(T);
    const bool vec = p.sd1 == 1 && p.sx1 == 1 && p.sd0 % V == 0 && p.sx0 % V == 0 && N % V == 0 && K % V == 0 &&
                     aligned16(p.dy) && aligned16(p.x);
    if (vec) launch_wgrad<T, C, true>(p, E, stream);
    else launch_wgrad<T, C, false>(p, E, stream);
  });
  return dw;
}

// An sm_89 GPU runs the sm_80 binary when the build has no sm_89 code (sm_90 binaries do not run
// there), and that binary has no FP8 MMA: refuse rather than launch it.
void check_fp8_mma(const cudaDeviceProp& prop) {
  TORCH_CHECK(prop.major > 8 || (prop.major == 8 && prop.minor >= 9), "fp8_grouped_gemm: FP8 tensor cores need ",
              "sm_89+, but ", prop.name, " is sm_", prop.major, prop.minor);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fp8_grouped_kernel<Fp8Decode, float>));
  TORCH_CHECK(attr.binaryVersion >= 89, "fp8_grouped_gemm: FP8 tensor cores need sm_89+ code, but this build runs ",
              "its sm_", attr.binaryVersion, " binary on ", prop.name, " (sm_", prop.major, prop.minor, "); add \"",
              prop.major, prop.minor, "\" to cuda_archs in csrc/build.json");
}

template <class C, typename OutT>
void launch_fp8(const Fp8Params& p, cudaStream_t stream) {
  const int64_t gn = (p.N + C::BN - 1) / C::BN;
  TORCH_CHECK(gn <= 65535, "fp8_grouped_gemm: N (", p.N, ") is too large for one launch");
  const dim3 grid(checked_row_tiles("fp8_grouped_gemm", p.S, p.E, C::BM), static_cast<unsigned>(gn));
  launch(fp8_grouped_kernel<C, OutT>, grid, C::kThreads, C::kSmem, p, stream);
}

at::Tensor fp8_grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                                 const at::Tensor& w_scales, const at::Tensor& offs, at::ScalarType out_dtype) {
  TORCH_CHECK(a.is_cuda(), "fp8_grouped_gemm: the CUDA kernel needs CUDA tensors, got a on ", a.device());
  TORCH_CHECK(a.dim() == 2, "fp8_grouped_gemm: a must be [S, K], got ", a.sizes());
  const int64_t S = a.size(0), K = a.size(1);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == K, "fp8_grouped_gemm: w must be [E, N, K] with a's K = ", K, ", got ",
              w.sizes());
  const auto dev = a.device();
  auto check_aux = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
    TORCH_CHECK(t.device() == dev, "fp8_grouped_gemm: ", name, " must be on a's device ", dev, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == want, "fp8_grouped_gemm: ", name, " must be ", want, ", got ", t.scalar_type());
  };
  check_aux(a, "a", at::kFloat8_e4m3fn);
  check_aux(w, "w", at::kFloat8_e4m3fn);
  check_aux(a_scales, "a_scales", at::kFloat);
  check_aux(w_scales, "w_scales", at::kFloat);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "fp8_grouped_gemm: out_dtype must be bfloat16, float16 or float32, got ", out_dtype);
  const int64_t E = w.size(0), N = w.size(1), kb = (K + 127) / 128, nb = (N + 127) / 128;
  TORCH_CHECK(E >= 1, "fp8_grouped_gemm: w must hold at least one expert, got ", w.sizes());
  check_offs("fp8_grouped_gemm", offs, E, a);
  TORCH_CHECK(S <= kMaxDim && N <= kMaxDim && K <= kMaxDim && E <= kMaxDim,
              "fp8_grouped_gemm: dims must be below 2^31 - 4096, got a ", a.sizes(), " and w ", w.sizes());
  TORCH_CHECK(a_scales.dim() == 2 && a_scales.size(0) == S && a_scales.size(1) == kb,
              "fp8_grouped_gemm: a_scales must be [S, ceil(K/128)] = [", S, ", ", kb, "], got ", a_scales.sizes());
  TORCH_CHECK(w_scales.dim() == 3 && w_scales.size(0) == E && w_scales.size(1) == nb && w_scales.size(2) == kb,
              "fp8_grouped_gemm: w_scales must be [E, ceil(N/128), ceil(K/128)] = [", E, ", ", nb, ", ", kb,
              "], got ", w_scales.sizes());
  const auto opts = a.options().dtype(out_dtype);
  if (S == 0 || N == 0) return at::empty({S, N}, opts);
  if (K == 0) return at::zeros({S, N}, opts);
  TORCH_CHECK(K % 16 == 0, "fp8_grouped_gemm: K (", K, ") must be a multiple of 16");
  const int64_t lda = stride_of(a, 0), sw0 = stride_of(w, 0), sw1 = stride_of(w, 1);
  TORCH_CHECK(a.stride(1) == 1 && lda % 16 == 0, "fp8_grouped_gemm: a must have unit stride along K and a row ",
              "stride that is a multiple of 16, got strides ", a.strides());
  TORCH_CHECK(w.stride(2) == 1 && sw1 % 16 == 0 && sw0 % 16 == 0, "fp8_grouped_gemm: w must have unit stride ",
              "along K and other strides that are multiples of 16, got strides ", w.strides());
  TORCH_CHECK(aligned16(a.data_ptr()), "fp8_grouped_gemm: a's data must be 16-byte aligned");
  TORCH_CHECK(aligned16(w.data_ptr()), "fp8_grouped_gemm: w's data must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(dev);
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  check_fp8_mma(prop);
  auto out = at::empty({S, N}, opts);
  const Fp8Params p{static_cast<const uint8_t*>(a.data_ptr()), lda, a_scales.data_ptr<float>(),
                    stride_of(a_scales, 0), stride_of(a_scales, 1), static_cast<const uint8_t*>(w.data_ptr()), sw0,
                    sw1, w_scales.data_ptr<float>(), stride_of(w_scales, 0), stride_of(w_scales, 1),
                    stride_of(w_scales, 2), offs.data_ptr<int32_t>(), out.data_ptr(), static_cast<int>(S),
                    static_cast<int>(N), static_cast<int>(K), static_cast<int>(E), static_cast<int>(kb)};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(out_dtype, "fp8_grouped_gemm", [&](auto tag) {
    using OutT = decltype(tag);
    if (S <= 16 * E) launch_fp8<Fp8Decode, OutT>(p, stream);  // few rows per expert
    else launch_fp8<Fp8Large, OutT>(p, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_grouped_mm", &grouped_mm_cuda);
  m.impl("_cuda_grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
  m.impl("_cuda_fp8_grouped_gemm", &fp8_grouped_gemm_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_cuda);
#endif
}

}  // namespace quickllm
