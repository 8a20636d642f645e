// MoE dispatch and combine: the (token, choice) pairs of topk_ids [T, k] grouped by expert, the
// activations gathered into that order, the SwiGLU between the two grouped GEMMs, and the expert
// outputs summed back per token. Semantics: quickllm_kernels/moe/reference.py.
//
// moe_sort, moe_align_block_size: a stable counting sort, all on the GPU (no host sync). Pair
// p = t * k + j has key = its expert id, or E for an id outside [0, E), so bad pairs sort after every
// expert. Its sorted row is start[key] + (pairs of the same key before p): the order inside an expert
// is increasing p, what torch's stable sort gives, and nothing depends on the order atomics land in.
//   T*k <= kSmallPairs (decode): one CTA, one launch.
//   Larger: three launches over chunks of kChunk pairs.
//     1. histogram: count[key, chunk] into a workspace ws [E+1, chunks], key-major.
//     2. scan (one CTA): an exclusive scan of ws flattened. Sorted order is key-major then chunk, so
//        ws[key, chunk] becomes the first sorted row of that chunk's pairs of that key; the key starts
//        give offs (sort) or the padded layout, expert_ids and the pad slots (align).
//     3. place: per chunk, each pair's rank among the chunk's earlier pairs of its key, plus ws.
//   Inside a CTA, warp w owns a contiguous slice of the pairs and its own counts cnt[w, key] in shared
//   memory, walked in rounds of 32 pairs in order: __match_any_sync finds the lanes with the same key,
//   the popcount of the lower ones is the rank inside the round, and the lowest of them (the leader)
//   advances cnt[w, key]. Warps' counts are prefix-summed over w per key in between. W x (E+1) ints of
//   shared memory bound E: about 1500 experts within the default 48 KiB, more by opt-in.
// moe_permute, moe_combine, silu_mul(_backward): row-wise, threads along the row, 16-byte vector
//   accesses when the host finds every row aligned. Math in float32 with products rounded as torch
//   rounds them (__fmul_rn / __fadd_rn keep nvcc from contracting them into FMAs), so the results match
//   the reference to float32 rounding.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/common/dispatch.cuh"
#include "csrc/common/host_checks.h"
#include "csrc/common/vec.cuh"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace quickllm {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kSmallPairs = 4096;   // up to this many pairs: the one-CTA sort
constexpr int kChunk = 2048;        // pairs per CTA of the chunked sort
constexpr int kSortWarps = 8;       // warps per CTA of both sorts (each owns kChunk / 8 pairs in a chunk)
constexpr int kScanThreads = 1024;  // the one CTA of the chunked sort's scan
// Pair indices and sorted rows are int32 (as the outputs are); the margin keeps p0 + 31 of the last
// round and the last chunk's bounds in range.
constexpr int64_t kMaxPairs = std::numeric_limits<int>::max() - kChunk;
constexpr size_t kDefaultSmem = 48 * 1024;

// ------------------------------------------------------------------------------------------------
// Counting sort
// ------------------------------------------------------------------------------------------------

template <typename IdT>
__device__ __forceinline__ int key_of(IdT id, int E) {
  return id >= 0 && id < E ? static_cast<int>(id) : E;
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int u = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += u;
  }
  return v;
}

// The exclusive prefix of s over the block's threads in thread order; total gets the block's sum.
// Every thread calls it; warp_tot is 32 ints of shared memory, free again when it returns.
__device__ int block_exclusive_prefix(int s, int* warp_tot, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int incl = warp_inclusive_scan(s);
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < nwarps ? warp_tot[lane] : 0;
    warp_tot[lane] = warp_inclusive_scan(v);
  }
  __syncthreads();
  total = warp_tot[nwarps - 1];
  const int excl = (warp > 0 ? warp_tot[warp - 1] : 0) + incl - s;
  __syncthreads();  // the next call may overwrite warp_tot
  return excl;
}

// In-place exclusive scan of a[0, L) in shared memory (complete before the call); returns the sum.
// Each thread scans a contiguous segment: these arrays are E-sized and scanned once per launch.
__device__ int block_exclusive_scan(int* a, int L, int* warp_tot) {
  const int per = (L + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int lo = min(L, static_cast<int>(threadIdx.x) * per), hi = min(L, lo + per);
  int s = 0;
  for (int i = lo; i < hi; ++i) s += a[i];
  int total;
  int run = block_exclusive_prefix(s, warp_tot, total);
  for (int i = lo; i < hi; ++i) {
    const int v = a[i];
    a[i] = run;
    run += v;
  }
  __syncthreads();
  return total;
}

// Adds this warp's pairs [lo, hi) to its counts cnt_w[key]. Bounds are uniform over the warp.
template <typename IdT>
__device__ void warp_count(const IdT* __restrict__ ids, int lo, int hi, int E, int* cnt_w) {
  const int lane = threadIdx.x & 31;
  for (int p0 = lo; p0 < hi; p0 += 32) {
    const int p = p0 + lane;
    const int key = p < hi ? key_of(ids[p], E) : -1;
    const unsigned peers = __match_any_sync(kFull, key);
    if (key >= 0 && lane == __ffs(peers) - 1) cnt_w[key] += __popc(peers);
    __syncwarp();  // orders this round's updates before the next round's leaders read
  }
}

// Places this warp's pairs [lo, hi): the row of pair p is first_w[key] (+ base[key] when base is
// given) + its rank among the warp's earlier pairs of that key. first_w advances as pairs are placed.
// Sort: sorted[row] = p, pair_rows[p] = row, or -1 for a bad id. Align: sorted[row] = p for good ids only.
template <typename IdT, bool ALIGN>
__device__ void warp_place(const IdT* __restrict__ ids, int lo, int hi, int E, int* first_w, const int* base,
                           int32_t* __restrict__ sorted, int32_t* __restrict__ pair_rows) {
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;
  for (int p0 = lo; p0 < hi; p0 += 32) {
    const int p = p0 + lane;
    const int key = p < hi ? key_of(ids[p], E) : -1;
    const unsigned peers = __match_any_sync(kFull, key);
    const int leader = __ffs(peers) - 1;
    int first = 0;
    if (key >= 0 && lane == leader) {
      first = first_w[key];
      first_w[key] = first + __popc(peers);
      if (base) first += base[key];
    }
    const int row = __shfl_sync(kFull, first, leader) + __popc(peers & lower);
    if (key >= 0) {
      if constexpr (ALIGN) {
        if (key < E) sorted[row] = p;
      } else {
        sorted[row] = p;
        pair_rows[p] = key < E ? row : -1;
      }
    }
    __syncwarp();
  }
}

struct AlignOut {
  int32_t* sorted_ids;  // [size]
  int32_t* expert_ids;  // [n_blocks]
  int32_t* total;       // [1]
  int size, n_blocks, block_size;
};

// vLLM's padded layout from start[0, E] (start[E] = the pairs with good ids): each expert's run rounded
// up to a multiple of block_size. Leaves the padded starts in pad[0, E] (pad[E] = total) and writes
// num_tokens_post_pad, expert_ids and the slots no pair goes to (numel, the "no pair" marker), so
// sorted_ids needs no fill beforehand. Every thread calls it; start is complete before the call.
__device__ void align_layout(const int* start, int* pad, int* warp_tot, int E, int numel, const AlignOut& o) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  for (int e = tid; e < E; e += nt) {
    const int c = start[e + 1] - start[e];
    pad[e] = (c + o.block_size - 1) / o.block_size * o.block_size;
  }
  __syncthreads();
  const int total = block_exclusive_scan(pad, E, warp_tot);
  if (tid == 0) {
    pad[E] = total;
    o.total[0] = total;
  }
  __syncthreads();
  for (int e = tid >> 5; e < E; e += nt >> 5) {  // a warp per expert: at most block_size - 1 pads each
    const int64_t end = pad[e + 1];
    for (int64_t i = static_cast<int64_t>(pad[e]) + (start[e + 1] - start[e]) + lane; i < end; i += 32) {
      o.sorted_ids[i] = numel;
    }
  }
  for (int64_t i = static_cast<int64_t>(total) + tid; i < o.size; i += nt) o.sorted_ids[i] = numel;
  for (int b = tid; b < o.n_blocks; b += nt) {
    const int64_t pos = static_cast<int64_t>(b) * o.block_size;
    int e = -1;
    if (pos < total) {  // the expert whose padded run holds pos: the last e with pad[e] <= pos
      int l = 1, r = E;  // first j in [1, E] with pad[j] > pos; pad[0] = 0 <= pos < pad[E]
      while (l < r) {
        const int m = (l + r) >> 1;
        if (pad[m] > pos) r = m;
        else l = m + 1;
      }
      e = l - 1;
    }
    o.expert_ids[b] = e;
  }
}

struct SortOut {
  int32_t* sorted;     // sorted_pairs [n] (sort) or sorted_token_ids [size] (align)
  int32_t* pair_rows;  // [n] (sort only)
  int32_t* offs;       // [E] (sort only)
  AlignOut align;      // (align only)
};

// The whole sort in one CTA of kSortWarps warps. Shared memory: cnt [W, E+1], start [E+1],
// pad [E+1], warp_tot [32].
template <typename IdT, bool ALIGN>
__global__ void __launch_bounds__(32 * kSortWarps)
    sort_small_kernel(const IdT* __restrict__ ids, int n, int E, const SortOut o) {
  extern __shared__ int smem[];
  const int K = E + 1, tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, W = nt >> 5;
  int* cnt = smem;
  int* start = cnt + W * K;
  int* pad = start + K;
  int* warp_tot = pad + K;
  for (int i = tid; i < W * K; i += nt) cnt[i] = 0;
  __syncthreads();
  const int per = (n + W - 1) / W;
  const int lo = min(n, warp * per), hi = min(n, lo + per);
  warp_count(ids, lo, hi, E, cnt + warp * K);
  __syncthreads();
  for (int key = tid; key < K; key += nt) {  // cnt[w, key] -> key's pairs in warps before w
    int run = 0;
    for (int w = 0; w < W; ++w) {
      const int c = cnt[w * K + key];
      cnt[w * K + key] = run;
      run += c;
    }
    start[key] = run;
  }
  __syncthreads();
  block_exclusive_scan(start, K, warp_tot);
  const int* base = start;
  if constexpr (ALIGN) {
    align_layout(start, pad, warp_tot, E, n, o.align);
    base = pad;
  } else {
    for (int e = tid; e < E; e += nt) o.offs[e] = start[e + 1];
  }
  warp_place<IdT, ALIGN>(ids, lo, hi, E, cnt + warp * K, base, o.sorted, o.pair_rows);
}

// Chunked sort, launch 1: ws[key * chunks + chunk] = pairs of the chunk with that key.
// Shared memory: hist [E+1].
template <typename IdT>
__global__ void __launch_bounds__(32 * kSortWarps)
    sort_histogram_kernel(const IdT* __restrict__ ids, int n, int E, int* __restrict__ ws) {
  extern __shared__ int hist[];
  const int K = E + 1, tid = threadIdx.x, nt = blockDim.x;
  const int chunks = gridDim.x, c = blockIdx.x;
  for (int i = tid; i < K; i += nt) hist[i] = 0;
  __syncthreads();
  const int lo = c * kChunk, hi = min(n, lo + kChunk);
  for (int p = lo + tid; p < hi; p += nt) atomicAdd(&hist[key_of(ids[p], E)], 1);  // counts: order-free
  __syncthreads();
  for (int key = tid; key < K; key += nt) ws[static_cast<int64_t>(key) * chunks + c] = hist[key];
}

// Chunked sort, launch 2 (one CTA): ws flattened -> exclusive scan, then offs or the padded layout;
// for align, shift[e] = padded start - start of expert e. Shared memory: start [E+1], pad [E+1],
// warp_tot [32].
template <bool ALIGN>
__global__ void __launch_bounds__(kScanThreads)
    sort_scan_kernel(int* __restrict__ ws, int chunks, int n, int E, int* __restrict__ shift, const SortOut o) {
  extern __shared__ int smem[];
  const int K = E + 1, tid = threadIdx.x;
  int* start = smem;
  int* pad = start + K;
  int* warp_tot = pad + K;
  const int64_t L = static_cast<int64_t>(K) * chunks;
  // Tiles of 4 ints per thread, read and written as int4 (ws is allocator-aligned, tiles start at
  // multiples of 4): one pass over ws at the CTA's full bandwidth.
  int carry = 0;
  for (int64_t t0 = 0; t0 < L; t0 += 4 * static_cast<int64_t>(blockDim.x)) {
    const int64_t i0 = t0 + 4 * static_cast<int64_t>(tid);
    const bool full = i0 + 4 <= L;
    int v[4];
    if (full) {
      const int4 q = *reinterpret_cast<const int4*>(ws + i0);
      v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = i0 + j < L ? ws[i0 + j] : 0;
    }
    int tile_total;
    int run = carry + block_exclusive_prefix(v[0] + v[1] + v[2] + v[3], warp_tot, tile_total);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = v[j];
      v[j] = run;
      if (i0 + j < L && (i0 + j) % chunks == 0) start[(i0 + j) / chunks] = run;
      run += c;
    }
    if (full) {
      *reinterpret_cast<int4*>(ws + i0) = make_int4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (i0 + j < L) ws[i0 + j] = v[j];
    }
    carry += tile_total;
  }
  __syncthreads();
  if constexpr (ALIGN) {
    align_layout(start, pad, warp_tot, E, n, o.align);
    for (int e = tid; e < E; e += blockDim.x) shift[e] = pad[e] - start[e];
  } else {
    for (int e = tid; e < E; e += blockDim.x) o.offs[e] = start[e + 1];
  }
}

// Chunked sort, launch 3: places the chunk's pairs from the scanned ws (+ shift for align).
// Shared memory: cnt [W, E+1].
template <typename IdT, bool ALIGN>
__global__ void __launch_bounds__(32 * kSortWarps)
    sort_place_kernel(const IdT* __restrict__ ids, int n, int E, const int* __restrict__ ws,
                      const int* __restrict__ shift, const SortOut o) {
  extern __shared__ int cnt[];
  const int K = E + 1, tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, W = nt >> 5;
  const int chunks = gridDim.x, c = blockIdx.x;
  for (int i = tid; i < W * K; i += nt) cnt[i] = 0;
  __syncthreads();
  const int per = kChunk / W;
  const int lo = min(n, c * kChunk + warp * per), hi = min(n, lo + per);
  warp_count(ids, lo, hi, E, cnt + warp * K);
  __syncthreads();
  for (int key = tid; key < K; key += nt) {  // cnt[w, key] -> first sorted row of the warp's pairs of key
    int run = ws[static_cast<int64_t>(key) * chunks + c];
    if (ALIGN && key < E) run += shift[key];
    for (int w = 0; w < W; ++w) {
      const int v = cnt[w * K + key];
      cnt[w * K + key] = run;
      run += v;
    }
  }
  __syncthreads();
  warp_place<IdT, ALIGN>(ids, lo, hi, E, cnt + warp * K, nullptr, o.sorted, o.pair_rows);
}

// Dynamic shared memory past the default 48 KiB needs a per-kernel opt-in (only for E past ~1500).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_smem(size_t bytes, const char* op, int64_t E) {
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= std::max(optin, kDefaultSmem), op, ": num_experts = ", E, " needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", optin);
}

template <typename IdT, bool ALIGN>
void counting_sort(const at::Tensor& ids_t, int n, int E, const SortOut& o, const char* op) {
  const IdT* ids = ids_t.data_ptr<IdT>();
  const int K = E + 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  const size_t cnt_bytes = sizeof(int) * static_cast<size_t>(kSortWarps) * K;
  const size_t layout_bytes = sizeof(int) * (2 * static_cast<size_t>(K) + 32);
  if (n <= kSmallPairs) {
    const size_t smem = cnt_bytes + layout_bytes;
    check_smem(smem, op, E);
    auto kernel = sort_small_kernel<IdT, ALIGN>;
    allow_smem(kernel, smem);
    kernel<<<1, 32 * kSortWarps, smem, stream>>>(ids, n, E, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  check_smem(std::max(cnt_bytes, layout_bytes), op, E);
  const int chunks = (n + kChunk - 1) / kChunk;
  // ws [E+1, chunks], then shift [E]; int32 (values are at most n).
  const at::Tensor ws_t = at::empty({static_cast<int64_t>(K) * chunks + E}, ids_t.options().dtype(at::kInt));
  int* ws = ws_t.data_ptr<int>();
  int* shift = ws + static_cast<int64_t>(K) * chunks;
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(ws) % 16 == 0, op, ": the scan reads its workspace as int4");

  auto histogram = sort_histogram_kernel<IdT>;
  auto scan = sort_scan_kernel<ALIGN>;
  auto place = sort_place_kernel<IdT, ALIGN>;
  const size_t hist_bytes = sizeof(int) * static_cast<size_t>(K);
  allow_smem(histogram, hist_bytes);
  allow_smem(scan, layout_bytes);
  allow_smem(place, cnt_bytes);
  histogram<<<chunks, 32 * kSortWarps, hist_bytes, stream>>>(ids, n, E, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan<<<1, kScanThreads, layout_bytes, stream>>>(ws, chunks, n, E, shift, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  place<<<chunks, 32 * kSortWarps, cnt_bytes, stream>>>(ids, n, E, ws, shift, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_ids(const at::Tensor& ids, int64_t E, const char* op) {
  TORCH_CHECK(ids.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got topk_ids on ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": topk_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), op, ": topk_ids must be contiguous, got strides ", ids.strides());
  TORCH_CHECK(ids.numel() <= kMaxPairs, op, ": topk_ids has ", ids.numel(), " pairs, more than the ", kMaxPairs,
              " the int32 outputs can index");
  TORCH_CHECK(E >= 1 && E < std::numeric_limits<int>::max(), op, ": num_experts must be positive, got ", E);
}

template <bool ALIGN>
void sort_dispatch(const at::Tensor& ids, int n, int E, const SortOut& o, const char* op) {
  if (ids.scalar_type() == at::kInt) counting_sort<int32_t, ALIGN>(ids, n, E, o, op);
  else counting_sort<int64_t, ALIGN>(ids, n, E, o, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_sort_cuda(const at::Tensor& topk_ids, int64_t num_experts) {
  check_ids(topk_ids, num_experts, "moe_sort");
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const int64_t n = topk_ids.numel();
  const auto opts = topk_ids.options().dtype(at::kInt);
  auto sorted = at::empty({n}, opts);
  auto rows = at::empty({n}, opts);
  if (n == 0) return {sorted, rows, at::zeros({num_experts}, opts)};
  auto offs = at::empty({num_experts}, opts);
  SortOut o{};
  o.sorted = sorted.data_ptr<int32_t>();
  o.pair_rows = rows.data_ptr<int32_t>();
  o.offs = offs.data_ptr<int32_t>();
  sort_dispatch<false>(topk_ids, static_cast<int>(n), static_cast<int>(num_experts), o, "moe_sort");
  return {sorted, rows, offs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                                         int64_t num_experts, int64_t block_size) {
  check_ids(topk_ids, num_experts, "moe_align_block_size");
  TORCH_CHECK(block_size >= 1 && block_size <= std::numeric_limits<int>::max(),
              "moe_align_block_size: block_size must lie in [1, 2^31), got ", block_size);
  const int64_t n = topk_ids.numel();
  // align_size of the reference: at most block_size - 1 pads per expert, and no more blocks than pairs
  int64_t size = n + num_experts * (block_size - 1);
  if (n < num_experts) size = std::min(size, n * block_size);
  TORCH_CHECK(size <= std::numeric_limits<int>::max() - block_size, "moe_align_block_size: T*k + E*(block_size-1) = ",
              size, " does not fit int32 indices");
  const int64_t n_blocks = (size + block_size - 1) / block_size;
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const auto opts = topk_ids.options().dtype(at::kInt);
  auto sorted_ids = at::empty({size}, opts);
  auto expert_ids = at::empty({n_blocks}, opts);
  if (n == 0) return {sorted_ids, expert_ids, at::zeros({1}, opts)};  // size = 0 then
  auto total = at::empty({1}, opts);
  SortOut o{};
  o.sorted = sorted_ids.data_ptr<int32_t>();
  o.align = AlignOut{o.sorted, expert_ids.data_ptr<int32_t>(), total.data_ptr<int32_t>(), static_cast<int>(size),
                     static_cast<int>(n_blocks), static_cast<int>(block_size)};
  sort_dispatch<true>(topk_ids, static_cast<int>(n), static_cast<int>(num_experts), o, "moe_align_block_size");
  return {sorted_ids, expert_ids, total};
}

// ------------------------------------------------------------------------------------------------
// Row-wise kernels
// ------------------------------------------------------------------------------------------------

// One row per threadIdx.y, threads along x walk the row's vectors (as in rope.cu): a short row does
// not leave most of a 256-thread block idle, a long one is read by 256 threads in order.
struct RowGrid {
  dim3 grid, block;
};

RowGrid row_grid(int64_t rows, int64_t vectors_per_row) {
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), "quickllm: ", rows, " rows are too many for one launch");
  const int bx = static_cast<int>(std::min<int64_t>(256, (vectors_per_row + 31) / 32 * 32));
  const int by = std::max(1, 256 / bx);
  return {dim3(static_cast<unsigned>((rows + by - 1) / by)), dim3(bx, by)};
}

__device__ __forceinline__ int64_t row_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}

// out[i] = x[sorted_pairs[i] / top_k]; a pair index outside [0, n_pairs) gives a NaN row.
template <typename T, int VEC, bool ALIGNED>
__global__ void permute_kernel(const T* __restrict__ x, int64_t sx, const int32_t* __restrict__ sorted_pairs,
                               T* __restrict__ out, int64_t n, int64_t H, int top_k, int64_t n_pairs) {
  const int64_t i = row_index();
  if (i >= n) return;
  const int64_t p = sorted_pairs[i];
  const bool valid = p >= 0 && p < n_pairs;
  const T* src = x + (valid ? p / top_k : 0) * sx;
  T* dst = out + i * H;
  Pack<T, VEC> nan_row;
#pragma unroll
  for (int e = 0; e < VEC; ++e) nan_row.v[e] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < H; c += static_cast<int64_t>(blockDim.x) * VEC)
    store<ALIGNED, VEC>(dst + c, valid ? load<ALIGNED, VEC>(src + c) : nan_row);
}

// out[t] = sum_j w[t, j] * y[pair_rows[t*k + j]] in float32, j in order; a row < 0 adds nothing, a row
// >= n_rows adds NaN (never read).
template <typename T, int VEC, bool ALIGNED>
__global__ void combine_kernel(const T* __restrict__ y, int64_t sy, int64_t n_rows, const float* __restrict__ w,
                               const int32_t* __restrict__ pair_rows, T* __restrict__ out, int64_t tokens, int k,
                               int64_t H) {
  const int64_t t = row_index();
  if (t >= tokens) return;
  const float* wt = w + t * k;
  const int32_t* rt = pair_rows + t * k;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < H; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int j = 0; j < k; ++j) {
      const int64_t r = rt[j];
      if (r < 0) continue;
      if (r >= n_rows) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += nan;
        continue;
      }
      const float wj = wt[j];
      const auto v = load<ALIGNED, VEC>(y + r * sy + c);
      // the product rounded on its own, as torch's g * w before the sum (no FMA)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += __fmul_rn(static_cast<float>(v.v[e]), wj);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<T>(acc[e]);
    store<ALIGNED, VEC>(out + t * H + c, o);
  }
}

// torch's formulas in float32: silu(g) = g / (1 + exp(-g)), sigmoid(g) = 1 / (1 + exp(-g)), with expf
// (not __expf) as torch's CUDA kernels use.
__device__ __forceinline__ float silu_f(float g) { return g / (1.f + expf(-g)); }
__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

// out[s] = silu(h[s, :I]) * h[s, I:]
template <typename T, int VEC, bool ALIGNED>
__global__ void silu_mul_kernel(const T* __restrict__ h, int64_t sh, T* __restrict__ out, int64_t S, int64_t I) {
  const int64_t s = row_index();
  if (s >= S) return;
  const T* hr = h + s * sh;
  T* orow = out + s * I;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < I; c += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto g = load<ALIGNED, VEC>(hr + c);
    const auto u = load<ALIGNED, VEC>(hr + I + c);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<T>(silu_f(static_cast<float>(g.v[e])) * static_cast<float>(u.v[e]));
    store<ALIGNED, VEC>(orow + c, o);
  }
}

// out[s] = [dg, du]: dg = d * u * s * (1 + g * (1 - s)), du = d * g * s, s = sigmoid(g), evaluated in
// torch's order with each operation rounded (no FMA), as the reference does tensor by tensor.
template <typename T, int VEC, bool ALIGNED>
__global__ void silu_mul_backward_kernel(const T* __restrict__ grad, int64_t sg, const T* __restrict__ h, int64_t sh,
                                         T* __restrict__ out, int64_t S, int64_t I) {
  const int64_t r = row_index();
  if (r >= S) return;
  const T* gr = grad + r * sg;
  const T* hr = h + r * sh;
  T* orow = out + r * 2 * I;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < I; c += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto d = load<ALIGNED, VEC>(gr + c);
    const auto g = load<ALIGNED, VEC>(hr + c);
    const auto u = load<ALIGNED, VEC>(hr + I + c);
    Pack<T, VEC> dg, du;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float df = static_cast<float>(d.v[e]), gf = static_cast<float>(g.v[e]), uf = static_cast<float>(u.v[e]);
      const float s = sigmoid_f(gf);
      const float tail = __fadd_rn(1.f, __fmul_rn(gf, 1.f - s));
      dg.v[e] = static_cast<T>(__fmul_rn(__fmul_rn(__fmul_rn(df, uf), s), tail));
      du.v[e] = static_cast<T>(__fmul_rn(__fmul_rn(df, gf), s));
    }
    store<ALIGNED, VEC>(orow + c, dg);
    store<ALIGNED, VEC>(orow + I + c, du);
  }
}

// Launches K<T, VEC, true> when `aligned` (VEC = 16 bytes of T), else K<T, 1, false>; `row_len` is the
// elements each thread-x pass walks per row.
#define QUICKLLM_ROW_LAUNCH(KERNEL, aligned, rows, row_len, ...)                             \
  do {                                                                                      \
    constexpr int kVec = 16 / sizeof(T);                                                    \
    auto stream = at::cuda::getCurrentCUDAStream();                                         \
    if (aligned) {                                                                          \
      const RowGrid rg = row_grid(rows, (row_len) / kVec);                                  \
      KERNEL<T, kVec, true><<<rg.grid, rg.block, 0, stream>>>(__VA_ARGS__);                 \
    } else {                                                                                \
      const RowGrid rg = row_grid(rows, row_len);                                           \
      KERNEL<T, 1, false><<<rg.grid, rg.block, 0, stream>>>(__VA_ARGS__);                   \
    }                                                                                       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                         \
  } while (0)

// A [rows, cols] matrix whose rows the kernels index with one stride: unit last stride.
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, "'s last dim must have stride 1, got strides ",
              t.strides());
}

// A size-1 dim is indexed at 0 only: its stride neither matters nor spoils alignment.
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t top_k) {
  TORCH_CHECK(x.is_cuda(), "moe_permute: the CUDA kernel needs CUDA tensors, got x on ", x.device());
  check_rows(x, "moe_permute", "x");
  check_float("moe_permute", x, "x");
  TORCH_CHECK(sorted_pairs.device() == x.device(), "moe_permute: sorted_pairs must be on x's device ", x.device(),
              ", got ", sorted_pairs.device());
  TORCH_CHECK(sorted_pairs.scalar_type() == at::kInt && sorted_pairs.dim() == 1 && sorted_pairs.is_contiguous(),
              "moe_permute: sorted_pairs must be a contiguous int32 [n], got ", sorted_pairs.scalar_type(), " ",
              sorted_pairs.sizes(), " with strides ", sorted_pairs.strides());
  TORCH_CHECK(top_k >= 1 && top_k <= std::numeric_limits<int>::max(), "moe_permute: top_k must be positive, got ",
              top_k);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = sorted_pairs.size(0), H = x.size(1), T_ = x.size(0);
  auto out = at::empty({n, H}, x.options());
  if (n == 0 || H == 0) return out;
  const int64_t sx = row_stride(x);
  dispatch_float<TorchTypes>(x.scalar_type(), "moe_permute", [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = H % (16 / sizeof(T)) == 0 && sx % (16 / sizeof(T)) == 0 && aligned16(x.data_ptr());
    QUICKLLM_ROW_LAUNCH(permute_kernel, aligned, n, H, static_cast<const T*>(x.data_ptr()), sx,
                        sorted_pairs.data_ptr<int32_t>(), static_cast<T*>(out.data_ptr()), n, H,
                        static_cast<int>(top_k), T_ * top_k);
  });
  return out;
}

at::Tensor moe_combine_cuda(const at::Tensor& y, const at::Tensor& topk_weights, const at::Tensor& pair_rows) {
  TORCH_CHECK(y.is_cuda(), "moe_combine: the CUDA kernel needs CUDA tensors, got y on ", y.device());
  check_rows(y, "moe_combine", "y");
  check_float("moe_combine", y, "y");
  TORCH_CHECK(topk_weights.device() == y.device(), "moe_combine: topk_weights must be on y's device ", y.device(),
              ", got ", topk_weights.device());
  TORCH_CHECK(topk_weights.dim() == 2, "moe_combine: topk_weights must be [T, k], got ", topk_weights.sizes());
  TORCH_CHECK(at::isFloatingType(topk_weights.scalar_type()), "moe_combine: topk_weights must be a float dtype, got ",
              topk_weights.scalar_type());
  const int64_t T_ = topk_weights.size(0), k = topk_weights.size(1), H = y.size(1);
  TORCH_CHECK(pair_rows.device() == y.device(), "moe_combine: pair_rows must be on y's device ", y.device(), ", got ",
              pair_rows.device());
  TORCH_CHECK(pair_rows.scalar_type() == at::kInt && pair_rows.dim() == 1 && pair_rows.size(0) == T_ * k,
              "moe_combine: pair_rows must be int32 [T*k] = [", T_ * k, "], got ", pair_rows.scalar_type(), " ",
              pair_rows.sizes());
  TORCH_CHECK(pair_rows.is_contiguous(), "moe_combine: pair_rows must be contiguous, got strides ",
              pair_rows.strides());
  TORCH_CHECK(k <= std::numeric_limits<int>::max(), "moe_combine: k = ", k, " does not fit int32");
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({T_, H}, y.options());
  if (T_ == 0 || H == 0) return out;
  if (k == 0) return out.zero_();
  // read as float32, as the reference does: a no-op for moe_route's contiguous float32 weights
  const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
  const int64_t sy = row_stride(y);
  dispatch_float<TorchTypes>(y.scalar_type(), "moe_combine", [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = H % (16 / sizeof(T)) == 0 && sy % (16 / sizeof(T)) == 0 && aligned16(y.data_ptr());
    QUICKLLM_ROW_LAUNCH(combine_kernel, aligned, T_, H, static_cast<const T*>(y.data_ptr()), sy, y.size(0),
                        w.data_ptr<float>(), pair_rows.data_ptr<int32_t>(), static_cast<T*>(out.data_ptr()), T_,
                        static_cast<int>(k), H);
  });
  return out;
}

int64_t check_gated(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got h on ", h.device());
  check_rows(h, op, "h");
  check_float(op, h, "h");
  TORCH_CHECK(h.size(1) % 2 == 0, op, ": h must be [S, 2I] (gate, then up), got an odd last dim ", h.size(1));
  return h.size(1) / 2;
}

at::Tensor silu_mul_cuda(const at::Tensor& h) {
  const int64_t I = check_gated(h, "silu_mul"), S = h.size(0);
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = at::empty({S, I}, h.options());
  if (S == 0 || I == 0) return out;
  const int64_t sh = row_stride(h);
  dispatch_float<TorchTypes>(h.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = I % (16 / sizeof(T)) == 0 && sh % (16 / sizeof(T)) == 0 && aligned16(h.data_ptr());
    QUICKLLM_ROW_LAUNCH(silu_mul_kernel, aligned, S, I, static_cast<const T*>(h.data_ptr()), sh,
                        static_cast<T*>(out.data_ptr()), S, I);
  });
  return out;
}

at::Tensor silu_mul_backward_cuda(const at::Tensor& grad, const at::Tensor& h) {
  const int64_t I = check_gated(h, "silu_mul_backward"), S = h.size(0);
  TORCH_CHECK(grad.device() == h.device(), "silu_mul_backward: grad must be on h's device ", h.device(), ", got ",
              grad.device());
  check_rows(grad, "silu_mul_backward", "grad");
  TORCH_CHECK(grad.size(0) == S && grad.size(1) == I, "silu_mul_backward: grad must be [S, I] = [", S, ", ", I,
              "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "silu_mul_backward: grad must have h's dtype (",
              h.scalar_type(), "), got ", grad.scalar_type());
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = at::empty({S, 2 * I}, h.options());
  if (S == 0 || I == 0) return out;
  const int64_t sh = row_stride(h), sg = row_stride(grad);
  dispatch_float<TorchTypes>(h.scalar_type(), "silu_mul_backward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t v = 16 / sizeof(T);
    const bool aligned = I % v == 0 && sh % v == 0 && sg % v == 0 && aligned16(h.data_ptr()) &&
                         aligned16(grad.data_ptr());
    QUICKLLM_ROW_LAUNCH(silu_mul_backward_kernel, aligned, S, I, static_cast<const T*>(grad.data_ptr()), sg,
                        static_cast<const T*>(h.data_ptr()), sh, static_cast<T*>(out.data_ptr()), S, I);
  });
  return out;
}

#undef QUICKLLM_ROW_LAUNCH

}  // namespace
}  // namespace quickllm

TORCH_LIBRARY_IMPL(quickllm, CUDA, m) {
  m.impl("_cuda_moe_sort", &quickllm::moe_sort_cuda);
  m.impl("_cuda_moe_align_block_size", &quickllm::moe_align_block_size_cuda);
  m.impl("_cuda_moe_permute", &quickllm::moe_permute_cuda);
  m.impl("_cuda_moe_combine", &quickllm::moe_combine_cuda);
  m.impl("_cuda_silu_mul", &quickllm::silu_mul_cuda);
  m.impl("_cuda_silu_mul_backward", &quickllm::silu_mul_backward_cuda);
#ifdef QUICKLLM_STANDALONE
  m.impl("moe_sort", &quickllm::moe_sort_cuda);
  m.impl("moe_align_block_size", &quickllm::moe_align_block_size_cuda);
  m.impl("moe_permute", &quickllm::moe_permute_cuda);
  m.impl("moe_combine", &quickllm::moe_combine_cuda);
  m.impl("silu_mul", &quickllm::silu_mul_cuda);
  m.impl("silu_mul_backward", &quickllm::silu_mul_backward_cuda);
#endif
}
