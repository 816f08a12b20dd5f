// Prefill GEMM kernel family (W4A16 / W8A16, any M; Hopper sm_90a only): kernel and launcher.
//
// What it computes: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias[N]), x and y fp16 or
// bf16, 4-bit or 8-bit codes, groups 32/64/128/256 or per-channel, symmetric / zero points
// / offsets: the same product and the same packed weight as the decode kernel
// (csrc/decode_gemm.cuh has the byte-level layouts; python/dqgemm/kernels/cuda_decode.py
// packs them), so one prepared copy of a weight serves both kernels.
//
// Why it is shaped like this: from M ~ 256 up the product is bound by tensor-core
// throughput, and mma.sync reaches only part of Hopper's; wgmma.mma_async does. The public
// INT4 kernels measured in ../shared/notes/anchors.md lose to FP16 there by 1.5-3x. Here
// the weight is the A operand and comes from REGISTERS ("RS"
// wgmma): the decode layout already gives each lane 16 bytes that are its mma.m16n8k16
// A fragments of 4 (4-bit) or 2 (8-bit) k16 steps, and wgmma's register A operand has that
// same per-warp fragment layout (warp w of a warpgroup owns rows 16w..16w+15). So a lane
// dequantizes its 16 bytes with the decode kernel's lop3 / fma sequences straight into
// the registers wgmma reads; the weight never passes through shared memory as fp16.
//
// Orientation ("swap AB", as in the decode kernel): D[channels x tokens] = W x^T. A block
// owns BM tokens (64, 128 or 256) and 128 x NT output channels (NT = 1 or 2 n_tiles of the
// layout), computed by two warpgroups issuing m64nBMk16 wgmma into BM/2 fp32 accumulators
// per thread and m64 row block: with NT = 1 warpgroup g takes channels 64g..64g+63, with
// NT = 2 it takes n_tile 2t + g whole (two m64 row blocks; the shared x tile then feeds
// twice the channels). x is the B operand: K-major (k contiguous per token); a stage holds
// BM rows of 64 k = 128 bytes each, with the 128-byte swizzle (16-byte chunk c of row r at
// chunk c ^ (r % 8), rows at 128-byte pitch, 1024-byte aligned tiles): the layout the
// descriptor's SWIZZLE_128B mode reads, and conflict-free for the cp.async writes. A k16
// step is the descriptor's start address + 32 bytes. The cp.async writes (generic proxy)
// are ordered before wgmma's reads (async proxy) by fence.proxy.async.
//
// Pipeline: a STAGES-deep cp.async ring of (x tile, 4 or 8 KB of weights per n_tile, group
// parameters) per 64 k. wgmma runs asynchronously: a warpgroup issues stage i's wgmma, then
// waits until stage i - 1's have finished (wait_group 1), so the dequantization of stage
// i + 1 overlaps stage i's tensor-core work; the A registers alternate between two sets.
// Two ways to feed the ring (Config::kWS):
//   - 256 threads that copy and compute: the block barrier of stage i + 1 may be passed
//     while stage i - 1 is still read by wgmma, so the ring refills the slot of stage i - 2
//     (STAGES - 2 stages in flight);
//   - warp-specialized (384 threads): a third warpgroup only copies: one of its threads
//     issues, per stage, a TMA tile load of x (tensor map with the 128-byte swizzle, made
//     by the launcher; zeros outside [M, K]) and bulk copies of the stage's weight and
//     group-parameter bytes, completing on a "full" mbarrier by byte count; the 256
//     computing threads arrive on an "empty" one once the wgmma that read the stage are
//     done. setmaxnreg gives the copying warpgroup 40 registers and the computing ones 232.
//     Measured on the H200 (bench/results/NOTES.md, "Prefill"): the copying warpgroup
//     1.15-1.3x at M >= 256; TMA instead of its 128 threads of cp.async another 1.07-1.19x.
//
// Work partition: one block per (block column of NT n_tiles, m_tile, k split); the m tiles of
// a column are neighbours in launch order (they share the weight through L2). With
// k_splits > 1 every block writes fp32 partial sums to its workspace slot and the last of a
// tile's blocks to arrive (an atomic counter, reset by it) sums all slots in split order:
// bitwise reproducible, no memset, CUDA-graph safe. Stream-K (warp-specialized only,
// PrefillGemmParams::stream_k_blocks): a grid of about one block per SM, each block a
// contiguous, equal share of the (tile, 64-k stage) units, so a layer with few tiles (80
// tiles of 256x128 on 132 SMs) or a partial last wave keeps every SM busy; the tiles a
// block finishes only in part are summed by the same counter scheme (the output of a
// stream-K block is not staged through shared memory: the ring is still in use).
//
// Constraints (checked by the launcher): sm_90a build, K % 8 == 0, x 16-byte aligned,
// m_tile in {64, 128, 256}, n_tile 128 or 256 (256 only with m_tile <= 128: registers),
// padded sizes multiples of 128,
// 1 <= k_splits <= K_pad / 64.
// Test: pytest tests/test_cuda_prefill.py. Benchmark: python -m dqgemm bench (kernel
// "cuda_prefill"), bench/cuda_prefill_bench.py for the tile / split sweep.

#include <cuda.h>          // CUtensorMap (the type only: the encoder is fetched at run time)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "decode_gemm.cuh"
#include "wgmma.cuh"

namespace dqgemm {
namespace prefill {

using decode::bulk_load;
using decode::mbar_arrive_expect_tx;
using decode::cp_async16_stream;
using decode::cp_async16_zfill;
using decode::cp_async_commit;
using decode::cp_async_wait;
using decode::GroupConsts;
using decode::GroupRegs;
using decode::GroupRegsF32;
using decode::lds128;
using decode::Pair;
using decode::smem_addr;

template <int BITS, int BM, int NT, int STAGES, int MIN_BLOCKS, bool WS = false>
struct Config {
  static constexpr int kBits = BITS;
  static constexpr int kBM = BM;                // tokens per block tile (wgmma n)
  static constexpr int kNT = NT;                // layout n_tiles (128 channels) per block
  static constexpr int kStages = STAGES;
  static constexpr int kMinBlocks = MIN_BLOCKS; // blocks per SM the ring depth allows
  static constexpr int kBN = 128 * NT;          // channels per block
  static constexpr int kBK = 64;                // k per stage
  // WS (warp specialization): a third warpgroup only copies (cp.async into the ring,
  // "full" / "empty" mbarriers per stage, setmaxnreg moves registers from it to the
  // two computing warpgroups); without it the computing threads copy too and the
  // stages are handed over by the block barrier.
  static constexpr bool kWS = WS;
  // A stream-K instantiation (the copying warpgroup is needed; 128 x 256 channels has no
  // registers left for it: see prefill_gemm_kernel).
  static constexpr bool kHasStreamK = WS && !(BM == 128 && NT == 2);
  static constexpr int kComputeThreads = 256;   // two computing warpgroups
  static constexpr int kThreads = WS ? 384 : 256;
  // NT = 1: warpgroup g computes channels 64g..64g+63 of the n_tile (one m64 half);
  // NT = 2: warpgroup g computes all 128 channels of n_tile 2t + g (two m64 halves), so
  //         each x tile in shared memory feeds twice the channels (half the x traffic
  //         per MAC from L2), at twice the dequantization per warp.
  static constexpr int kHalves = NT;            // m64 wgmma row blocks per warpgroup
  static constexpr int kSpan = BITS == 4 ? 64 : 32;  // k per 16-byte lane chunk
  static constexpr int kChunks = kBK / kSpan;         // lane chunks per slice and stage
  static constexpr int kXBytes = BM * 128;            // BM rows of 64 k (fp16 / bf16)
  static constexpr int kTileWBytes = kChunks * 4096;  // one n_tile x 64 k of codes
  static constexpr int kWBytes = NT * kTileWBytes;
  static constexpr int kTilePBytes = 512;             // <= 2 groups (g32) x 256 bytes
  static constexpr int kPBytes = NT * kTilePBytes;
  static constexpr int kStageBytes = kXBytes + kWBytes + 2 * kPBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes + 1024;  // + alignment slack
  static constexpr int kAccRegs = BM / 2;             // per half
  static_assert(kStageBytes % 1024 == 0, "stages must stay 1024-byte aligned (swizzle)");
  static_assert(kSmemBytes * MIN_BLOCKS <= 227 * 1024, "ring too deep for the SM's shared memory");
  static_assert(WS || STAGES >= 3, "the ring keeps STAGES - 2 stages in flight");
  static_assert(NT == 1 || NT == 2, "one or two n_tiles per block");
};

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: rows of
// 128 bytes, 8-row groups 1024 bytes apart (stride byte offset), leading byte offset unused
// (a k16 step never crosses the 128-byte swizzle row), layout type 1 = SWIZZLE_128B.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Ordering of the cp.async writes of a stage (generic proxy) before wgmma reads it (async
// proxy): required by the PTX memory model, executed after the data is known to be there.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The copying warpgroup's copies (WS configurations): one thread issues, per stage, a TMA
// tile load of the x tile (the tensor map's 128-byte swizzle writes exactly the layout the
// wgmma descriptor reads; rows >= M and k >= K come back as zeros) and bulk copies of the
// stage's contiguous weight and group-parameter bytes, all completing on the stage's "full"
// mbarrier by byte count. Measured against 128 threads of cp.async: bench/results/NOTES.md.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}

// Barrier of the two computing warpgroups only (the copying one may have left).
__device__ __forceinline__ void compute_sync() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// kStreamK: the stream-K partition (warp-specialized configurations only). A separate
// instantiation, so that the other kernels keep their register allocation: with the
// stream-K loop in the same function the 128x256ws kernels lost their wgmma pipelining
// (ptxas C7512: too few registers within the 168 that 384 threads leave). For the same
// reason 128x256ws has no stream-K instantiation (Config::kHasStreamK).
template <typename T, typename Cfg, bool kStreamK = false>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
prefill_gemm_kernel(const PrefillGemmParams p, const __grid_constant__ CUtensorMap x_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(!kStreamK || Cfg::kHasStreamK, "no stream-K instantiation for this tile");
  using P = Pair<T>;
  using Mma = wgmma::Wgmma<T, Cfg::kBM>;
  constexpr int kBM = Cfg::kBM, kStages = Cfg::kStages, kBits = Cfg::kBits;
  constexpr int kAcc = Cfg::kAccRegs, kNT = Cfg::kNT, kHalves = Cfg::kHalves;
  constexpr bool kF32Path = kBits == 8 && P::kMagic == 0x43004300u;  // INT8 bf16
  extern __shared__ uint8_t smem_raw[];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup
  const int64_t m_rows = p.m;
  const int64_t k_real = p.k;
  const int m_tiles = static_cast<int>((m_rows + kBM - 1) / kBM);
  const int splits = p.k_splits;
  const int tile = blockIdx.x / splits;
  const int split = blockIdx.x - tile * splits;
  const int m_t = tile % m_tiles;
  const int64_t n_t = tile / m_tiles;  // block column: n_tiles kNT n_t .. kNT n_t + kNT - 1
  const int64_t n_tiles = p.n_pad / 128;
  const int64_t m0 = static_cast<int64_t>(m_t) * kBM;
  const int k_stages = static_cast<int>(p.k_pad / Cfg::kBK);
  const int kb_begin = static_cast<int>(static_cast<int64_t>(split) * k_stages / splits);
  const int kb_end = static_cast<int>(static_cast<int64_t>(split + 1) * k_stages / splits);
  const int n_stages = kb_end - kb_begin;
  // Output tiles (stream-K): m tiles x block columns of kNT n_tiles.
  const int64_t sk_tiles = m_tiles * ((n_tiles + kNT - 1) / kNT);
  const int gs_log2 = p.group_size_log2;
  const int mode = static_cast<int>(p.zero_mode);
  const bool two_groups = gs_log2 == 5;  // g32: two groups per 64-k stage

  const uint32_t smem0 = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t tile_wbytes = (p.k_pad / Cfg::kSpan) * 4096;  // one n_tile's codes
  const uint8_t* __restrict__ wbase = static_cast<const uint8_t*>(p.weight) + tid * 16;
  const uint8_t* __restrict__ sbase = static_cast<const uint8_t*>(p.scales);
  const uint8_t* __restrict__ zbase = static_cast<const uint8_t*>(p.zo);

  // cp.async copies of k stage kb into ring slot `slot`: x rows m0.. (rows >= M and k >= K
  // filled with zeros), the n_tile's weights of those 64 k, the stage's group parameters.
  auto load_stage = [&](int kb, int slot) {
    const uint32_t st = smem0 + slot * Cfg::kStageBytes;
    const int64_t k0 = static_cast<int64_t>(kb) * Cfg::kBK;
#pragma unroll
    for (int i = 0; i < kBM * 8 / Cfg::kComputeThreads; ++i) {
      const int c = i * Cfg::kComputeThreads + tid;
      const int row = c >> 3;
      const int j = c & 7;
      const int64_t m = m0 + row;
      const int64_t k = k0 + j * 8;
      const bool valid = m < m_rows && k < k_real;
      cp_async16_zfill(st + row * 128 + ((j ^ (row & 7)) << 4), valid ? x + m * k_real + k : x,
                       valid ? 16 : 0);
    }
    // An n_tile past the last one (odd n_tiles with kNT = 2) is not loaded; its
    // channels are computed on stale data and never stored.
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      const int64_t nt = n_t * kNT + t;
      if (nt < n_tiles) {
#pragma unroll
        for (int i = 0; i < Cfg::kChunks; ++i) {
          cp_async16_stream(
              st + Cfg::kXBytes + t * Cfg::kTileWBytes + i * 4096 + tid * 16,
              wbase + nt * tile_wbytes + (static_cast<int64_t>(kb) * Cfg::kChunks + i) * 4096);
        }
      }
    }
    const int64_t g0 = k0 >> gs_log2;  // per-channel (log2 = 30): 0
    const int pchunks = two_groups ? 32 : 16;
    const int c = Cfg::kComputeThreads - 1 - tid;  // the last warps: away from warp 0's x copies
    if (c < kNT * pchunks) {
      const int t = c / pchunks;
      const int cc = c - t * pchunks;
      const int64_t nt = n_t * kNT + t;
      if (nt < n_tiles) {
        const int64_t off = (nt * p.groups_padded + g0) * 256 + cc * 16;
        const uint32_t dst = st + Cfg::kXBytes + Cfg::kWBytes + t * Cfg::kTilePBytes + cc * 16;
        cp_async16_zfill(dst, sbase + off, 16);
        if (mode != static_cast<int>(ZeroMode::kSymmetric)) {
          cp_async16_zfill(dst + Cfg::kPBytes, zbase + off, 16);
        }
      }
    }
  };

  // The copying warpgroup's version of load_stage (WS), issued by one thread: the same
  // bytes, as one TMA tile load (x) and bulk copies, all counted on the stage's `bar`.
  const uint8_t* __restrict__ w_all = static_cast<const uint8_t*>(p.weight);
  const bool has_zo = mode != static_cast<int>(ZeroMode::kSymmetric);
  const uint32_t p_bytes = two_groups ? 512u : 256u;
  // The bytes that complete a stage's "full" mbarrier, the same for every stage: the x
  // tile, and the codes and group parameters of each of the block's n_tiles that exists.
  // (Per block column: the last column of an odd n_tile count with kNT = 2 has one n_tile.)
  auto stage_tx_bytes_of = [&](int64_t col) {
    uint32_t bytes = Cfg::kXBytes;
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      if (col * kNT + t < n_tiles) bytes += Cfg::kTileWBytes + p_bytes * (has_zo ? 2u : 1u);
    }
    return bytes;
  };
  // k stage kb of the output tile at tokens m0_.. and block column col, into ring slot `slot`.
  auto issue_stage = [&](int kb, int slot, uint32_t bar, int64_t m0_, int64_t col,
                         uint32_t tx_bytes) {
    const uint32_t st = smem0 + slot * Cfg::kStageBytes;
    const int64_t k0 = static_cast<int64_t>(kb) * Cfg::kBK;
    const int64_t g0 = k0 >> gs_log2;
    mbar_arrive_expect_tx(bar, tx_bytes);
    tma_load_2d(st, &x_map, static_cast<int>(k0), static_cast<int>(m0_), bar);
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      const int64_t nt = col * kNT + t;
      if (nt < n_tiles) {
        bulk_load(st + Cfg::kXBytes + t * Cfg::kTileWBytes,
                  w_all + nt * tile_wbytes + static_cast<int64_t>(kb) * Cfg::kTileWBytes,
                  Cfg::kTileWBytes, bar);
        const int64_t off = (nt * p.groups_padded + g0) * 256;
        const uint32_t dst = st + Cfg::kXBytes + Cfg::kWBytes + t * Cfg::kTilePBytes;
        bulk_load(dst, sbase + off, p_bytes, bar);
        if (has_zo) bulk_load(dst + Cfg::kPBytes, zbase + off, p_bytes, bar);
      }
    }
  };

  // Dequantize this lane's A fragments of the stage in `slot` for m64 half h into
  // a[k16 step][4]: the layout slice this warp feeds is (warp & 3) + 4 h of n_tile
  // kNT n_t + wg (kNT = 2) or slice warp of n_tile n_t (kNT = 1).
  const GroupConsts gconst = decode::group_consts<T, kBits>();
  const int wtile_local = kNT == 2 ? wg : 0;
  auto dequant_stage = [&](int slot, int h, uint32_t (&a)[4][4]) {
    const int slice = kNT == 2 ? (warp & 3) + 4 * h : warp;
    const uint32_t st = smem0 + slot * Cfg::kStageBytes;
    const uint32_t s_st = st + Cfg::kXBytes + Cfg::kWBytes + wtile_local * Cfg::kTilePBytes;
    const uint32_t w_st = st + Cfg::kXBytes + wtile_local * Cfg::kTileWBytes;
    const uint32_t poff = slice * 32 + (lane >> 2) * 4;
    uint4 wq[Cfg::kChunks];
#pragma unroll
    for (int i = 0; i < Cfg::kChunks; ++i) {
      wq[i] = lds128(w_st + i * 4096 + (slice * 32 + lane) * 16);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // k16 steps 0-1, 2-3 (a group each at g32)
      const uint32_t goff = poff + (two_groups && half == 1 ? 256 : 0);
      if constexpr (kF32Path) {
        GroupRegsF32 g;
        decode::load_group_f32(g, s_st + goff, s_st + Cfg::kPBytes + goff, mode);
        decode::dequant_int8_bf16<true>(wq[half].x, wq[half].y, g, a[2 * half]);
        decode::dequant_int8_bf16<true>(wq[half].z, wq[half].w, g, a[2 * half + 1]);
      } else {
        GroupRegs g;
        decode::load_group<T, true>(g, s_st + goff, s_st + Cfg::kPBytes + goff, mode, gconst);
        if constexpr (kBits == 4) {
          decode::dequant_int4<T, true>(half == 0 ? wq[0].x : wq[0].z, g, a[2 * half]);
          decode::dequant_int4<T, true>(half == 0 ? wq[0].y : wq[0].w, g, a[2 * half + 1]);
        } else {
          decode::dequant_int8_f16<true>(wq[half].x, wq[half].y, g, a[2 * half]);
          decode::dequant_int8_f16<true>(wq[half].z, wq[half].w, g, a[2 * half + 1]);
        }
      }
    }
  };

  float acc[kHalves][kAcc];
  auto clear_accumulators = [&]() {
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[h][i] = 0.f;
  };
  clear_accumulators();
  uint32_t afrag[2][kHalves][4][4];

  // The four (per m64 half) wgmma of the stage in `slot`, then wait until the previous
  // stage's have finished (so its ring slot and A registers can be reused).
  auto compute_stage = [&](int slot, auto buf) {
    constexpr int kBuf = decltype(buf)::value;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) dequant_stage(slot, h, afrag[kBuf][h]);
    const uint64_t desc = sw128_desc(smem0 + slot * Cfg::kStageBytes);
    wgmma::fence();
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) Mma::rs(acc[h], afrag[kBuf][h][ks], desc + 2 * ks);
    wgmma::commit();
    wgmma::wait<1>();
  };

  // step(i, buffer) for every stage i of this block, unrolled by two so that the A
  // registers' set (buffer 0 / 1) is a compile-time constant in each call.
  auto for_each_stage = [&](int count, auto&& step) {
    int i = 0;
    for (; i + 1 < count; i += 2) {
      step(i, std::integral_constant<int, 0>{});
      step(i + 1, std::integral_constant<int, 1>{});
    }
    if (i < count) step(i, std::integral_constant<int, 0>{});
  };

  // ---- Output of one finished tile (rows m0_.. of block column col): in m64 half h,
  // element (row 16 (warp & 3) + lane / 4 + 8 (e >> 1), token 8 j + 2 (lane % 4) + (e & 1))
  // of the warpgroup's rows x tokens is acc[h][4 j + e]. A thread's two tokens are N
  // elements apart in y, so with `staged` (N % 8 == 0 and the ring no longer in use) the
  // tile goes through shared memory first and leaves as 16-byte row chunks.
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t n_out = p.n;
  constexpr int kPitch = Cfg::kBN + 8;     // elements per staged token row (+16 bytes: banks)
  static_assert(kBM * kPitch * 2 <= kStages * Cfg::kStageBytes, "staged tile must fit the ring");
  T* tile_s = reinterpret_cast<T*>(smem_raw + (smem0 - smem_addr(smem_raw)));
  const bool staged_ok = (n_out & 7) == 0 && (reinterpret_cast<uintptr_t>(y) & 15u) == 0;
  auto store_output = [&](int64_t m0_, int64_t col, bool staged) {
    const int64_t n_block = col * Cfg::kBN;  // the block's first channel
    if (staged) compute_sync();  // every warp is done reading the ring
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int64_t n_row = kNT == 2
          ? (col * 2 + wg) * 128 + h * 64 + (warp & 3) * 16 + (lane >> 2)
          : col * 128 + warp * 16 + (lane >> 2);
      float b[2] = {0.f, 0.f};
      if (bias != nullptr) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (n_row + 8 * r < n_out) b[r] = P::to_float(bias[n_row + 8 * r]);
        }
      }
      const int c_loc = static_cast<int>(n_row - n_block);
#pragma unroll
      for (int j = 0; j < kBM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t_loc = 8 * j + 2 * (lane & 3) + (e & 1);
          const T v = P::from_float(acc[h][4 * j + e] + b[e >> 1]);
          if (staged) {
            tile_s[t_loc * kPitch + c_loc + 8 * (e >> 1)] = v;
          } else {
            const int64_t m = m0_ + t_loc;
            const int64_t n = n_row + 8 * (e >> 1);
            if (m < m_rows && n < n_out) y[m * n_out + n] = v;
          }
        }
      }
    }
    if (staged) {
      compute_sync();
      constexpr int kRowChunks = Cfg::kBN / 8;
#pragma unroll 4
      for (int c = tid; c < kBM * kRowChunks; c += Cfg::kComputeThreads) {
        const int row = c / kRowChunks;
        const int cc = c - row * kRowChunks;
        const int64_t m = m0_ + row;
        const int64_t n = n_block + cc * 8;
        if (m < m_rows && n < n_out) {
          *reinterpret_cast<uint4*>(y + m * n_out + n) =
              *reinterpret_cast<const uint4*>(tile_s + row * kPitch + cc * 8);
        }
      }
    }
  };

  // ---- Partial sums of a tile (split K and stream-K): fp32 slots of the workspace,
  // thread-major (slot_floats = m_tile x n_tile), so a reducing block reads them back
  // into the same registers. count_in stores this block's partial in `slot_index`,
  // counts in on the tile's counter and returns true in the block that arrived last
  // (`contributors` blocks in all), which resets the counter for the next launch.
  constexpr int kRegs = kHalves * kAcc;
  const int64_t slot_floats = static_cast<int64_t>(kRegs) * Cfg::kComputeThreads;
  auto count_in = [&](int64_t slot_index, int64_t counter, int contributors) {
    float* mine = p.workspace + slot_index * slot_floats + tid;
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int r = 0; r < kAcc; ++r) __stcg(mine + (h * kAcc + r) * Cfg::kComputeThreads, acc[h][r]);
    __threadfence();
    compute_sync();
    if (tid == 0) {
      const int arrived = atomicAdd(p.counters + counter, 1);
      s_last = arrived == contributors - 1;
      if (s_last) p.counters[counter] = 0;  // all have counted: ready for the next launch
    }
    compute_sync();
    const bool last = s_last;
    if (last) __threadfence();
    return last;
  };
  // acc = slot (add = false) or acc += slot (add = true): the reducing block sums the
  // slots in a fixed order.
  auto read_slot = [&](int64_t slot_index, auto add) {
    const float* slot = p.workspace + slot_index * slot_floats + tid;
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int r = 0; r < kAcc; ++r) {
        const float v = __ldcg(slot + (h * kAcc + r) * Cfg::kComputeThreads);
        if constexpr (decltype(add)::value) {
          acc[h][r] += v;
        } else {
          acc[h][r] = v;
        }
      }
  };
  const std::false_type kLoad{};
  const std::true_type kAdd{};
  auto finish_accumulators = [&]() {
    wgmma::wait<0>();
#pragma unroll
    for (int h = 0; h < kHalves; ++h) wgmma::fence_operands(acc[h]);
  };

  if constexpr (Cfg::kWS) {
    // full[s]: completed by the bytes of the copies the issuing thread counted on it
    // (expect_tx); empty[s]: the 256 computing threads arrive once the wgmma that read
    // the stage have finished.
    __shared__ __align__(8) uint64_t full_bar[kStages];
    __shared__ __align__(8) uint64_t empty_bar[kStages];
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        decode::mbar_init(smem_addr(&full_bar[s]), 1);  // the issuing thread's expect_tx
        decode::mbar_init(smem_addr(&empty_bar[s]), Cfg::kComputeThreads);
      }
      decode::mbar_init_fence();
    }
    __syncthreads();
    // Stream-K (kStreamK: p.stream_k_blocks > 0, k_splits = 1): the units (tile,
    // k stage), tile major, are cut into gridDim.x contiguous ranges of equal size (+-1),
    // one per block, so every SM gets the same share of the work whatever the tile count.
    // A block's range is a run of segments, one per tile it touches: a segment over the
    // whole K stores y itself; the others store partial sums (slot 2 b for the block's
    // first segment, 2 b + 1 for its last) and the tile's last block to arrive sums its
    // contributors' slots in block order (bitwise reproducible) and stores y.
    const int64_t sk_units = static_cast<int64_t>(sk_tiles) * k_stages;
    const int64_t u_begin =
        kStreamK ? decode::first_unit_of_block(blockIdx.x, sk_units, gridDim.x) : 0;
    const int64_t u_end =
        kStreamK ? decode::first_unit_of_block(blockIdx.x + 1, sk_units, gridDim.x) : 0;
    if (wg == 2) {  // the copying warpgroup
      setmaxnreg_dec<40>();
      if (tid == Cfg::kComputeThreads) {
        int slot = 0;
        auto produce = [&](int i, int kb, int64_t m0_, int64_t col, uint32_t tx_bytes) {
          if (i >= kStages) decode::mbar_wait(smem_addr(&empty_bar[slot]), ((i / kStages) - 1) & 1);
          issue_stage(kb, slot, smem_addr(&full_bar[slot]), m0_, col, tx_bytes);
          slot = slot + 1 == kStages ? 0 : slot + 1;
        };
        if constexpr (kStreamK) {
          int64_t t = u_begin / k_stages;  // cursor: tile t, k stage kb
          int kb = static_cast<int>(u_begin - t * k_stages);
          int64_t col = t / m_tiles;
          uint32_t tx_bytes = stage_tx_bytes_of(col);
          for (int i = 0; i < static_cast<int>(u_end - u_begin); ++i) {
            produce(i, kb, (t - col * m_tiles) * kBM, col, tx_bytes);
            if (++kb == k_stages) {
              kb = 0;
              ++t;
              col = t / m_tiles;
              tx_bytes = stage_tx_bytes_of(col);
            }
          }
        } else {
          const uint32_t tx_bytes = stage_tx_bytes_of(n_t);
          for (int i = 0; i < n_stages; ++i) produce(i, kb_begin + i, m0, n_t, tx_bytes);
        }
      }
      return;
    }
    setmaxnreg_inc<232>();
    int slot = 0, prev = kStages - 1, done = 0;  // done: stages computed by this block
    auto step = [&](int, auto buf) {
      decode::mbar_wait(smem_addr(&full_bar[slot]), (done / kStages) & 1);
      // (no proxy fence: TMA and bulk copies write through the async proxy, and the
      // mbarrier's completion makes them visible to the generic-proxy reads too)
      compute_stage(slot, buf);
      if (done >= 1) decode::mbar_arrive(smem_addr(&empty_bar[prev]));  // the previous stage is read
      prev = slot;
      slot = slot + 1 == kStages ? 0 : slot + 1;
      ++done;
    };
    if constexpr (kStreamK) {
      for (int64_t u = u_begin; u < u_end;) {
        const int64_t t = u / k_stages;
        const int kb0 = static_cast<int>(u - t * k_stages);
        const int count = static_cast<int>(min(static_cast<int64_t>(k_stages - kb0), u_end - u));
        for_each_stage(count, step);
        finish_accumulators();
        const int64_t col = t / m_tiles;
        const int64_t m0_ = (t - col * m_tiles) * kBM;
        bool store = kb0 == 0 && count == k_stages;  // the whole K: no partial sums
        if (!store) {
          const int b_first = decode::block_of_unit(t * k_stages, sk_units, gridDim.x);
          const int b_last = decode::block_of_unit(t * k_stages + k_stages - 1, sk_units, gridDim.x);
          store = count_in(2 * static_cast<int64_t>(blockIdx.x) + (u == u_begin ? 0 : 1), t,
                           b_last - b_first + 1);
          if (store) {
            // Block b > b_first starts inside this tile: its first segment (slot 2 b).
            // b_first's segment is its first only if it starts at the tile's first unit.
            const bool starts_here =
                decode::first_unit_of_block(b_first, sk_units, gridDim.x) == t * k_stages;
            read_slot(2 * static_cast<int64_t>(b_first) + (starts_here ? 0 : 1), kLoad);
            for (int b = b_first + 1; b <= b_last; ++b) read_slot(2 * static_cast<int64_t>(b), kAdd);
          }
        }
        // Not staged through shared memory: the ring may already hold the next segment's
        // stages. (Staging the block's last segment, when the ring is idle, was measured
        // 1.07-1.6x slower, in a build where stream-K still shared one function with the
        // other path and its 168-register budget; bench/results/NOTES.md.)
        if (store) store_output(m0_, col, false);
        clear_accumulators();
        u += count;
      }
      return;
    }
    for_each_stage(n_stages, step);
  } else {
#pragma unroll
    for (int s = 0; s < kStages - 2; ++s) {
      if (s < n_stages) load_stage(kb_begin + s, s);
      cp_async_commit();
    }
    // One stage: wait for its copies, refill the slot of stage i - 2, compute.
    int slot = 0;
    auto step = [&](int i, auto buf) {
      cp_async_wait<kStages - 3>();
      fence_proxy_async();
      __syncthreads();  // stage i visible; every warpgroup is done with stage i - 2
      if (i + kStages - 2 < n_stages) {
        int sl = slot + kStages - 2;
        if (sl >= kStages) sl -= kStages;
        load_stage(kb_begin + i + kStages - 2, sl);
      }
      cp_async_commit();
      compute_stage(slot, buf);
      slot = slot + 1 == kStages ? 0 : slot + 1;
    };
    for_each_stage(n_stages, step);
  }
  finish_accumulators();
  cp_async_wait<0>();

  // Split K: every block stores its partial sums and counts in; the last of the tile's
  // blocks to arrive sums all slots in split order.
  if (splits > 1) {
    if (!count_in(blockIdx.x, tile, splits)) return;
    read_slot(static_cast<int64_t>(tile) * splits, kLoad);
    for (int s = 1; s < splits; ++s) read_slot(static_cast<int64_t>(tile) * splits + s, kAdd);
  }
  store_output(m0, n_t, staged_ok);
#else
  __trap();  // not an sm_90a build: the launcher refuses before this can run
#endif
}

}  // namespace prefill

namespace {

// cuTensorMapEncodeTiled is a driver function; the runtime hands out its address (the
// extension links the static runtime, not libcuda). Looked up once per process.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The TMA view of x for the copying warpgroup: [M, K] row-major, boxes of 64 k (128 bytes,
// the swizzle span) x m_tile rows, 128-byte swizzle, zeros outside the tensor.
cudaError_t encode_x_map(const PrefillGemmParams& p, CUtensorMap* map) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.k), static_cast<cuuint64_t>(p.m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.k) * 2};  // bytes, rows
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(p.m_tile)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type = p.dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(p.x), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, typename Cfg, bool kStreamK>
cudaError_t launch_instance(const PrefillGemmParams& p, int grid) {
  auto kernel = prefill::prefill_gemm_kernel<T, Cfg, kStreamK>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  CUtensorMap x_map{};  // read only by the copying warpgroup of the WS configurations
  if (Cfg::kWS) {
    err = encode_x_map(p, &x_map);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, p.stream>>>(p, x_map);
  return cudaGetLastError();
}

template <typename T, typename Cfg>
cudaError_t launch_kernel(const PrefillGemmParams& p, int grid) {
  if constexpr (Cfg::kHasStreamK) {
    if (p.stream_k_blocks > 0) return launch_instance<T, Cfg, true>(p, grid);
  }
  if (p.stream_k_blocks > 0) return cudaErrorInvalidValue;
  return launch_instance<T, Cfg, false>(p, grid);
}

// Ring depth per token tile: the deepest ring with which kMinBlocks blocks fit in the SM's
// 227 KB of shared memory (BM = 256 holds 128 accumulators per thread: one block per SM).
template <typename T, int BITS>
cudaError_t launch_tile(const PrefillGemmParams& p, int grid) {
  using prefill::Config;
  if (p.warp_specialized) {  // a copying warpgroup: deeper rings (no stage is held back)
    if (p.n_tile == 256) {
      switch (p.m_tile) {
        case 64: return launch_kernel<T, Config<BITS, 64, 2, BITS == 4 ? 12 : 8, 1, true>>(p, grid);
        case 128: return launch_kernel<T, Config<BITS, 128, 2, BITS == 4 ? 8 : 6, 1, true>>(p, grid);
        default: return cudaErrorInvalidValue;
      }
    }
    switch (p.m_tile) {
      case 64: return launch_kernel<T, Config<BITS, 64, 1, BITS == 4 ? 16 : 12, 1, true>>(p, grid);
      case 128: return launch_kernel<T, Config<BITS, 128, 1, 8, 1, true>>(p, grid);
      case 256: return launch_kernel<T, Config<BITS, 256, 1, BITS == 4 ? 6 : 5, 1, true>>(p, grid);
      default: return cudaErrorInvalidValue;
    }
  }
  if (p.n_tile == 256) {  // two n_tiles per block: BM accumulators per thread
    switch (p.m_tile) {
      case 64: return launch_kernel<T, Config<BITS, 64, 2, BITS == 4 ? 6 : 4, 2>>(p, grid);
      case 128: return launch_kernel<T, Config<BITS, 128, 2, 6, 1>>(p, grid);
      default: return cudaErrorInvalidValue;
    }
  }
  switch (p.m_tile) {
    case 64: return launch_kernel<T, Config<BITS, 64, 1, 6, 2>>(p, grid);
    case 128: return launch_kernel<T, Config<BITS, 128, 1, 4, 2>>(p, grid);
    case 256: return launch_kernel<T, Config<BITS, 256, 1, 5, 1>>(p, grid);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// Queried once per process (the first call's device): a process that mixes GPU
// architectures is not supported by the Python layer either.
bool prefill_gemm_compiled() {
  static const bool compiled = [] {
    cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, prefill::prefill_gemm_kernel<
                                         __half, prefill::Config<4, 128, 1, 4, 2>>) != cudaSuccess) {
      cudaGetLastError();  // clear the error: this is a query
      return false;
    }
    return attr.binaryVersion == 90;
  }();
  return compiled;
}

cudaError_t launch_prefill_gemm(const PrefillGemmParams& p) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const bool gs_ok = (p.group_size_log2 >= 5 && p.group_size_log2 <= 8) ||
                     p.group_size_log2 == 30;
  const int64_t k_stages = p.k_pad / 64;
  if ((p.bits != 4 && p.bits != 8) || !gs_ok || p.k % 8 != 0 || p.k_pad % 128 != 0 ||
      p.n_pad % 128 != 0 || p.k_pad < p.k || p.n_pad < p.n ||
      (p.m_tile != 64 && p.m_tile != 128 && p.m_tile != 256) ||
      (p.n_tile != 128 && p.n_tile != 256) || (p.n_tile == 256 && p.m_tile == 256) ||
      p.k_splits < 1 ||
      p.k_splits > k_stages || (reinterpret_cast<uintptr_t>(p.x) & 15u) != 0 ||
      p.weight == nullptr || p.scales == nullptr || p.y == nullptr ||
      ((p.k_splits > 1 || p.stream_k_blocks > 0) &&
       (p.workspace == nullptr || p.counters == nullptr)) ||
      p.stream_k_blocks < 0 ||
      (p.stream_k_blocks > 0 && (!p.warp_specialized || p.k_splits != 1)) ||
      (p.zero_mode != ZeroMode::kSymmetric && p.zo == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles =
      ((p.n_pad + p.n_tile - 1) / p.n_tile) * ((p.m + p.m_tile - 1) / p.m_tile);
  // stream-K: at most one block per unit (every block's range is non-empty)
  if (p.stream_k_blocks > tiles * k_stages) return cudaErrorInvalidValue;
  const int64_t grid = p.stream_k_blocks > 0 ? p.stream_k_blocks : tiles * p.k_splits;
  if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
  if (!prefill_gemm_compiled()) return cudaErrorNotSupported;
  const int g = static_cast<int>(grid);
  switch (p.dtype) {
    case DType::kFloat16:
      return p.bits == 4 ? launch_tile<__half, 4>(p, g) : launch_tile<__half, 8>(p, g);
    case DType::kBFloat16:
      return p.bits == 4 ? launch_tile<__nv_bfloat16, 4>(p, g)
                         : launch_tile<__nv_bfloat16, 8>(p, g);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dqgemm
