// Decode GEMM kernel family (W4A16 / W8A16, M = 1..64): the kernel template.
//
// What it computes: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias[N]), x and y fp16 or bf16,
// W 4-bit or 8-bit codes with per-group (32/64/128/256) or per-channel scales and, per
// group, an integer zero point (w = (q - z) * s) or an additive offset (w = q * s + o).
// Symmetric weights use z = 2^(bits-1) as a constant.
//
// Why it is shaped like this: at M <= 64 the product is a stream over the weight. The
// weight (re-laid out once at load time, python/dqgemm/kernels/cuda_decode.py) is read
// exactly once, as one contiguous byte range per thread block, through a STAGES-deep
// cp.async pipeline; every thread takes 16 bytes at a time out of shared memory and turns
// them into tensor-core operand registers with a handful of lop3 / prmt / fma instructions.
//
// MMA orientation ("swap AB"): mma.sync.m16n8k16 with the WEIGHT as the A operand (16
// output channels x 16 k) and the activations as B (16 k x 8 tokens). At M <= 8 only one
// n8 tile of tokens is wasted instead of 15 rows of a 16-row A tile.
//
// Packed weight layout (built by pack_decode_weight in cuda_decode.py; N padded to a
// multiple of 128, K to a multiple of 128, padding codes 0 with scale 0):
//   [n_tile = N_pad/128][k_block = K_pad/SPAN][n16 = 8][lane = 32][16 bytes]
//   SPAN = 64 (4-bit) or 32 (8-bit): one lane's 16 bytes hold its A-fragment values of
//   4 (4-bit) or 2 (8-bit) consecutive k16 tiles of one 16-row slice.
//   For lane l, r = l / 4, c = 2 * (l % 4), the A fragment of a 16x16 tile is
//   (r, c..c+1) (r+8, c..c+1) (r, c+8..c+9) (r+8, c+8..c+9) = registers a0 a1 a2 a3.
//   4-bit: one 32-bit word per k16 tile; nibble p (bits 4p..4p+3) holds row r + 8*(p&1),
//          k = c + 8*((p>>1)&1) + (p>>2). So (word & 0x000F000F) is the pair a0, (word &
//          0x00F000F0) is a1 (times 16), and the same on word >> 8 gives a2, a3: one lop3
//          with the magic exponent (fp16 0x6400 = 1024, bf16 0x4300 = 128) makes a pair.
//   8-bit: two 32-bit words per k16 tile (k half 0, k half 1); byte b of a word holds
//          row r + 8*(b&1), k = c + (b>>1) (+8 in the second word); prmt with 0x64 (fp16)
//          gives 1024 + q pairs; bf16 goes through fp32 (0x4B000000 magic).
// Group-parameter layout (scales, and zero points or offsets, in the activation dtype):
//   [n_tile][group (G_pad = K_pad / group_size, or 1 per-channel)][n16 = 8][r = 8][2]
//   holding (p[row r], p[row r + 8]) of that n16 slice: one 32-bit load per lane.
//
// Tiles: a unit of work is (n_tile of 128 channels, k chunk of BK; the last chunk of a tile
// may be short, since K_pad is a multiple of 128 and BK can be 256). Warps split the 128
// channels (WN16 slices of 16 each, 8 / WN16 warps); no warp splits K inside a block (a
// variant that did, 16 warps per block, was slower: bench/results/NOTES.md).
//
// Scales: symmetric and zero-point weights use folded scales (kFold): fragments hold the
// exact integers q - z, the mma accumulate a group's products in fp32 group accumulators,
// and each group's scale is applied to those in fp32 when the group ends (one fma per
// code pair instead of two, and better rounding than scaling in fp16/bf16). Offsets
// (w = q * s + o) are dequantized fully into the fragment instead. (Fragments of the raw
// codes, with the group's z * sum(x) removed at the fold, were measured and were slower:
// bench/results/NOTES.md, "v5".)
// Activations for the chunk (M rows x BK, XOR-swizzled 16-byte chunks) are loaded into
// shared memory with the weights and read with ldmatrix.x4.
// Stage hand-over: one block barrier per stage, or (Config::kSplitBarriers, INT4 M <= 16)
// a "full" and an "empty" mbarrier per stage, so that warps need not meet at every stage,
// or (Config::kProducer, sm_90) a copying warp that fills the ring with bulk copies while
// the computing warps only wait on "full" and arrive on "empty" (activation rows padded by
// 16 bytes instead of swizzled there; see the kernel's main loop).
//
// Work partition (stream-K, deterministic): the U = n_tiles * (K_pad / BK) units, in
// order (n_tile major), are cut into gridDim.x contiguous ranges of equal size (+-1). A
// block's range is a run of segments, one per n_tile it touches. A segment covering the
// whole K writes y directly. A partial segment writes fp32 partial sums into its slot of
// the workspace (2 slots per block: first and last segment), then counts itself in the
// n_tile's counter; the block that arrives last sums ALL slots of that n_tile in block
// order (a fixed order, so results are bitwise reproducible), writes y and resets the
// counter to 0 for the next launch (so the workspace needs no clearing: graph-safe).
//
// Constraints: K % 8 == 0 (16-byte activation rows), x 16-byte aligned, M <= 64.
// Test: pytest tests/test_cuda_decode.py. Benchmark: python bench/cuda_decode_bench.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dqgemm.h"

namespace dqgemm {
namespace decode {

// ---------------------------------------------------------------------------------------
// Small PTX helpers.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Weights are read once, straight into shared memory (.cg: not through L1). No L2
// prefetch-size hint: bench/stream_probe.cu read 4.34 TB/s without .L2::256B and 4.15 TB/s
// with it on an H200 (same ring of 4 x 16 KB cp.async stages); createpolicy-based
// evict_first hints are avoided on purpose (they misbehaved on H100 in public kernels).
__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

// Activations / group parameters: src_bytes = 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// mbarriers (configurations with split barriers, Config::kSplitBarriers; see the kernel).
// sm_90 and later only (try_wait.parity, fence.mbarrier_init): older targets build those
// configurations with the block barrier instead (kSplitBarriers in the kernel).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define DQGEMM_HAS_SPLIT_BARRIERS 1
#else
#define DQGEMM_HAS_SPLIT_BARRIERS 0
#endif
#if DQGEMM_HAS_SPLIT_BARRIERS
__device__ __forceinline__ void mbar_init(uint32_t addr, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(addr), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t addr) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared.b64 state, [%0];\n}\n" ::"r"(addr)
               : "memory");
}
// Arrives on the mbarrier once every cp.async this thread issued so far has landed.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t addr) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(addr) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared.b64 done, [%0], %1;\n @!done bra WAIT_%=;\n}\n" ::"r"(addr),
      "r"(parity)
      : "memory");
}
// As mbar_wait, with a suspend-time hint: the waiting warp sleeps until the phase completes
// (or the hint, 10 ms, runs out) instead of spinning on try_wait and taking issue slots
// from the computing warps of its scheduler.
__device__ __forceinline__ void mbar_wait_sleep(uint32_t addr, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n @!done bra WAIT_%=;\n}\n"
      ::"r"(addr), "r"(parity), "r"(10000000)
      : "memory");
}
// Makes the initialized mbarriers visible before any thread uses them.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also makes the current phase wait for `bytes` bytes of bulk copies.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr), "r"(bytes)
               : "memory");
}
// One bulk (TMA, 1-D) copy of `bytes` contiguous bytes (16-byte aligned, a multiple of 16)
// from global into shared memory, completing on the mbarrier by byte count.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
#else  // never called: kSplitBarriers and kProducer are false on these targets
__device__ __forceinline__ void mbar_init(uint32_t, int) { __trap(); }
__device__ __forceinline__ void mbar_init_fence() { __trap(); }
__device__ __forceinline__ void mbar_arrive(uint32_t) { __trap(); }
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_wait_sleep(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void bulk_load(uint32_t, const void*, uint32_t, uint32_t) { __trap(); }
#endif  // DQGEMM_HAS_SPLIT_BARRIERS

// Programmatic dependent launch (sm_90): griddep_wait blocks until the previous grid in the
// stream has completed and its memory is visible (returns at once when this launch was not
// programmatic); griddep_launch_dependents lets the next grid in the stream start launching
// blocks (into SMs this grid's blocks leave) before this one completes.
__device__ __forceinline__ void griddep_wait() {
#if DQGEMM_HAS_SPLIT_BARRIERS
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if DQGEMM_HAS_SPLIT_BARRIERS
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Release / acquire fence at GPU scope (lighter than __threadfence, which is fence.sc).
__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}

// Barrier 1 over the first kThreads threads of the block (the computing warps of the
// configurations with a copying warp, Config::kProducer, which does not take part).
template <int kThreads>
__device__ __forceinline__ void named_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  return __byte_perm(a, b, sel);
}

// ---------------------------------------------------------------------------------------
// Per-dtype arithmetic on packed pairs (32-bit registers holding two 16-bit values).
// ---------------------------------------------------------------------------------------

template <typename T> struct Pair;

template <> struct Pair<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint32_t kOne = 0x3C003C00u;
  static constexpr uint32_t kNegOne = 0xBC00BC00u;
  __device__ __forceinline__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static uint32_t splat(float v) {
    __half2 h = __float2half2_rn(v);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
};

template <> struct Pair<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  static constexpr uint32_t kOne = 0x3F803F80u;
  static constexpr uint32_t kNegOne = 0xBF80BF80u;
  // fma.rn.bf16x2 exists from sm_80 (add/sub.bf16x2 only from sm_90): subtraction is
  // written as fma(x, 1, -z) everywhere.
  __device__ __forceinline__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static uint32_t splat(float v) {
    __nv_bfloat162 h = __float2bfloat162_rn(v);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c = a * b (no accumulator input): the first mma of a group in the folded-scale kernels,
// so the group accumulators never need clearing.
template <typename T>
__device__ __forceinline__ void mma16816_first(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  constexpr bool kF16 = std::is_same_v<T, __half>;
  if constexpr (kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
  }
}

// ---------------------------------------------------------------------------------------
// Group parameters of one 16-row slice, for the two rows (r, r + 8) a lane touches.
// Dequantization of a code pair x (already OR-ed into the magic exponent) is
//   w = fma(fma(x, mul, nz), s, o)       with nz = -(magic + z): exact integer q - z,
// then one rounding for the scale (and offset). Symmetric: z = 2^(bits-1), o = 0;
// zero points: o = 0; offsets: z = 0.
// ---------------------------------------------------------------------------------------

struct GroupRegs {
  uint32_t s_lo, s_hi;    // scale pairs of rows r and r+8
  uint32_t nz_lo, nz_hi;  // -(magic + z) for rows r and r+8 (fp16 4-bit: row r+8 uses -(64+z))
  uint32_t o_lo, o_hi;    // offsets (0 unless offset mode)
  float fs_lo, fs_hi;     // the scales of rows r and r+8 in fp32 (folded-scale kernels)
};

struct GroupRegsF32 {     // 8-bit bf16 path works in fp32
  float s_lo, s_hi, nz_lo, nz_hi, o_lo, o_hi;
};

// The 16-bit value held in the low bits of w, as T.
template <typename T>
__device__ __forceinline__ T bits_to(uint32_t w) {
  const uint16_t b = static_cast<uint16_t>(w);
  return *reinterpret_cast<const T*>(&b);
}

// Broadcast the low / high 16-bit half of w into both halves.
__device__ __forceinline__ uint32_t lo_pair(uint32_t w) { return prmt(w, w, 0x1010); }
__device__ __forceinline__ uint32_t hi_pair(uint32_t w) { return prmt(w, w, 0x3232); }

// Loop-invariant biases, computed once per thread: -magic for the pair at the low nibble /
// byte and for the high one, and the symmetric -(magic + 2^(bits-1)) of both.
struct GroupConsts {
  uint32_t neg_magic, neg_magic_hi, nz_sym_lo, nz_sym_hi;
};

template <typename T, int BITS>
__device__ __forceinline__ GroupConsts group_consts() {
  using P = Pair<T>;
  GroupConsts c;
  c.neg_magic = P::fma(P::kMagic, P::kNegOne, 0u);
  constexpr bool kF16Int4 = BITS == 4 && sizeof(T) == 2 && P::kMagic == 0x64006400u;
  // fp16 4-bit: the odd nibbles come out as 1024 + 16 q and are scaled by 1/16 first,
  // so their bias is 64 + z.
  c.neg_magic_hi = kF16Int4 ? 0xD400D400u /* -64 */ : c.neg_magic;
  const uint32_t zsym = P::splat(static_cast<float>(1 << (BITS - 1)));
  c.nz_sym_lo = P::fma(zsym, P::kNegOne, c.neg_magic);
  c.nz_sym_hi = P::fma(zsym, P::kNegOne, c.neg_magic_hi);
  return c;
}

// kPairs: also the scale / offset pairs that the unfolded dequantization multiplies by (the
// folded kernels need only the fp32 scales and the biases).
template <typename T, bool kPairs>
__device__ __forceinline__ void load_group(GroupRegs& g, uint32_t s_addr, uint32_t zo_addr,
                                           int mode, const GroupConsts& c) {
  using P = Pair<T>;
  const uint32_t sw = lds32(s_addr);
  if constexpr (kPairs) {
    g.s_lo = lo_pair(sw);
    g.s_hi = hi_pair(sw);
  }
  g.fs_lo = P::to_float(bits_to<T>(sw & 0xFFFFu));
  g.fs_hi = P::to_float(bits_to<T>(sw >> 16));
  g.o_lo = g.o_hi = 0u;
  if (mode == static_cast<int>(ZeroMode::kZeroPoint)) {
    const uint32_t zw = lds32(zo_addr);
    g.nz_lo = P::fma(lo_pair(zw), P::kNegOne, c.neg_magic);
    g.nz_hi = P::fma(hi_pair(zw), P::kNegOne, c.neg_magic_hi);
  } else if (mode == static_cast<int>(ZeroMode::kOffset)) {
    const uint32_t ow = lds32(zo_addr);
    g.nz_lo = c.neg_magic;
    g.nz_hi = c.neg_magic_hi;
    if constexpr (kPairs) {
      g.o_lo = lo_pair(ow);
      g.o_hi = hi_pair(ow);
    }
  } else {
    g.nz_lo = c.nz_sym_lo;
    g.nz_hi = c.nz_sym_hi;
  }
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

__device__ __forceinline__ void load_group_f32(GroupRegsF32& g, uint32_t s_addr,
                                               uint32_t zo_addr, int mode) {
  constexpr float kMagic = 8388608.0f;  // 2^23: a byte OR-ed into its mantissa is exact
  const uint32_t sw = lds32(s_addr);
  g.s_lo = bf16_lo(sw);
  g.s_hi = bf16_hi(sw);
  if (mode == static_cast<int>(ZeroMode::kZeroPoint)) {
    const uint32_t zw = lds32(zo_addr);
    g.nz_lo = -(kMagic + bf16_lo(zw));
    g.nz_hi = -(kMagic + bf16_hi(zw));
    g.o_lo = g.o_hi = 0.f;
  } else if (mode == static_cast<int>(ZeroMode::kOffset)) {
    const uint32_t ow = lds32(zo_addr);
    g.nz_lo = g.nz_hi = -kMagic;
    g.o_lo = bf16_lo(ow);
    g.o_hi = bf16_hi(ow);
  } else {
    g.nz_lo = g.nz_hi = -(kMagic + 128.f);
    g.o_lo = g.o_hi = 0.f;
  }
}

// ---------------------------------------------------------------------------------------
// Dequantization of one 16x16 A fragment (4 registers a0..a3, see the layout above).
// ---------------------------------------------------------------------------------------

// kScale = false (the folded-scale kernels): the fragment holds the exact integers q - z
// (|q - z| <= 255 is exact in fp16 and bf16) and the scale is applied later, in fp32, to
// the per-group accumulators: one fma per pair instead of two.
// (x * mul + nz) then, with kScale, (* s + o).
template <typename P, bool kScale>
__device__ __forceinline__ uint32_t finish_pair(uint32_t x, uint32_t mul, uint32_t nz,
                                                uint32_t s, uint32_t o) {
  const uint32_t d = P::fma(x, mul, nz);
  if constexpr (kScale) {
    return P::fma(d, s, o);
  } else {
    return d;
  }
}

template <bool kScale>
__device__ __forceinline__ void dequant_int4_f16(uint32_t q, const GroupRegs& g,
                                                 uint32_t (&a)[4]) {
  using P = Pair<__half>;
  constexpr uint32_t kSixteenth = 0x2C002C00u;  // 1/16
  const uint32_t q8 = q >> 8;
  const uint32_t x0 = lop3_and_or(q, 0x000F000Fu, P::kMagic);
  const uint32_t x1 = lop3_and_or(q, 0x00F000F0u, P::kMagic);
  const uint32_t x2 = lop3_and_or(q8, 0x000F000Fu, P::kMagic);
  const uint32_t x3 = lop3_and_or(q8, 0x00F000F0u, P::kMagic);
  a[0] = finish_pair<P, kScale>(x0, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[1] = finish_pair<P, kScale>(x1, kSixteenth, g.nz_hi, g.s_hi, g.o_hi);
  a[2] = finish_pair<P, kScale>(x2, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[3] = finish_pair<P, kScale>(x3, kSixteenth, g.nz_hi, g.s_hi, g.o_hi);
}

template <bool kScale>
__device__ __forceinline__ void dequant_int4_bf16(uint32_t q, const GroupRegs& g,
                                                  uint32_t (&a)[4]) {
  // bf16 has 7 mantissa bits: a nibble at bits 4..7 would spill into the exponent, so
  // every nibble is shifted down to bits 0..3 first.
  using P = Pair<__nv_bfloat16>;
  const uint32_t x0 = lop3_and_or(q, 0x000F000Fu, P::kMagic);
  const uint32_t x1 = lop3_and_or(q >> 4, 0x000F000Fu, P::kMagic);
  const uint32_t x2 = lop3_and_or(q >> 8, 0x000F000Fu, P::kMagic);
  const uint32_t x3 = lop3_and_or(q >> 12, 0x000F000Fu, P::kMagic);
  a[0] = finish_pair<P, kScale>(x0, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[1] = finish_pair<P, kScale>(x1, P::kOne, g.nz_hi, g.s_hi, g.o_hi);
  a[2] = finish_pair<P, kScale>(x2, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[3] = finish_pair<P, kScale>(x3, P::kOne, g.nz_hi, g.s_hi, g.o_hi);
}

template <typename T, bool kScale>
__device__ __forceinline__ void dequant_int4(uint32_t q, const GroupRegs& g, uint32_t (&a)[4]) {
  if constexpr (std::is_same_v<T, __half>) {
    dequant_int4_f16<kScale>(q, g, a);
  } else {
    dequant_int4_bf16<kScale>(q, g, a);
  }
}

// 8-bit, fp16: prmt puts a code byte under the 0x64 exponent byte: 1024 + q, exact.
template <bool kScale>
__device__ __forceinline__ void dequant_int8_f16(uint32_t w0, uint32_t w1, const GroupRegs& g,
                                                 uint32_t (&a)[4]) {
  using P = Pair<__half>;
  constexpr uint32_t kHi = 0x64646464u;
  const uint32_t x0 = prmt(w0, kHi, 0x4240);  // bytes 0, 2: row r, k c, c+1
  const uint32_t x1 = prmt(w0, kHi, 0x4341);  // bytes 1, 3: row r+8
  const uint32_t x2 = prmt(w1, kHi, 0x4240);
  const uint32_t x3 = prmt(w1, kHi, 0x4341);
  a[0] = finish_pair<P, kScale>(x0, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[1] = finish_pair<P, kScale>(x1, P::kOne, g.nz_hi, g.s_hi, g.o_hi);
  a[2] = finish_pair<P, kScale>(x2, P::kOne, g.nz_lo, g.s_lo, g.o_lo);
  a[3] = finish_pair<P, kScale>(x3, P::kOne, g.nz_hi, g.s_hi, g.o_hi);
}

// 8-bit, bf16: 8 significant bits do not fit bf16's magic trick, so each byte goes under
// the fp32 exponent of 2^23 (exact), the bias is removed in fp32, scaled, and two values
// are rounded into one bf16 pair.
template <bool kScale>
__device__ __forceinline__ uint32_t int8_pair_bf16(uint32_t w, uint32_t sel_lo, uint32_t sel_hi,
                                                   float nz, float s, float o) {
  constexpr uint32_t kExp = 0x4B000000u;
  const float lo = __uint_as_float(prmt(w, kExp, sel_lo)) + nz;
  const float hi = __uint_as_float(prmt(w, kExp, sel_hi)) + nz;
  if constexpr (kScale) {
    return Pair<__nv_bfloat16>::pack(fmaf(lo, s, o), fmaf(hi, s, o));
  } else {
    return Pair<__nv_bfloat16>::pack(lo, hi);  // q - z: exact in bf16
  }
}

template <bool kScale>
__device__ __forceinline__ void dequant_int8_bf16(uint32_t w0, uint32_t w1,
                                                  const GroupRegsF32& g, uint32_t (&a)[4]) {
  // selector 0x754b: result bytes = (w.byte b, 0, 0, 0x4B)
  a[0] = int8_pair_bf16<kScale>(w0, 0x7540, 0x7542, g.nz_lo, g.s_lo, g.o_lo);
  a[1] = int8_pair_bf16<kScale>(w0, 0x7541, 0x7543, g.nz_hi, g.s_hi, g.o_hi);
  a[2] = int8_pair_bf16<kScale>(w1, 0x7540, 0x7542, g.nz_lo, g.s_lo, g.o_lo);
  a[3] = int8_pair_bf16<kScale>(w1, 0x7541, 0x7543, g.nz_hi, g.s_hi, g.o_hi);
}

// ---------------------------------------------------------------------------------------
// Tile configuration.
// ---------------------------------------------------------------------------------------

template <int BITS, int MT, int WN16, int BK, int STAGES, int MIN_BLOCKS = 1,
          bool SPLIT_BARRIERS = false, bool PRODUCER = false>
struct Config {
  static constexpr int kBits = BITS;
  static constexpr int kMT = MT;                 // tiles of 8 tokens (M <= 8 * MT)
  static constexpr int kWN16 = WN16;             // 16-channel slices per warp
  static constexpr int kBK = BK;                 // k per pipeline stage
  static constexpr int kStages = STAGES;
  // Blocks per SM the configuration is meant to run with, as the register cap of
  // __launch_bounds__ (256 threads: 3 blocks leave at most 80 registers per thread, 4 leave
  // 64; without the cap the compiler took 127 and only 2 blocks fit).
  static constexpr int kMinBlocks = MIN_BLOCKS;
  // Per-stage "full" / "empty" mbarriers instead of one block barrier per stage (see the
  // kernel's main loop); chosen per configuration by the launcher, from measurements.
  static constexpr bool kSplitBarriers = SPLIT_BARRIERS;
  // One more warp that only copies (bulk copies of the weights, the group parameters and
  // each activation row), so that the computing warps issue no copies and meet at no block
  // barrier: see the kernel's main loop. sm_90 and later.
  static constexpr bool kProducer = PRODUCER;
  static constexpr int kBN = 128;                // channels per n_tile (layout constant)
  static constexpr int kWarps = 8 / WN16;        // computing warps
  static constexpr int kComputeThreads = 32 * kWarps;
  static constexpr int kThreads = kComputeThreads + (PRODUCER ? 32 : 0);
  static constexpr int kSpan = BITS == 4 ? 64 : 32;        // k per 16-byte lane chunk
  static constexpr int kChunksPerStage = BK / kSpan;
  static constexpr int kK16PerChunk = kSpan / 16;
  static constexpr int kK16PerStage = BK / 16;
  static constexpr int kWBytes = kBN * BK * BITS / 8;
  // Bytes per activation row of a stage: BK values. The copying-warp configurations copy a
  // row with one bulk copy, which cannot XOR-swizzle its 16-byte chunks as the cp.async
  // path does; a 16-byte pad per row keeps the 8 rows of an ldmatrix on distinct banks
  // instead (row stride 132 words = 4 mod 32).
  static constexpr int kXRowBytes = BK * 2 + (PRODUCER ? 16 : 0);
  static constexpr int kABytes = MT * 8 * kXRowBytes;
  static constexpr int kPBytes = (BK / 32) * 256;          // at most BK/32 groups per stage
  static constexpr int kStageBytes = kWBytes + kABytes + 2 * kPBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  // Folded scales need a second accumulator set (unscaled per-group sums): only where the
  // accumulators are few. Two such sets (even / odd k16 steps) where they are very few,
  // so consecutive mma do not wait on each other's result.
  static constexpr bool kCanFold = MT * WN16 <= 4;
  static constexpr int kGroupAccSets = MT * WN16 <= 2 ? 2 : 1;
  static_assert(BK % kSpan == 0 && BK % 32 == 0, "BK must hold whole lane chunks and k32 pairs");
  static_assert(8 % WN16 == 0, "WN16 must divide 8");
  static_assert(!(PRODUCER && SPLIT_BARRIERS), "the copying warp has its own stage hand-over");
};

// Owner block of unit u when U units are cut into G ranges [b*U/G, (b+1)*U/G).
__device__ __forceinline__ int block_of_unit(int64_t u, int64_t units, int grid) {
  return static_cast<int>(((u + 1) * grid - 1) / units);
}

__device__ __forceinline__ int64_t first_unit_of_block(int b, int64_t units, int grid) {
  return static_cast<int64_t>(b) * units / grid;
}

// f(i, mt, e) for each of a lane's accumulator elements: slice i of kWN16, token tile mt of
// kMT, element e of the m16n8 C fragment (rows r + 8 (e >> 1), token 2 (lane % 4) + (e & 1)).
template <int kWN16, int kMT, typename F>
__device__ __forceinline__ void for_each_acc(F&& f) {
#pragma unroll
  for (int i = 0; i < kWN16; ++i)
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(i, mt, e);
}

// ---------------------------------------------------------------------------------------
// End of a segment (the part of one n_tile a block computed): write y directly when the
// segment covers the whole K; otherwise store the block's fp32 partial sums in its slot of
// the workspace and count in, and let the last block to arrive sum every slot of the tile
// in block order (bitwise reproducible), write y and reset the tile's counter. Called by
// every computing thread of the block (it synchronizes them on the partial path: the whole
// block, or with kNamedSync barrier 1 over the kThreads computing threads, which leaves the
// copying warp free to go on). acc holds the lane's m16n8 C fragments: slice i of the
// warp's kWN16, token tile mt, element e.
// ---------------------------------------------------------------------------------------
template <typename T, int kWN16, int kMT, int kThreads, bool kNamedSync = false>
__device__ __forceinline__ void finish_segment(const DecodeGemmParams& p,
                                               const float (&acc)[kWN16][kMT][4], bool full,
                                               int64_t tile, int64_t first_tile, int64_t units,
                                               int kc_per_tile, int& s_last) {
  using P = Pair<T>;
  constexpr int kBN = 128;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int m_rows = static_cast<int>(p.m);
  const int64_t n_out = p.n;
  const int grid = gridDim.x;
  const int64_t n_tile0 = tile * kBN;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (full) {
    for_each_acc<kWN16, kMT>([&](int i, int mt, int e) {
      const int m = mt * 8 + (lane & 3) * 2 + (e & 1);
      const int64_t n = n_tile0 + (warp * kWN16 + i) * 16 + (lane >> 2) + (e >> 1) * 8;
      if (m < m_rows && n < n_out) {
        float v = acc[i][mt][e];
        if (bias != nullptr) v += P::to_float(bias[n]);
        y[m * n_out + n] = P::from_float(v);
      }
    });
  } else {
    // partial: write this block's slot, then count in
    const int slot = 2 * blockIdx.x + (tile == first_tile ? 0 : 1);
    float* ws = p.workspace + static_cast<int64_t>(slot) * m_rows * kBN;
    for_each_acc<kWN16, kMT>([&](int i, int mt, int e) {
      const int m = mt * 8 + (lane & 3) * 2 + (e & 1);
      const int nl = (warp * kWN16 + i) * 16 + (lane >> 2) + (e >> 1) * 8;
      if (m < m_rows) __stcg(ws + m * kBN + nl, acc[i][mt][e]);
    });
    // With kNamedSync one thread fences for the block after the barrier (the barrier
    // orders the others' stores before its fence; the fence is cumulative), instead of
    // every thread, and with release / acquire fences: the counter is the only flag, so
    // sequential consistency buys nothing.
    if constexpr (!kNamedSync) __threadfence();
    if constexpr (kNamedSync) {
      named_sync<kThreads>();
    } else {
      __syncthreads();
    }
    const int b_first = block_of_unit(tile * kc_per_tile, units, grid);
    const int b_last = block_of_unit(tile * kc_per_tile + kc_per_tile - 1, units, grid);
    if (tid == 0) {
      if constexpr (kNamedSync) fence_acq_rel_gpu();  // the block's partials, then count in
      const int arrived = atomicAdd(p.counters + tile, 1);
      s_last = arrived == b_last - b_first;
      if (s_last) p.counters[tile] = 0;  // every contributor has counted: reset for reuse
      if constexpr (kNamedSync) {
        if (s_last) fence_acq_rel_gpu();  // the other contributors' partials before ours
      }
    }
    if constexpr (kNamedSync) {
      named_sync<kThreads>();
    } else {
      __syncthreads();
    }
    if (s_last) {
      if constexpr (!kNamedSync) __threadfence();
      // Contributors b_first..b_last in block order. Block b > b_first starts inside
      // this tile, so its segment here is its first (slot 2b); b_first's is its first
      // segment only if it starts exactly at the tile's first unit.
      const int64_t slot_floats = static_cast<int64_t>(m_rows) * kBN;
      const bool starts_here =
          first_unit_of_block(b_first, units, grid) == tile * kc_per_tile;
      const float4* first = reinterpret_cast<const float4*>(
          p.workspace + (2 * static_cast<int64_t>(b_first) + (starts_here ? 0 : 1)) *
                            slot_floats);
      const int vecs = m_rows * kBN / 4;
      for (int v = tid; v < vecs; v += kThreads) {
        float4 sum = __ldcg(first + v);
#pragma unroll 4
        for (int b = b_first + 1; b <= b_last; ++b) {
          const float4 t = __ldcg(reinterpret_cast<const float4*>(
                                      p.workspace + 2 * static_cast<int64_t>(b) * slot_floats) +
                                  v);
          sum.x += t.x;
          sum.y += t.y;
          sum.z += t.z;
          sum.w += t.w;
        }
        const int m = (v * 4) / kBN;
        const int nl = (v * 4) - m * kBN;
        const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t n = n_tile0 + nl + e;
          if (n < n_out) {
            float val = vals[e];
            if (bias != nullptr) val += P::to_float(bias[n]);
            y[m * n_out + n] = P::from_float(val);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------

// kFold: the scale is applied per group to fp32 accumulators of exact (q - z) products
// (symmetric and zero-point weights; offsets w = q * s + o cannot be folded this way).
template <typename T, typename Cfg, bool kFold>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
decode_gemm_kernel(const DecodeGemmParams p) {
  using P = Pair<T>;
  static_assert(!kFold || Cfg::kCanFold, "this configuration has no room for folded scales");
  constexpr int kBits = Cfg::kBits, kMT = Cfg::kMT, kWN16 = Cfg::kWN16, kBK = Cfg::kBK;
  constexpr int kStages = Cfg::kStages, kThreads = Cfg::kThreads, kBN = Cfg::kBN;
  constexpr bool kF32Path = kBits == 8 && sizeof(T) == 2 && P::kMagic == 0x43004300u;
  constexpr bool kSplitBarriers = Cfg::kSplitBarriers && DQGEMM_HAS_SPLIT_BARRIERS;
  constexpr bool kProducer = Cfg::kProducer;
#if !DQGEMM_HAS_SPLIT_BARRIERS
  if constexpr (kProducer) {  // never launched there (cuda_decode.py: compute capability 9+)
    __trap();
    return;
  }
#endif
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int m_rows = static_cast<int>(p.m);
  const int64_t k_real = p.k;
  // The last stage of a tile may hold fewer k blocks than BK / span (K_pad is a multiple
  // of 128 only): its missing chunks are neither loaded nor computed.
  const int kc_per_tile = static_cast<int>((p.k_pad + kBK - 1) / kBK);
  const int64_t k_blocks_per_tile = p.k_pad / Cfg::kSpan;
  const int64_t units = (p.n_pad / kBN) * kc_per_tile;
  const int grid = gridDim.x;
  const int gs_log2 = p.group_size_log2;
  const int64_t groups_per_tile = p.groups_padded;
  const int groups_per_stage = (kBK >> gs_log2) > 0 ? (kBK >> gs_log2) : 1;
  const int mode = static_cast<int>(p.zero_mode);

  const int64_t u_begin = first_unit_of_block(blockIdx.x, units, grid);
  const int64_t u_end = first_unit_of_block(blockIdx.x + 1, units, grid);
  // The next grid in the stream may start launching now, if it is a programmatic launch:
  // its blocks take SMs as ours leave, and wait for our completion before reading
  // anything we write or writing anything we read (this kernel: griddep_wait before its
  // first activation copy; every store comes after that).
  griddep_launch_dependents();
  if (u_begin >= u_end) return;  // whole block leaves together

  const uint8_t* __restrict__ wbase = static_cast<const uint8_t*>(p.weight);
  const uint8_t* __restrict__ sbase = static_cast<const uint8_t*>(p.scales);
  const uint8_t* __restrict__ zbase = static_cast<const uint8_t*>(p.zo);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint32_t smem0 = smem_addr(smem);

  // Token rows >= M are never loaded: zero them once in every stage so the unused mma
  // columns see finite data.
  for (int i = tid; i < kStages * (kMT * 8 - m_rows) * (kBK / 8); i += kThreads) {
    const int per_stage = (kMT * 8 - m_rows) * (kBK / 8);
    const int s = i / per_stage;
    const int rest = i - s * per_stage;
    const int row = m_rows + rest / (kBK / 8);
    const int chunk = rest % (kBK / 8);
    *reinterpret_cast<uint4*>(smem + s * Cfg::kStageBytes + Cfg::kWBytes +
                              row * Cfg::kXRowBytes + chunk * 16) = make_uint4(0, 0, 0, 0);
  }

  // Load cursor: the next unit to copy, (load_tile, load_kc), and the address of its
  // weights. A block's units are consecutive, so its weights are one contiguous range:
  // the cursor moves by the bytes of each unit (16-byte chunks, 4096 bytes per k block).
  const int64_t first_tile = u_begin / kc_per_tile;
  int64_t load_tile = first_tile;
  int load_kc = static_cast<int>(u_begin - first_tile * kc_per_tile);
  const uint8_t* w_next =
      wbase + (first_tile * k_blocks_per_tile +
               static_cast<int64_t>(load_kc) * Cfg::kChunksPerStage) * 4096 + tid * 16;
  // 32-bit activation offsets (the launcher checks M * K < 2^31).
  const int k_real32 = static_cast<int>(k_real);
  const int x_chunks = m_rows * (kBK / 8);
  auto advance = [&](int64_t& t, int& c) {
    if (++c == kc_per_tile) {
      c = 0;
      ++t;
    }
  };

  // Issue the cp.async copies of the unit under the load cursor into stage buffer s, then
  // move the cursor on. Weights: every thread; activations: threads from 0 up; group
  // parameters: threads from the last one down (so the two small copies land on
  // different warps, and no warp carries both to the barrier). In three parts, so that a
  // programmatic launch can issue the first stages' weights and group parameters before
  // waiting for the previous grid, and their activations after (see the prologue).
  auto load_weights = [&](int s) {
    const uint32_t st = smem0 + s * Cfg::kStageBytes;
    const int kb_here = static_cast<int>(
        min(static_cast<int64_t>(Cfg::kChunksPerStage),
            k_blocks_per_tile - static_cast<int64_t>(load_kc) * Cfg::kChunksPerStage));
    // Chunk i * kThreads + tid lies in k block (i * kThreads) / 256 (kThreads divides 256).
#pragma unroll
    for (int i = 0; i < Cfg::kWBytes / 16 / kThreads; ++i) {
      if ((i * kThreads) / 256 < kb_here) {
        cp_async16_stream(st + (i * kThreads + tid) * 16, w_next + i * kThreads * 16);
      }
    }
    w_next += kb_here * 4096;
  };
  // activations of the stage at k0: M rows x BK, chunk j of row m stored at chunk j ^ (m & 7)
  auto load_acts = [&](int s, int k0) {
    const uint32_t st = smem0 + s * Cfg::kStageBytes;
    // (Not unrolled: one or two trips per thread; unrolled, the per-trip row and chunk
    // were hoisted into spilled registers.)
#pragma unroll 1
    for (int c = tid; c < x_chunks; c += kThreads) {
      const int row = c / (kBK / 8);
      const int j = c % (kBK / 8);
      const int k = k0 + j * 8;
      const bool valid = k < k_real32;
      const T* src = valid ? x + (row * k_real32 + k) : x;
      cp_async16_zfill(st + Cfg::kWBytes + row * kBK * 2 + ((j ^ (row & 7)) * 16), src,
                       valid ? 16 : 0);
    }
  };
  // group parameters of the groups the unit under the load cursor touches (k0 = its k)
  auto load_params = [&](int s, int k0) {
    const uint32_t st = smem0 + s * Cfg::kStageBytes;
    const int g0 = k0 >> gs_log2;
    const int pchunks =
        min(groups_per_stage, static_cast<int>(groups_per_tile) - g0) * 16;
    const int64_t poff = (load_tile * groups_per_tile + g0) * 256;
#pragma unroll 1
    for (int c = kThreads - 1 - tid; c < pchunks; c += kThreads) {
      cp_async16_zfill(st + Cfg::kWBytes + Cfg::kABytes + c * 16, sbase + poff + c * 16, 16);
      if (mode != static_cast<int>(ZeroMode::kSymmetric)) {
        cp_async16_zfill(st + Cfg::kWBytes + Cfg::kABytes + Cfg::kPBytes + c * 16,
                         zbase + poff + c * 16, 16);
      }
    }
  };
  auto load_next = [&](int s) {
    load_weights(s);
    const int k0 = load_kc * kBK;
    load_acts(s, k0);
    load_params(s, k0);
    advance(load_tile, load_kc);
  };
  // The first `count` stages of the ring (the prologue of the cp.async configurations),
  // with `arrive(s)` after each. A programmatic launch (DecodeGemmParams::programmatic_launch)
  // issues every stage's weights and group parameters, which no kernel in the stream
  // writes, before griddep_wait (the wait for the previous grid in the stream), and the
  // activations, which the previous kernel may have produced, only after it; so the
  // weights stream in while the previous kernel finishes. The cp.async group (or mbarrier
  // arrival) of stage 0 then also covers the other stages' weights: they were issued first.
  auto load_prologue = [&](int count, auto&& arrive) {
    if (p.programmatic_launch) {
      const int first_kc = load_kc;
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        if (s < count) {
          load_weights(s);
          load_params(s, load_kc * kBK);
          advance(load_tile, load_kc);
        }
      }
      griddep_wait();
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        if (s < count) load_acts(s, ((first_kc + s) % kc_per_tile) * kBK);
        arrive(s);
      }
    } else {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        if (s < count) load_next(s);
        arrive(s);
      }
    }
  };

  // mbarriers of the stage hand-over without block barriers (split barriers, or the
  // copying warp; see below).
  [[maybe_unused]] __shared__ __align__(8) uint64_t full_bar[kStages];
  [[maybe_unused]] __shared__ __align__(8) uint64_t empty_bar[kStages];
  // The copying warp's loop (Cfg::kProducer; see the stage hand-over below): units
  // u_begin.. in order into stages 0, 1, .. of the ring.
  [[maybe_unused]] auto copy_units = [&](int count) {
    const uint8_t* w_src =
        wbase + (first_tile * k_blocks_per_tile +
                 static_cast<int64_t>(load_kc) * Cfg::kChunksPerStage) * 4096;
    const bool has_zo = mode != static_cast<int>(ZeroMode::kSymmetric);
    // The activation rows of the stage at k0: k0 .. min(k0 + BK, K) of each of the M rows,
    // one bulk copy each (lanes 0 .. M-1).
    auto copy_x = [&](int s, int k0) {
      const int x_valid = min(kBK, k_real32 - k0);  // > 0: stages start below K
      if (lane < m_rows) {  // m_rows <= 16
        bulk_load(smem0 + s * Cfg::kStageBytes + Cfg::kWBytes + lane * Cfg::kXRowBytes,
                  x + (lane * k_real32 + k0), static_cast<uint32_t>(x_valid * 2),
                  smem_addr(&full_bar[s]));
      }
    };
    // Stage s takes the unit under the load cursor: zeros after K in its activation rows
    // (a stage past K, the last of a tile; plain stores, made visible to the computing
    // warps by the arrivals that follow), the lanes' arrivals on "full", one of them with
    // every byte the stage will receive (before any copy is issued, so the phase completes
    // exactly when all have landed), the weight and group-parameter copies; returns the
    // stage's k0.
    auto fill_stage = [&](int s) {
      const uint32_t st = smem0 + s * Cfg::kStageBytes;
      const uint32_t bar = smem_addr(&full_bar[s]);
      const int kb_here = static_cast<int>(
          min(static_cast<int64_t>(Cfg::kChunksPerStage),
              k_blocks_per_tile - static_cast<int64_t>(load_kc) * Cfg::kChunksPerStage));
      const uint32_t w_bytes = static_cast<uint32_t>(kb_here) * 4096u;
      const int k0 = load_kc * kBK;
      const int g0 = k0 >> gs_log2;
      const uint32_t p_bytes =
          static_cast<uint32_t>(min(groups_per_stage, static_cast<int>(groups_per_tile) - g0)) *
          256u;
      const int64_t poff = (load_tile * groups_per_tile + g0) * 256;
      const int x_valid = min(kBK, k_real32 - k0);
      if (x_valid < kBK) {
        const int tail_chunks = (kBK - x_valid) / 8;
#pragma unroll 1
        for (int c = lane; c < m_rows * tail_chunks; c += 32) {
          const int row = c / tail_chunks;
          const int chunk = x_valid / 8 + (c - row * tail_chunks);
          *reinterpret_cast<uint4*>(smem + s * Cfg::kStageBytes + Cfg::kWBytes +
                                    row * Cfg::kXRowBytes + chunk * 16) = make_uint4(0, 0, 0, 0);
        }
      }
      // Every lane arrives (so each releases its own zero stores); lane 0's arrival also
      // sets the byte count, and all arrive before any copy is issued.
      if (lane == 0) {
        mbar_arrive_expect_tx(bar, w_bytes + (has_zo ? 2u : 1u) * p_bytes +
                                       static_cast<uint32_t>(m_rows * x_valid * 2));
      } else {
        mbar_arrive(bar);
      }
      __syncwarp();
      if (lane == 31) {
        bulk_load(st, w_src, w_bytes, bar);
      } else if (lane == 30) {
        bulk_load(st + Cfg::kWBytes + Cfg::kABytes, sbase + poff, p_bytes, bar);
      } else if (lane == 29 && has_zo) {
        bulk_load(st + Cfg::kWBytes + Cfg::kABytes + Cfg::kPBytes, zbase + poff, p_bytes, bar);
      }
      w_src += w_bytes;
      advance(load_tile, load_kc);
      return k0;
    };
    // First fill of the ring: the weights and group parameters, which no earlier kernel
    // writes, go out before the wait for the previous grid in the stream (a no-op unless
    // this launch is programmatic, DecodeGemmParams::programmatic_launch); the activation
    // rows, which the previous kernel may have produced, only after it.
    const int prefetch = min(kStages, count);
    const int first_kc = load_kc;
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      if (i < prefetch) fill_stage(i);
    }
    griddep_wait();
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      if (i < prefetch) copy_x(i, ((first_kc + i) % kc_per_tile) * kBK);
    }
    int s = 0;
    uint32_t round = 1;  // the ring has been filled once
    for (int it = prefetch; it < count; ++it) {
      mbar_wait_sleep(smem_addr(&empty_bar[s]), (round - 1) & 1);
      copy_x(s, fill_stage(s));
      if (++s == kStages) {
        s = 0;
        ++round;
      }
    }
  };

  // acc: the block's sums for the current segment. With kFold, the mma accumulate exact
  // (q - z) * x products of the current group into gacc (kGroupAccSets sets, alternating
  // by k16 step; a group's first mma of each set writes it without reading it), and fold()
  // adds scale * gacc into acc when the next group starts and at the end of a segment.
  constexpr int kSets = kFold ? Cfg::kGroupAccSets : 1;
  float acc[kWN16][kMT][4];
  float gacc[kSets][kWN16][kMT][4];
  float fscale[kWN16][2];  // scales (rows r, r + 8) of the group held in gacc
#pragma unroll
  for (int i = 0; i < kWN16; ++i) fscale[i][0] = fscale[i][1] = 0.f;
  for_each_acc<kWN16, kMT>([&](int i, int mt, int e) {
    acc[i][mt][e] = 0.f;
#pragma unroll
    for (int h = 0; h < kSets; ++h) gacc[h][i][mt][e] = 0.f;
  });
  auto fold = [&]() {
    if constexpr (kFold) {
      for_each_acc<kWN16, kMT>([&](int i, int mt, int e) {
        float v = gacc[0][i][mt][e];
#pragma unroll
        for (int h = 1; h < kSets; ++h) v += gacc[h][i][mt][e];
        acc[i][mt][e] = fmaf(v, fscale[i][e >> 1], acc[i][mt][e]);
      });
    }
  };
  // After the fold at a segment's end: the next stage's first fold must add nothing.
  auto clear_groups = [&]() {
    if constexpr (kFold) {
      for_each_acc<kWN16, kMT>([&](int i, int mt, int e) {
#pragma unroll
        for (int h = 0; h < kSets; ++h) gacc[h][i][mt][e] = 0.f;
      });
    }
  };
  GroupRegs g[kWN16];
  GroupRegsF32 gf[kWN16];
  const GroupConsts gconst = group_consts<T, kBits>();

  // Per-thread parts of the ldmatrix addresses (bytes from a stage's activation tile). The
  // 16-byte chunk c of row r sits at chunk c ^ (r & 7); with the compile-time k16 step
  // split off, what is left is one of a few per-thread constants:
  //   M <= 8: rows lane & 7, chunks 2 ks + (lane >> 3) for even ks, so the offset is
  //           128 (ks / 4) + xoff[(ks / 2) & 1], xoff[h] = row * 2BK + 16 ((4h + (lane >> 3)) ^ r)
  //   else:   rows mt 8 + 8 (lane >> 4) + (lane & 7), chunks 2 ks + ((lane >> 3) & 1), so
  //           mt 8 * 2BK + 128 (ks / 4) + xoff[ks % 4], xoff[q] = row0 * 2BK + 16 ((2q + h) ^ r)
  uint32_t xoff[4];
  {
    const int r = lane & 7;
    const bool one_tile = kMT == 1;
    const int row0 = one_tile ? r : ((lane >> 4) << 3) + r;
    const int hi = one_tile ? (lane >> 3) : ((lane >> 3) & 1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int chunk = one_tile ? 4 * (q & 1) + hi : 2 * q + hi;
      xoff[q] = row0 * Cfg::kXRowBytes + 16 * (kProducer ? chunk : (chunk ^ r));
    }
  }

  int64_t tile = load_tile;  // compute cursor
  int kc = load_kc;
  const int n_units = static_cast<int>(u_end - u_begin);

  // Split barriers (Cfg::kSplitBarriers): instead of one block barrier per stage, stage s
  // has a "full" mbarrier (every thread arrives when its cp.async copies of
  // the stage have landed) and an "empty" one (every thread arrives when it has read the
  // stage). A thread waits only for the data of the stage it computes, and refills the
  // stage of the previous unit once every thread has read it, so warps may drift apart by
  // a stage instead of meeting at every one (one stage less is in flight during compute).
  //
  // A copying warp (Cfg::kProducer): the last warp of the block does nothing but fill the
  // ring, unit after unit: it waits until stage s is "empty" (every computing thread has
  // arrived after reading it), arrives on "full" with the stage's byte count, and its
  // lanes issue one bulk copy each: the unit's weights (one contiguous range), its group
  // parameters, and each activation row (zeros stored past K first). The computing warps
  // then issue no copy instructions and meet at no block barrier: they wait on "full",
  // compute, arrive on "empty". (ncu on the ring with block barriers: 390 instructions per
  // warp and 16 KB stage, of which 204 compute; the rest was copy issue, barrier and stage
  // bookkeeping: bench/results/NOTES.md.)
  if constexpr (kProducer) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        mbar_init(smem_addr(&full_bar[s]), 32);  // the copying warp's lanes
        mbar_init(smem_addr(&empty_bar[s]), Cfg::kComputeThreads);
      }
      mbar_init_fence();
    }
    __syncthreads();  // barriers initialized; the zeroed token rows are visible
    if (warp == Cfg::kWarps) {
      copy_units(n_units);
      return;  // the computing warps synchronize among themselves only (named_sync)
    }
  } else if constexpr (kSplitBarriers) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        mbar_init(smem_addr(&full_bar[s]), kThreads);
        mbar_init(smem_addr(&empty_bar[s]), kThreads);
      }
      mbar_init_fence();
    }
    __syncthreads();  // barriers initialized; the zeroed token rows are visible
    // every stage starts empty
    load_prologue(min(n_units, kStages),
                  [&](int s) { cp_async_mbar_arrive(smem_addr(&full_bar[s])); });
  } else {
    load_prologue(min(n_units, kStages - 1), [&](int s) {
      if (s < kStages - 1) cp_async_commit();
    });
  }

  // Calls f with the k16 steps per group inside a stage as a compile-time constant.
  auto dispatch_group_steps = [&](auto&& f) {
    constexpr int kSteps = Cfg::kK16PerStage;
    const int group_steps = gs_log2 - 4 >= 8 ? kSteps : min(kSteps, 1 << (gs_log2 - 4));
    if (group_steps <= 2) {
      f(std::integral_constant<int, (kSteps < 2 ? kSteps : 2)>{});
    } else if (group_steps == 4) {
      f(std::integral_constant<int, (kSteps < 4 ? kSteps : 4)>{});
    } else if (group_steps == 8) {
      f(std::integral_constant<int, (kSteps < 8 ? kSteps : 8)>{});
    } else {
      f(std::integral_constant<int, kSteps>{});
    }
  };
  int seg_kc_begin = kc;
  int stage = 0;
  // The main loop. fixed_steps > 0: every stage has that many k16 steps per group (the
  // copying-warp configurations dispatch once, before the loop, instead of per stage);
  // 0: chosen per stage.
  // Stage phase for the mbarrier waits of the copying-warp configurations (flips at each
  // wrap of the ring, instead of (it / kStages) & 1).
  [[maybe_unused]] uint32_t phase = 0;
  // The last stage of a tile may be short (kBK = 256, K_pad a multiple of 128 only).
  [[maybe_unused]] const bool tiles_end_short =
      k_blocks_per_tile % Cfg::kChunksPerStage != 0;
  auto main_loop = [&](auto fixed_steps) {
  for (int it = 0; it < n_units; ++it) {
    if constexpr (kProducer) {
      mbar_wait_sleep(smem_addr(&full_bar[stage]), phase);
    } else if constexpr (kSplitBarriers) {
      mbar_wait(smem_addr(&full_bar[stage]), (it / kStages) & 1);
    } else {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage `stage` is visible; everyone is done with the previous one
      int sn = stage + kStages - 1;
      if (sn >= kStages) sn -= kStages;
      if (it + kStages - 1 < n_units) load_next(sn);
      cp_async_commit();
    }

    // ---- compute on stage ----
    const uint32_t st = smem0 + stage * Cfg::kStageBytes;
    const uint32_t a_st = st + Cfg::kWBytes;
    const uint32_t s_st = a_st + Cfg::kABytes;
    const uint32_t z_st = s_st + Cfg::kPBytes;
    bool short_stage;
    if constexpr (kProducer) {
      short_stage = tiles_end_short && kc == kc_per_tile - 1;
    } else {
      short_stage = k_blocks_per_tile - static_cast<int64_t>(kc) * Cfg::kChunksPerStage <
                    Cfg::kChunksPerStage;
    }
    // One stage of kChunks k blocks. kG = k16 steps per group inside it. Both are
    // compile-time constants, so group starts, folds and first-of-group mma are placed at
    // compile time and nothing in the stage branches (which also lets the compiler issue
    // the next chunk's shared-memory loads early). Per-channel weights and groups longer
    // than the stage start a "group" at every stage: same parameters.
    auto compute_stage = [&](auto group_steps, auto chunks) {
      constexpr int kG = decltype(group_steps)::value;
      constexpr int kChunks = decltype(chunks)::value;
      uint32_t bfrag[kMT][2];
      [[maybe_unused]] uint32_t bpair[4];  // M <= 8 only
#pragma unroll
      for (int cb = 0; cb < kChunks; ++cb) {
        uint4 wq[kWN16];
#pragma unroll
        for (int i = 0; i < kWN16; ++i) {
          wq[i] = lds128(st + ((cb * 8 + warp * kWN16 + i) * 32 + lane) * 16);
        }
#pragma unroll
        for (int j = 0; j < Cfg::kK16PerChunk; ++j) {
          const int ks = cb * Cfg::kK16PerChunk + j;  // k16 step inside the stage
          if (ks % kG == 0) {  // a group starts
            fold();
            const int gl = ks / kG;
#pragma unroll
            for (int i = 0; i < kWN16; ++i) {
              const uint32_t off = gl * 256 + (warp * kWN16 + i) * 32 + (lane >> 2) * 4;
              if constexpr (kF32Path) {
                load_group_f32(gf[i], s_st + off, z_st + off, mode);
                fscale[i][0] = gf[i].s_lo;
                fscale[i][1] = gf[i].s_hi;
              } else {
                load_group<T, !kFold>(g[i], s_st + off, z_st + off, mode, gconst);
                fscale[i][0] = g[i].fs_lo;
                fscale[i][1] = g[i].fs_hi;
              }
            }
          }
          // B fragments (2 registers per token tile and k16 step) with ldmatrix.x4: one
          // token tile over two k16 steps when M <= 8, else two token tiles over one step
          // (fewer live registers at large M).
          if constexpr (kMT == 1) {
            if ((ks & 1) == 0) {
              ldmatrix_x4(bpair, a_st + xoff[(ks >> 1) & 1] + 128 * (ks >> 2));
            }
            bfrag[0][0] = (ks & 1) ? bpair[2] : bpair[0];
            bfrag[0][1] = (ks & 1) ? bpair[3] : bpair[1];
          } else {
#pragma unroll
            for (int mt = 0; mt < kMT; mt += 2) {
              uint32_t r[4];
              ldmatrix_x4(r, a_st + xoff[ks & 3] + mt * 8 * Cfg::kXRowBytes + 128 * (ks >> 2));
              bfrag[mt][0] = r[0];
              bfrag[mt][1] = r[1];
              bfrag[mt + 1][0] = r[2];
              bfrag[mt + 1][1] = r[3];
            }
          }
#pragma unroll
          for (int i = 0; i < kWN16; ++i) {
            uint32_t a[4];
            if constexpr (kBits == 4) {
              const uint32_t q = j == 0 ? wq[i].x : j == 1 ? wq[i].y : j == 2 ? wq[i].z : wq[i].w;
              dequant_int4<T, !kFold>(q, g[i], a);
            } else if constexpr (kF32Path) {
              dequant_int8_bf16<!kFold>(j == 0 ? wq[i].x : wq[i].z, j == 0 ? wq[i].y : wq[i].w,
                                        gf[i], a);
            } else {
              dequant_int8_f16<!kFold>(j == 0 ? wq[i].x : wq[i].z, j == 0 ? wq[i].y : wq[i].w,
                                       g[i], a);
            }
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              if constexpr (kFold) {
                if (ks % kG < kSets) {
                  mma16816_first<T>(gacc[ks % kSets][i][mt], a, bfrag[mt][0], bfrag[mt][1]);
                } else {
                  mma16816<T>(gacc[ks % kSets][i][mt], a, bfrag[mt][0], bfrag[mt][1]);
                }
              } else {
                mma16816<T>(acc[i][mt], a, bfrag[mt][0], bfrag[mt][1]);
              }
            }
          }
        }
      }
    };
    // The last stage of a tile holds 128 k (K_pad is a multiple of 128) when BK = 256: the
    // short variant. Groups per stage are uniform at run time: one branch per stage picks
    // the variant.
    auto run_stage = [&](auto group_steps) {
      using Full = std::integral_constant<int, Cfg::kChunksPerStage>;
      if constexpr (kBK > 128) {
        static_assert(kBK == 256, "a short stage is assumed to be exactly 128 k");
        if (short_stage) {
          compute_stage(group_steps, std::integral_constant<int, 128 / Cfg::kSpan>{});
          return;
        }
      }
      compute_stage(group_steps, Full{});
    };
    if constexpr (decltype(fixed_steps)::value > 0) {
      run_stage(fixed_steps);
    } else {
      dispatch_group_steps(run_stage);
    }
    if constexpr (kProducer) {
      mbar_arrive(smem_addr(&empty_bar[stage]));
    } else if constexpr (kSplitBarriers) {
      mbar_arrive(smem_addr(&empty_bar[stage]));
      if (it >= 1) {  // the previous unit's stage takes unit it - 1 + kStages
        const int sp = stage == 0 ? kStages - 1 : stage - 1;
        mbar_wait(smem_addr(&empty_bar[sp]), ((it - 1) / kStages) & 1);
        if (it - 1 + kStages < n_units) load_next(sp);
        cp_async_mbar_arrive(smem_addr(&full_bar[sp]));
      }
    }
    if constexpr (kProducer) {
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1u;
      }
    } else {
      stage = stage + 1 == kStages ? 0 : stage + 1;
    }

    // ---- end of a segment (n_tile boundary or end of range): epilogue ----
    if (kc == kc_per_tile - 1 || it + 1 == n_units) {
      fold();
      clear_groups();
      const bool full = seg_kc_begin == 0 && kc == kc_per_tile - 1;
      finish_segment<T, kWN16, kMT, Cfg::kComputeThreads, kProducer>(
          p, acc, full, tile, first_tile, units, kc_per_tile, s_last);
      for_each_acc<kWN16, kMT>([&](int i, int mt, int e) { acc[i][mt][e] = 0.f; });
      seg_kc_begin = 0;
    }
    advance(tile, kc);
  }
  };
  if constexpr (kProducer) {
    dispatch_group_steps(main_loop);
  } else {
    main_loop(std::integral_constant<int, 0>{});
  }
  cp_async_wait<0>();
}

}  // namespace decode
}  // namespace dqgemm
