// Multi-head latent attention (DeepSeek-V2/V3) decode over a paged latent cache, and the cache write.
// Semantics: quickllm_kernels/mla/reference.py; the Triton kernels (mla/triton.py) run the same
// algorithm.
//
// mla_decode: q [B, Sq, H, D] against cache rows [kv_c | k_pe] (keys: all D values, values: the first
// DV = head_dim_v), read through block_table. A query row is (query position i, head h), flattened
// as r = i * H + h; all heads of a sequence read the same cache rows (MQA-like), so a CTA takes a block
// of rows and shares every cache tile among them.
//   Split-KV: the cache positions [0, capacity) of each sequence are cut into `splits` chunks of
//   `chunk` positions (a multiple of the tile). The split is decided on the host from the shapes alone
//   (about two waves of CTAs over the SMs), never from cache_seqlens: no host sync, CUDA-graph safe,
//   deterministic. A chunk past the sequence's length costs one CTA that writes "nothing seen".
//   Launch 1 (split): CTA = (batch b, chunk, row block); it streams the chunk's visible cache rows in
//   tiles of 32 positions through an online softmax in float32 and writes its normalised output and
//   log-sum-exp to a float32 workspace, part_out [B, splits, R, DV] and part_lse [B, splits, R].
//   Launch 2 (merge): one warp per row combines the chunks by their LSEs (fixed order: no atomics).
//   Two split kernels:
//   * decode_mma_kernel (float16/bfloat16, D % 8 == 0, DV <= 512, 16-byte aligned cache rows): 8 warps,
//     16 or 32 rows (MT m-tiles of 16). Q [rows, D] stays in shared memory; cache tiles [32, D] arrive
//     by cp.async, double-buffered when shared memory allows. Scores S = Q K^T on mma.sync m16n8k16
//     (fp32 accumulation): warp w takes positions 16 (w & 1) .. + 15 and every fourth k-step of D
//     starting at w >> 1; the four partial sums go through shared memory and are added in a fixed
//     order. The softmax runs with 256 / rows threads per row. O += P V on mma.sync: P rounded to the
//     cache's dtype (as FlashAttention and the Triton kernel do), V = the first DV columns of the same
//     shared tile (ldmatrix.trans), warp w owns NV n-tiles of 8 output columns.
//   * decode_simt_kernel (everything else: float32, odd D, large DV, unaligned caches): 4 warps, 16
//     rows, float32 FMAs; scores over D in slabs of 32 through shared memory, the output accumulated in
//     the workspace itself (each CTA owns its slice), so D and DV are unbounded.
//   Masking: position n of sequence b is read only when n < min(chunk end, L), L = clamp(cache_seqlens[b],
//   0, capacity), and its page block_table[b, n / page] lies in [0, num_blocks). Row (i, h) sees n <
//   L - Sq + 1 + i (causal, clamped at 0) or n < L. A page outside the cache is never read; a row that
//   sees one of its positions gets NaN output and lse (the reference's NaN keys). A row that sees
//   nothing gets zeros and lse -inf.
// mla_cache_write: one CTA row per token, threads along [kv_c | k_pe]; 16-byte vectors when every row is
//   aligned. A slot < 0 or >= num_blocks * page_size writes nothing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace quickllm {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTile = 32;           // cache positions per tile (both split kernels); chunks are multiples of it
constexpr int kMmaWarps = 8;        // decode_mma_kernel: 256 threads
constexpr int kMmaMaxDV = 512;      // DV <= 8 n-tiles of 8 per warp
constexpr int kSimtRows = 16;       // decode_simt_kernel: rows per CTA
constexpr int kSimtThreads = 128;
constexpr int kSimtSlab = 32;       // D values per slab of the SIMT scores
constexpr int kMergeWarps = 4;      // rows per CTA of the merge
constexpr int kMaxSplits = 1024;
constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

struct DecodeParams {
  const void* q;
  const void* cache;
  const int32_t* table;
  const int32_t* seqlens;
  float* part_out;  // [B, splits, R, DV]
  float* part_lse;  // [B, splits, R]
  int64_t sqb, sqs, sqh;  // q strides of batch, position, head (elements; last dim unit)
  int64_t scb, scp;       // cache strides of block and in-page position
  int64_t stb, stm;       // block_table strides
  int64_t ssl;            // cache_seqlens stride
  int Sq, H, R, D, DV;    // R = Sq * H rows per sequence
  int num_blocks, page, cap, chunk, splits, row_blocks;
  float scale;
  bool causal;
};

// The CTA's (batch, chunk, row block): row blocks vary fastest, so the CTAs that share a chunk's cache
// rows run together and meet in L2.
struct Work {
  int b, split, rb;
  int start, end;  // the chunk's positions to read: [start, end), end <= L
  int L;
};

__device__ __forceinline__ Work work_of(const DecodeParams& p) {
  Work w;
  const int idx = static_cast<int>(blockIdx.x);
  w.rb = idx % p.row_blocks;
  const int t = idx / p.row_blocks;
  w.split = t % p.splits;
  w.b = t / p.splits;
  w.L = min(max(p.seqlens[static_cast<int64_t>(w.b) * p.ssl], 0), p.cap);
  w.start = w.split * p.chunk;  // < capacity
  w.end = w.start < w.L ? w.start + min(p.chunk, w.L - w.start) : w.start;  // empty past the length
  return w;
}

// The last position row rr (< R) of sequence b sees, plus one.
__device__ __forceinline__ int row_limit(const DecodeParams& p, int L, int rr) {
  if (!p.causal) return L;
  return max(L - p.Sq + 1 + rr / p.H, 0);
}

// Cache position pos of sequence b: 0 = not read (past the chunk's end), 1 = its page is in the cache
// (element offset in *off), 2 = its page lies outside the cache (never read; NaN for the rows seeing it).
__device__ __forceinline__ int position_state(const DecodeParams& p, int b, int pos, int end, int64_t* off) {
  *off = 0;
  if (pos >= end) return 0;
  const int64_t blk = p.table[static_cast<int64_t>(b) * p.stb + static_cast<int64_t>(pos / p.page) * p.stm];
  if (blk < 0 || blk >= p.num_blocks) return 2;
  *off = blk * p.scb + static_cast<int64_t>(pos % p.page) * p.scp;
  return 1;
}

// Max and sum over the G consecutive lanes of a group (G a power of two <= 32). The butterfly leaves
// bitwise-identical results in every lane of the group, so the lanes keep identical running stats.
template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
template <int G>
__device__ __forceinline__ int group_or(int v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v |= __shfl_xor_sync(kFull, v, o);
  return v;
}

// Online-softmax state of one row, kept (identically) by each thread of the row's group.
struct RowStats {
  float m = -INFINITY;  // running max of the visible scores
  float l = 0.f;        // running sum of exp(score - m)
  int bad = 0;          // a visible position's page lies outside the cache
};

// One tile's softmax step for a row: s[e] the scaled scores of this thread's PPT positions, ok[e] whether
// each is visible and readable. Returns alpha, the rescale of the row's accumulator; p[e] the weights.
template <int G, int PPT>
__device__ __forceinline__ float softmax_step(RowStats& st, const float (&s)[PPT], const bool (&ok)[PPT],
                                              float (&pr)[PPT]) {
  float mx = -INFINITY;
#pragma unroll
  for (int e = 0; e < PPT; ++e)
    if (ok[e]) mx = fmaxf(mx, s[e]);
  mx = group_max<G>(mx);
  const float m_new = fmaxf(st.m, mx);
  const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: nothing to rescale
  const float alpha = expf(st.m - m_safe);               // 0 while st.m is -inf
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < PPT; ++e) {
    pr[e] = ok[e] ? expf(s[e] - m_safe) : 0.f;
    sum += pr[e];
  }
  st.l = st.l * alpha + group_sum<G>(sum);
  st.m = m_new;
  return alpha;
}

// The chunk's result for a row: (lse, 1 / l); NaN for a row that saw a page outside the cache, (-inf, 0)
// for a row that saw nothing. Call with every lane (group_or shuffles).
template <int G>
__device__ __forceinline__ void finish_row(const RowStats& st, float* lse, float* inv) {
  const int bad = group_or<G>(st.bad);
  if (bad) {
    *lse = *inv = std::numeric_limits<float>::quiet_NaN();
  } else if (st.l == 0.f) {
    *lse = -INFINITY;
    *inv = 0.f;
  } else {
    *lse = st.m + logf(st.l);
    *inv = 1.f / st.l;
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core split kernel (float16 / bfloat16).

// float32 -> T, round to nearest even (torch's .to()).
__device__ __forceinline__ float to_t(float v, float) { return v; }
__device__ __forceinline__ __half to_t(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_t(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T to(float v) {
  return to_t(v, T{});
}

// Shared memory of decode_mma_kernel, in 16-bit elements or floats. Rows of Q and of the cache tiles
// hold DP = D rounded up to 16 values (zeros past D) plus 16 bytes of padding: a pitch of 4 mod 8 words,
// so the eight 16-byte rows of each ldmatrix phase hit distinct banks.
struct MmaSmem {
  int rows, dp, stages;
  __host__ __device__ int pitch() const { return dp + 8; }
  static constexpr int kSPitch = kTile + 4;   // float partial scores [4][rows][kSPitch]
  static constexpr int kPPitch = kTile + 8;   // 16-bit probabilities [rows][kPPitch] (80 bytes: conflict-free)
  __host__ __device__ size_t q_bytes() const { return size_t(rows) * pitch() * 2; }
  __host__ __device__ size_t k_bytes() const { return size_t(stages) * kTile * pitch() * 2; }
  __host__ __device__ size_t s_bytes() const { return size_t(4) * rows * kSPitch * 4; }
  __host__ __device__ size_t p_bytes() const { return size_t(rows) * kPPitch * 2; }
  __host__ __device__ size_t f_bytes() const { return size_t(2) * rows * 4; }  // alpha, inv
  __host__ __device__ size_t st_bytes() const { return size_t(stages) * kTile * 4; }
  __host__ __device__ size_t total() const { return q_bytes() + k_bytes() + s_bytes() + p_bytes() + f_bytes() + st_bytes(); }
};

// grid: B * splits * row_blocks CTAs of 256 threads; rows per CTA 16 * MT; NV = n-tiles of 8 output
// columns per warp (8 * 8 * NV >= DV). Needs D % 8 == 0 and cache rows 16-byte aligned (checked on the
// host); q is read with 16-byte vectors when q_vec.
template <typename T, int MT, int NV>
__global__ void __launch_bounds__(kMmaWarps * 32, 1)
    decode_mma_kernel(const DecodeParams p, int dp, int stages, bool q_vec) {
  constexpr int ROWS = 16 * MT, THREADS = kMmaWarps * 32;
  constexpr int G = THREADS / ROWS;  // threads per row in the softmax: 16 or 8
  constexpr int PPT = kTile / G;     // positions per thread: 2 or 4
  static_assert(G <= 32 && PPT * G == kTile, "softmax groups must fit a warp");
  const MmaSmem lay{ROWS, dp, stages};
  const int pitch = lay.pitch();
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + lay.q_bytes());
  float* sS = reinterpret_cast<float*>(smem + lay.q_bytes() + lay.k_bytes());
  T* sP = reinterpret_cast<T*>(smem + lay.q_bytes() + lay.k_bytes() + lay.s_bytes());
  float* sAlpha = reinterpret_cast<float*>(smem + lay.q_bytes() + lay.k_bytes() + lay.s_bytes() + lay.p_bytes());
  float* sInv = sAlpha + ROWS;
  int* sState = reinterpret_cast<int*>(sInv + ROWS);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tg = lane & 3;  // mma fragment coordinates: group, thread in group
  const Work w = work_of(p);
  const int D = p.D, D8 = D / 8;
  const T* cache = static_cast<const T*>(p.cache);

  // Q rows (zeros past D and for rows past R) and the zero columns [D, dp) of every cache buffer.
  {
    const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(w.b) * p.sqb;
    const int c8n = dp / 8;
    for (int i = tid; i < ROWS * c8n; i += THREADS) {
      const int r = i / c8n, c = (i % c8n) * 8, rr = w.rb * ROWS + r;
      Pack<T, 8> v;
#pragma unroll
      for (int e = 0; e < 8; ++e) v.v[e] = to<T>(0.f);
      if (rr < p.R && c < D) {
        const T* src = q + static_cast<int64_t>(rr / p.H) * p.sqs + static_cast<int64_t>(rr % p.H) * p.sqh + c;
        v = q_vec ? load<true, 8>(src) : load<false, 8>(src);
      }
      store<true, 8>(sQ + r * pitch + c, v);
    }
    if (dp > D) {  // D % 8 == 0: exactly the 8 columns [D, D + 8)
      Pack<T, 8> z;
#pragma unroll
      for (int e = 0; e < 8; ++e) z.v[e] = to<T>(0.f);
      for (int r = tid; r < stages * kTile; r += THREADS) store<true, 8>(sK + r * pitch + D, z);
    }
  }

  // Tile t of the chunk into buffer t % stages: readable rows by cp.async, the others zero-filled (never
  // read from global memory), and each position's state for the softmax.
  const int n_tiles = w.end > w.start ? (w.end - w.start + kTile - 1) / kTile : 0;
  auto load_tile = [&](int t) {
    const int buf = t % stages, n0 = w.start + t * kTile;
    T* dst = sK + buf * kTile * pitch;
    for (int i = tid; i < kTile * D8; i += THREADS) {
      const int r = i / D8, c = (i % D8) * 8;
      int64_t off;
      const int state = position_state(p, w.b, n0 + r, w.end, &off);
      if (state == 1) {
        cp_async16(smem_addr(dst + r * pitch + c), cache + off + c);
      } else {
        Pack<T, 8> z;
#pragma unroll
        for (int e = 0; e < 8; ++e) z.v[e] = to<T>(0.f);
        store<true, 8>(dst + r * pitch + c, z);
      }
      if (c == 0) sState[buf * kTile + r] = state;
    }
  };

  // This thread's softmax row and positions: row r_s, positions q_s + e * G.
  const int r_s = tid / G, q_s = tid % G, rr_s = w.rb * ROWS + r_s;
  const int limit = rr_s < p.R ? row_limit(p, w.L, rr_s) : 0;
  RowStats st;

  float acc[MT][NV][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;

  const int nh = warp & 1, kq = warp >> 1;  // scores: positions 16 nh .. + 15, k-steps kq, kq + 4, ...
  const int ksteps = dp / 16;

  for (int s = 0; s + 1 < stages; ++s) {
    if (s < n_tiles) load_tile(s);
    cp_async_commit();
  }
  for (int t = 0; t < n_tiles; ++t) {
    __syncthreads();  // every warp is done with tile t - 1: its buffer and sS / sP are free
    if (t + stages - 1 < n_tiles) load_tile(t + stages - 1);
    cp_async_commit();
    if (stages == 2) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();  // tile t (every thread's copies and zero rows) is visible
    const int buf = t % stages, n0 = w.start + t * kTile;
    const T* kt = sK + buf * kTile * pitch;

    // S partial = Q[:, k-steps of kq] K[16 nh .. + 15, same]^T
    {
      float sacc[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) sacc[mt][n][c] = 0.f;
      // B (keys, [pos][d] rows = "col" operand): matrices (pos 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15)
      const uint32_t b_base =
          smem_addr(kt + (16 * nh + (lane & 7) + ((lane >> 4) << 3)) * pitch + ((lane >> 3) & 1) * 8);
      // A (queries): matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
      const uint32_t a_base = smem_addr(sQ + (lane & 15) * pitch + (lane >> 4) * 8);
      for (int ks = kq; ks < ksteps; ks += 4) {
        uint32_t bf[4];
        ldmatrix_x4<false>(bf, b_base + ks * 32);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t af[4];
          ldmatrix_x4<false>(af, a_base + (mt * 16 * pitch + ks * 16) * 2);
          mma16816<T>(sacc[mt][0], af, bf[0], bf[1]);
          mma16816<T>(sacc[mt][1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          float* dst = sS + (kq * ROWS + mt * 16 + g) * MmaSmem::kSPitch + 16 * nh + 8 * n + 2 * tg;
          dst[0] = sacc[mt][n][0];
          dst[1] = sacc[mt][n][1];
          dst[8 * MmaSmem::kSPitch] = sacc[mt][n][2];
          dst[8 * MmaSmem::kSPitch + 1] = sacc[mt][n][3];
        }
    }
    __syncthreads();

    // Online softmax: the four partial sums in a fixed order, masks, P in T, alpha per row.
    {
      float sv[PPT], pr[PPT];
      bool ok[PPT];
#pragma unroll
      for (int e = 0; e < PPT; ++e) {
        const int j = q_s + e * G;
        const float* src = sS + r_s * MmaSmem::kSPitch + j;
        const int sp = MmaSmem::kSPitch * ROWS;
        sv[e] = (((src[0] + src[sp]) + src[2 * sp]) + src[3 * sp]) * p.scale;
        const int state = sState[buf * kTile + j];
        const bool vis = state != 0 && n0 + j < limit;
        st.bad |= vis && state == 2;
        ok[e] = vis && state == 1;
      }
      const float alpha = softmax_step<G, PPT>(st, sv, ok, pr);
#pragma unroll
      for (int e = 0; e < PPT; ++e) sP[r_s * MmaSmem::kPPitch + q_s + e * G] = to<T>(pr[e]);
      if (q_s == 0) sAlpha[r_s] = alpha;
    }
    __syncthreads();

    // O = alpha O + P V over this warp's output columns
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float a0 = sAlpha[mt * 16 + g], a1 = sAlpha[mt * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        acc[mt][j][0] *= a0;
        acc[mt][j][1] *= a0;
        acc[mt][j][2] *= a1;
        acc[mt][j][3] *= a1;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4<false>(af[mt], smem_addr(sP + (mt * 16 + (lane & 15)) * MmaSmem::kPPitch + ks * 16 + (lane >> 4) * 8));
      // B (values, [pos][dv] rows, transposed): matrices (pos 0-7, n 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
      const T* vrow = kt + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch;
#pragma unroll
      for (int j = 0; j < NV; j += 2) {
        const int nt = warp * NV + j;
        if (nt * 8 >= p.DV) break;  // uniform over the warp
        if (j + 1 < NV) {  // n-tiles nt, nt + 1: columns nt * 8 .. + 15 < dp (nt is even)
          uint32_t bf[4];
          ldmatrix_x4<true>(bf, smem_addr(vrow + nt * 8 + (lane >> 4) * 8));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][j], af[mt], bf[0], bf[1]);
            mma16816<T>(acc[mt][j + 1], af[mt], bf[2], bf[3]);
          }
        } else {
          uint32_t bf[2];
          ldmatrix_x2_trans(bf, smem_addr(vrow + nt * 8));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(acc[mt][j], af[mt], bf[0], bf[1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // (only empty groups can be pending here)

  {
    float lse, inv;
    finish_row<G>(st, &lse, &inv);
    if (q_s == 0) {
      sInv[r_s] = inv;
      if (rr_s < p.R)
        p.part_lse[(static_cast<int64_t>(w.b) * p.splits + w.split) * p.R + rr_s] = lse;
    }
  }
  __syncthreads();
  float* out = p.part_out + (static_cast<int64_t>(w.b) * p.splits + w.split) * p.R * p.DV;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = mt * 16 + g + (c >> 1) * 8, rr = w.rb * ROWS + row;
        const int col = (warp * NV + j) * 8 + 2 * tg + (c & 1);
        if (rr < p.R && col < p.DV) out[static_cast<int64_t>(rr) * p.DV + col] = acc[mt][j][c] * sInv[row];
      }
}

// ------------------------------------------------------------------------------------------------
// SIMT split kernel (any dtype, D, DV, strides): 128 threads, 16 rows; thread t owns row t / 8 and the
// positions t % 8 + 8 e of each tile for the scores and the softmax, and output columns t + 128 k.

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) decode_simt_kernel(const DecodeParams p) {
  constexpr int G = kSimtThreads / kSimtRows, PPT = kTile / G;
  __shared__ float sQ[kSimtRows][kSimtSlab + 1];
  __shared__ float sK[kTile][kSimtSlab + 1];
  __shared__ float sP[kSimtRows][kTile];
  __shared__ float sAlpha[kSimtRows], sInv[kSimtRows];
  __shared__ int sState[kTile];
  __shared__ int64_t sOff[kTile];

  const int tid = threadIdx.x;
  const Work w = work_of(p);
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(w.b) * p.sqb;
  const T* cache = static_cast<const T*>(p.cache);
  const int r_s = tid / G, q_s = tid % G, rr_s = w.rb * kSimtRows + r_s;
  const int limit = rr_s < p.R ? row_limit(p, w.L, rr_s) : 0;
  const int rows_here = min(kSimtRows, p.R - w.rb * kSimtRows);
  float* part = p.part_out + ((static_cast<int64_t>(w.b) * p.splits + w.split) * p.R + w.rb * kSimtRows) * p.DV;
  RowStats st;

  const int n_tiles = w.end > w.start ? (w.end - w.start + kTile - 1) / kTile : 0;
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = w.start + t * kTile;
    __syncthreads();  // the previous tile's sState / sOff / sP are no longer read
    if (tid < kTile) {
      int64_t off;
      sState[tid] = position_state(p, w.b, n0 + tid, w.end, &off);
      sOff[tid] = off;
    }
    __syncthreads();

    float s[PPT];
#pragma unroll
    for (int e = 0; e < PPT; ++e) s[e] = 0.f;
    for (int d0 = 0; d0 < p.D; d0 += kSimtSlab) {
      for (int i = tid; i < kSimtRows * kSimtSlab; i += kSimtThreads) {
        const int r = i / kSimtSlab, c = i % kSimtSlab, rr = w.rb * kSimtRows + r;
        float v = 0.f;
        if (rr < p.R && d0 + c < p.D)
          v = static_cast<float>(q[static_cast<int64_t>(rr / p.H) * p.sqs + static_cast<int64_t>(rr % p.H) * p.sqh + d0 + c]);
        sQ[r][c] = v;
      }
      for (int i = tid; i < kTile * kSimtSlab; i += kSimtThreads) {
        const int j = i / kSimtSlab, c = i % kSimtSlab;
        sK[j][c] = sState[j] == 1 && d0 + c < p.D ? static_cast<float>(cache[sOff[j] + d0 + c]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kSimtSlab; ++c) {
        const float qv = sQ[r_s][c];
#pragma unroll
        for (int e = 0; e < PPT; ++e) s[e] = fmaf(qv, sK[q_s + e * G][c], s[e]);
      }
      __syncthreads();
    }

    float pr[PPT];
    bool ok[PPT];
#pragma unroll
    for (int e = 0; e < PPT; ++e) {
      const int j = q_s + e * G;
      s[e] *= p.scale;
      const bool vis = sState[j] != 0 && n0 + j < limit;
      st.bad |= vis && sState[j] == 2;
      ok[e] = vis && sState[j] == 1;
    }
    const float alpha = softmax_step<G, PPT>(st, s, ok, pr);
#pragma unroll
    for (int e = 0; e < PPT; ++e) sP[r_s][q_s + e * G] = pr[e];
    if (q_s == 0) sAlpha[r_s] = alpha;
    __syncthreads();

    // part[r, dv] = alpha_r part[r, dv] + sum_j P[r, j] V[j, dv] (the first tile starts from zero: the
    // workspace is uninitialised)
    for (int dv = tid; dv < p.DV; dv += kSimtThreads) {
      float v[kTile];
#pragma unroll
      for (int j = 0; j < kTile; ++j) v[j] = sState[j] == 1 ? static_cast<float>(cache[sOff[j] + dv]) : 0.f;
      for (int r = 0; r < rows_here; ++r) {
        float a = t == 0 ? 0.f : part[static_cast<int64_t>(r) * p.DV + dv] * sAlpha[r];
#pragma unroll
        for (int j = 0; j < kTile; ++j) a = fmaf(sP[r][j], v[j], a);
        part[static_cast<int64_t>(r) * p.DV + dv] = a;
      }
    }
  }

  float lse, inv;
  finish_row<G>(st, &lse, &inv);
  __syncthreads();  // (sInv is first written here; the loop's last reads of sAlpha are done)
  if (q_s == 0) {
    sInv[r_s] = inv;
    if (rr_s < p.R) p.part_lse[(static_cast<int64_t>(w.b) * p.splits + w.split) * p.R + rr_s] = lse;
  }
  __syncthreads();
  for (int dv = tid; dv < p.DV; dv += kSimtThreads)
    for (int r = 0; r < rows_here; ++r) {
      float* o = part + static_cast<int64_t>(r) * p.DV + dv;
      *o = n_tiles == 0 ? 0.f : *o * sInv[r];  // no tile: nothing was written, nothing seen
    }
}

// ------------------------------------------------------------------------------------------------
// Merge: one warp per row (b, r): weights exp(lse_s - max) over the chunks, out = sum w_s o_s / sum w_s,
// lse = max + log(sum w_s). Any NaN chunk makes the row NaN; no chunk with a finite lse: zeros, -inf.
// Shared memory: the weights, [kMergeWarps][splits] floats.

template <typename T>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse, T* __restrict__ out,
                 float* __restrict__ lse_out, int64_t rows, int R, int H, int Sq, int DV, int splits) {
  extern __shared__ float sw_all[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (row >= rows) return;  // no block-wide barriers below
  float* sw = sw_all + warp * splits;
  const int64_t b = row / R;
  const int rr = static_cast<int>(row % R);
  const float* lse_b = part_lse + b * splits * R + rr;  // chunk s at lse_b[s * R]

  float mx = -INFINITY;
  bool nan = false;
  for (int s = lane; s < splits; s += 32) {
    const float v = lse_b[static_cast<int64_t>(s) * R];
    nan |= v != v;
    mx = fmaxf(mx, v);
  }
  mx = group_max<32>(mx);
  nan = __any_sync(kFull, nan);
  const float mx_safe = mx == -INFINITY ? 0.f : mx;
  float tot = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float ws = expf(lse_b[static_cast<int64_t>(s) * R] - mx_safe);  // 0 for an empty chunk
    sw[s] = ws;
    tot += ws;
  }
  tot = group_sum<32>(tot);
  __syncwarp();
  const bool empty = tot == 0.f;
  const float inv = empty ? 0.f : 1.f / tot;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  const float* o_b = part_out + (b * splits * R + rr) * DV;  // chunk s at o_b[s * R * DV]
  T* dst = out + row * DV;
  for (int dv = lane; dv < DV; dv += 32) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ws = sw[s];
      if (ws > 0.f) a = fmaf(ws, o_b[static_cast<int64_t>(s) * R * DV + dv], a);
    }
    dst[dv] = to<T>(nan ? qnan : a * inv);
  }
  if (lane == 0) {
    const int i = rr / H, h = rr % H;
    lse_out[(b * H + h) * Sq + i] = nan ? qnan : empty ? -INFINITY : mx_safe + logf(tot);
  }
}

// ------------------------------------------------------------------------------------------------
// Cache write: kv_cache[slot / page, slot % page] = [kv_c[t] | k_pe[t]]; blockDim (bx, by), row t =
// blockIdx.x * by + threadIdx.y, threads along the row in VEC-element pieces (VEC divides Dc and Dr).

struct WriteParams {
  void* cache;
  const void* kv_c;
  const void* k_pe;
  const void* slots;
  int64_t scb, scp, skc, skp;
  int64_t tokens, n_slots;
  int page, Dc, Dr;
};

template <typename T, typename SlotT, int VEC, bool ALIGNED>
__global__ void cache_write_kernel(const WriteParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.tokens) return;
  const int64_t slot = static_cast<int64_t>(static_cast<const SlotT*>(p.slots)[t]);
  if (slot < 0 || slot >= p.n_slots) return;  // skipped token, or a slot outside the cache
  T* row = static_cast<T*>(p.cache) + (slot / p.page) * p.scb + (slot % p.page) * p.scp;
  const T* c = static_cast<const T*>(p.kv_c) + t * p.skc;
  const T* r = static_cast<const T*>(p.k_pe) + t * p.skp;
  const int D = p.Dc + p.Dr;
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    // VEC divides Dc: a piece lies wholly in kv_c or wholly in k_pe
    const auto v = i < p.Dc ? load<ALIGNED, VEC>(c + i) : load<ALIGNED, VEC>(r + (i - p.Dc));
    store<ALIGNED, VEC>(row + i, v);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

void check_cache(const char* op, const at::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got kv_cache on ", kv_cache.device());
  TORCH_CHECK(kv_cache.dim() == 3 || (kv_cache.dim() == 4 && kv_cache.size(2) == 1), op,
              ": kv_cache must be [num_blocks, page_size, D] or [num_blocks, page_size, 1, D], got ",
              kv_cache.sizes());
  check_float(op, kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.size(-1) <= 1 || kv_cache.stride(-1) == 1, op,
              ": kv_cache's last dim must have stride 1, got strides ", kv_cache.strides());
  TORCH_CHECK(kv_cache.size(0) <= kMaxInt && kv_cache.size(1) <= kMaxInt && kv_cache.size(-1) <= kMaxInt, op,
              ": kv_cache dims must fit int32, got ", kv_cache.sizes());
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The tensor-core kernel's configuration for D (after the host checks), or rows == 0 for none: 32 rows
// when there are more than 16, double-buffered when shared memory allows (sm_89 has 99 KiB per block,
// too little for DeepSeek's D = 576 with two 32-row buffers).
MmaSmem pick_mma(int64_t R, int D, size_t optin) {
  const int dp = (D + 15) / 16 * 16;
  const int rows_pref[2] = {R > 16 ? 32 : 16, 16};
  for (const int stages : {2, 1})
    for (const int rows : rows_pref) {
      const MmaSmem lay{rows, dp, stages};
      if (lay.total() <= optin) return lay;
    }
  return MmaSmem{0, dp, 0};
}

template <typename T, int MT, int NV>
void launch_mma(const DecodeParams& p, const MmaSmem& lay, bool q_vec, unsigned grid, cudaStream_t stream) {
  auto kernel = decode_mma_kernel<T, MT, NV>;
  const size_t smem = lay.total();
  allow_smem(kernel, smem);
  kernel<<<grid, kMmaWarps * 32, smem, stream>>>(p, lay.dp, lay.stages, q_vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MT>
void launch_mma_nv(const DecodeParams& p, const MmaSmem& lay, bool q_vec, unsigned grid, cudaStream_t stream) {
  const int n_tiles = (p.DV + 7) / 8;  // output n-tiles over the 8 warps
  if (n_tiles <= kMmaWarps * 1) launch_mma<T, MT, 1>(p, lay, q_vec, grid, stream);
  else if (n_tiles <= kMmaWarps * 2) launch_mma<T, MT, 2>(p, lay, q_vec, grid, stream);
  else if (n_tiles <= kMmaWarps * 4) launch_mma<T, MT, 4>(p, lay, q_vec, grid, stream);
  else launch_mma<T, MT, 8>(p, lay, q_vec, grid, stream);
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                   const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                                   double softmax_scale, int64_t head_dim_v, bool causal) {
  const char* op = "mla_decode";
  TORCH_CHECK(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got q on ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be [batch, q_len, heads, D], got ", q.sizes());
  check_float(op, q, "q");
  check_cache(op, kv_cache);
  TORCH_CHECK(kv_cache.device() == q.device(), op, ": kv_cache must be on q's device ", q.device(), ", got ",
              kv_cache.device());
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type(), op, ": kv_cache must have q's dtype ", q.scalar_type(),
              ", got ", kv_cache.scalar_type());
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(kv_cache.size(-1) == D, op, ": kv_cache rows must hold D = ", D, " values (q's last dim), got ",
              kv_cache.size(-1));
  TORCH_CHECK(D <= 1 || q.stride(3) == 1, op, ": q's last dim must have stride 1, got strides ", q.strides());
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= D, op, ": head_dim_v must lie in [1, D = ", D, "], got ", head_dim_v);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, op,
              ": softmax_scale must be a positive finite float, got ", softmax_scale);
  TORCH_CHECK(block_table.device() == q.device(), op, ": block_table must be on q's device ", q.device(), ", got ",
              block_table.device());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B, op,
              ": block_table must be an int32 [batch, max_blocks] tensor with batch = ", B, ", got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(cache_seqlens.device() == q.device(), op, ": cache_seqlens must be on q's device ", q.device(),
              ", got ", cache_seqlens.device());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, op,
              ": cache_seqlens must be an int32 [batch] tensor with batch = ", B, ", got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  const int64_t num_blocks = kv_cache.size(0), page = kv_cache.size(1), max_blocks = block_table.size(1);
  const int64_t cap = max_blocks * page, R = Sq * H, DV = head_dim_v;
  TORCH_CHECK(cap <= kMaxInt - 2 * kTile, op, ": max_blocks * page_size = ", cap, " does not fit int32");
  TORCH_CHECK(R <= kMaxInt && D <= kMaxInt && B <= kMaxInt, op, ": q ", q.sizes(), " is too large");

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, Sq, H, DV}, q.options());
  auto lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  if (B == 0 || R == 0) return {out, lse};

  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const auto st = q.scalar_type();
  const int64_t scb = stride_of(kv_cache, 0), scp = stride_of(kv_cache, 1);
  const MmaSmem lay = pick_mma(R, static_cast<int>(D), prop.sharedMemPerBlockOptin);
  const bool use_mma = st != at::kFloat && D % 8 == 0 && DV <= kMmaMaxDV && lay.rows > 0 && scb % 8 == 0 &&
                       scp % 8 == 0 && aligned16(kv_cache.data_ptr());
  const int rows = use_mma ? lay.rows : kSimtRows;
  const int64_t row_blocks = (R + rows - 1) / rows;

  // Splits from the shapes alone: enough CTAs for about two waves, each chunk at least a tile.
  const size_t smem = use_mma ? lay.total() : 10 * 1024;
  const int64_t per_sm = std::max<int64_t>(
      1, std::min<int64_t>(use_mma ? 2 : 8, static_cast<int64_t>(prop.sharedMemPerMultiprocessor / (smem + 1024))));
  const int64_t target = 2 * static_cast<int64_t>(prop.multiProcessorCount) * per_sm;
  const int64_t cap_tiles = (cap + kTile - 1) / kTile;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({cap_tiles, (target + B * row_blocks - 1) / (B * row_blocks),
                                                           static_cast<int64_t>(kMaxSplits)}));
  const int64_t chunk = cap == 0 ? kTile : ((cap + splits - 1) / splits + kTile - 1) / kTile * kTile;
  splits = cap == 0 ? 1 : (cap + chunk - 1) / chunk;
  const int64_t grid = B * splits * row_blocks;
  TORCH_CHECK(grid <= kMaxInt, op, ": batch ", B, " x ", splits, " splits x ", row_blocks,
              " row blocks is too many CTAs for one launch");

  auto part_out = at::empty({B, splits, R, DV}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({B, splits, R}, q.options().dtype(at::kFloat));
  DecodeParams p{};
  p.q = q.data_ptr();
  p.cache = kv_cache.data_ptr();
  p.table = block_table.data_ptr<int32_t>();
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.sqb = stride_of(q, 0);
  p.sqs = stride_of(q, 1);
  p.sqh = stride_of(q, 2);
  p.scb = scb;
  p.scp = scp;
  p.stb = stride_of(block_table, 0);
  p.stm = max_blocks == 0 ? 0 : stride_of(block_table, 1);
  p.ssl = stride_of(cache_seqlens, 0);
  p.Sq = static_cast<int>(Sq);
  p.H = static_cast<int>(H);
  p.R = static_cast<int>(R);
  p.D = static_cast<int>(D);
  p.DV = static_cast<int>(DV);
  p.num_blocks = static_cast<int>(num_blocks);
  p.page = static_cast<int>(page);
  p.cap = static_cast<int>(cap);
  p.chunk = static_cast<int>(chunk);
  p.splits = static_cast<int>(splits);
  p.row_blocks = static_cast<int>(row_blocks);
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;

  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t merge_rows = B * R;
  const int64_t merge_grid = (merge_rows + kMergeWarps - 1) / kMergeWarps;
  TORCH_CHECK(merge_grid <= kMaxInt, op, ": too many rows for one launch");
  const size_t merge_smem = sizeof(float) * kMergeWarps * static_cast<size_t>(splits);
  dispatch_float<CudaTypes>(st, op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      decode_simt_kernel<T><<<static_cast<unsigned>(grid), kSimtThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (use_mma) {
      const bool q_vec = p.sqb % 8 == 0 && p.sqs % 8 == 0 && p.sqh % 8 == 0 && aligned16(q.data_ptr());
      if (lay.rows == 32) launch_mma_nv<T, 2>(p, lay, q_vec, static_cast<unsigned>(grid), stream);
      else launch_mma_nv<T, 1>(p, lay, q_vec, static_cast<unsigned>(grid), stream);
    } else {
      decode_simt_kernel<T><<<static_cast<unsigned>(grid), kSimtThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    merge_kernel<T><<<static_cast<unsigned>(merge_grid), kMergeWarps * 32, merge_smem, stream>>>(
        p.part_out, p.part_lse, static_cast<T*>(out.data_ptr()), lse.data_ptr<float>(), merge_rows, p.R, p.H, p.Sq,
        p.DV, p.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

void mla_cache_write_cuda(const at::Tensor& kv_cache, const at::Tensor& slot_mapping, const at::Tensor& kv_c,
                          const at::Tensor& k_pe) {
  const char* op = "mla_cache_write";
  check_cache(op, kv_cache);
  auto check_part = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == kv_cache.device(), op, ": ", name, " must be on kv_cache's device ", kv_cache.device(),
                ", got ", t.device());
    TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [tokens, dims], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == kv_cache.scalar_type(), op, ": ", name, " must have kv_cache's dtype ",
                kv_cache.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, "'s last dim must have stride 1, got strides ",
                t.strides());
  };
  check_part("kv_c", kv_c);
  check_part("k_pe", k_pe);
  const int64_t T_ = kv_c.size(0), Dc = kv_c.size(1), Dr = k_pe.size(1), D = kv_cache.size(-1);
  TORCH_CHECK(k_pe.size(0) == T_, op, ": kv_c and k_pe must have the same tokens, got ", T_, " and ", k_pe.size(0));
  TORCH_CHECK(Dc + Dr == D, op, ": kv_c and k_pe widths (", Dc, " + ", Dr, ") must add up to the cache's D = ", D);
  TORCH_CHECK(slot_mapping.device() == kv_cache.device(), op, ": slot_mapping must be on kv_cache's device ",
              kv_cache.device(), ", got ", slot_mapping.device());
  TORCH_CHECK((slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong) &&
                  slot_mapping.dim() == 1 && slot_mapping.size(0) == T_,
              op, ": slot_mapping must be an int32 or int64 [", T_, "] tensor, got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  if (T_ == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const at::Tensor slots = slot_mapping.contiguous();
  WriteParams p{};
  p.cache = kv_cache.data_ptr();
  p.kv_c = kv_c.data_ptr();
  p.k_pe = k_pe.data_ptr();
  p.slots = slots.data_ptr();
  p.scb = stride_of(kv_cache, 0);
  p.scp = stride_of(kv_cache, 1);
  p.skc = stride_of(kv_c, 0);
  p.skp = stride_of(k_pe, 0);
  p.tokens = T_;
  p.n_slots = kv_cache.size(0) * kv_cache.size(1);
  p.page = static_cast<int>(kv_cache.size(1));
  p.Dc = static_cast<int>(Dc);
  p.Dr = static_cast<int>(Dr);
  if (p.n_slots == 0) return;  // every slot lies outside an empty cache
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float<CudaTypes>(kv_cache.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // an empty part has no pointer worth checking
    const bool aligned = Dc % kVec == 0 && Dr % kVec == 0 && p.scb % kVec == 0 && p.scp % kVec == 0 &&
                         p.skc % kVec == 0 && p.skp % kVec == 0 && aligned16(p.cache) &&
                         (Dc == 0 || aligned16(p.kv_c)) && (Dr == 0 || aligned16(p.k_pe));
    const int vec = aligned ? kVec : 1;
    const int bx = static_cast<int>(std::min<int64_t>(256, (D / vec + 31) / 32 * 32));
    const int by = std::max(1, 256 / bx);
    const dim3 block(bx, by);
    const int64_t blocks = (T_ + by - 1) / by;
    TORCH_CHECK(blocks <= kMaxInt, op, ": ", T_, " tokens are too many for one launch");
    const dim3 grid(static_cast<unsigned>(blocks));
    const bool i64 = slots.scalar_type() == at::kLong;
    if (aligned) {
      if (i64) cache_write_kernel<T, int64_t, kVec, true><<<grid, block, 0, stream>>>(p);
      else cache_write_kernel<T, int32_t, kVec, true><<<grid, block, 0, stream>>>(p);
    } else {
      if (i64) cache_write_kernel<T, int64_t, 1, false><<<grid, block, 0, stream>>>(p);
      else cache_write_kernel<T, int32_t, 1, false><<<grid, block, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace quickllm

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_mla_decode", &quickllm::mla_decode_cuda);
  m.impl("_cuda_mla_cache_write", &quickllm::mla_cache_write_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("mla_decode", &quickllm::mla_decode_cuda);
  m.impl("mla_cache_write", &quickllm::mla_cache_write_cuda);
#endif
}
