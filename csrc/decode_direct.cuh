// Decode GEMM, barrier-free "direct" variant (W4A16 / W8A16, M = 1..8): the kernel template.
//
// What it computes: the same product as decode_gemm_kernel (decode_gemm.cuh), from the same
// packed weight and group-parameter layouts, over the same stream-K units and fixup, so
// both variants serve one prepared weight (the launch table picks one per token tile).
//
// Why a second variant: the shared-memory ring kernel at M <= 8 reads 2.5-2.8 TB/s of the
// H200's 4.2 (bench/results/NOTES.md, "v5"): its warps wait on latency chains that run
// through the block barrier of every stage (cp.async wait -> barrier -> lds -> lop3 -> mma),
// and neither fewer instructions nor more resident warps moved it. Here no barrier stands
// in the main loop:
//   - every lane streams its own 16-byte A-fragment chunk of each k block with cp.async into
//     a private shared-memory ring of kRing slots (kRing - 1 chunks in flight) and reads back
//     only what it wrote, so cp.async.wait_group is the only synchronization. (A first
//     version kept the ring in registers: at the 80-register cap only 2 chunks per lane fit
//     in flight, ~24 KB per SM, and it ran at 0.7x the ring kernel: NOTES.md.)
//   - the activation B fragments come from global memory through L1 (every warp of the
//     block reads the same words: the first miss fills L1 for the other seven), together
//     with the lane's scale / zero words, one chunk ahead;
//   - warps of a block only meet at segment ends (the fixup needs the block).
//
#pragma once

#include "decode_gemm.cuh"

namespace dqgemm {
namespace decode {

// 4 bytes through L1 (activations, group parameters); `pred` false: 0.
__device__ __forceinline__ uint32_t ldg32(const void* ptr, bool pred) {
  uint32_t v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0;\n"
      " @p ld.global.nc.u32 %0, [%1];\n}\n"
      : "=r"(v)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

template <int BITS, int RING, int MIN_BLOCKS>
struct DirectConfig {
  static constexpr int kBits = BITS;
  static constexpr int kRing = RING;             // ring slots per lane (kRing - 1 in flight)
  static constexpr int kSmemBytes = 8 * RING * 512;  // 8 warps x kRing x 32 lanes x 16 B
  static constexpr int kMinBlocks = MIN_BLOCKS;  // __launch_bounds__ (3: <= 80 registers)
  static constexpr int kThreads = 256;
  static constexpr int kSpan = BITS == 4 ? 64 : 32;   // k per 16-byte lane chunk (k block)
  static constexpr int kK16 = kSpan / 16;             // k16 steps per chunk
  static constexpr int kXWords = 2 * kK16;            // activation words per lane and chunk
  // The unit of work of the stream-K partition: the M <= 8 configuration of the ring
  // kernel (decode_gemm_stage_k), so grids and workspaces are interchangeable.
  static constexpr int kUnitK = BITS == 4 ? 256 : 128;
};

template <typename T, typename Cfg, bool kFold, bool kTwoGroups>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
decode_direct_kernel(const DecodeGemmParams p) {
  using P = Pair<T>;
  constexpr int kBits = Cfg::kBits, kSpan = Cfg::kSpan, kK16 = Cfg::kK16;
  constexpr int kXWords = Cfg::kXWords, kRing = Cfg::kRing;
  constexpr int kGroupsPerChunk = kTwoGroups ? 2 : 1;
  constexpr bool kF32Path = kBits == 8 && std::is_same_v<T, __nv_bfloat16>;
  static_assert(!kTwoGroups || kBits == 4, "two groups per chunk only at 4-bit group 32");
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int m_rows = static_cast<int>(p.m);
  const int k_real = static_cast<int>(p.k);  // M * K < 2^31 (launcher)
  const int kc_per_tile = static_cast<int>((p.k_pad + Cfg::kUnitK - 1) / Cfg::kUnitK);
  const int kb_per_tile = static_cast<int>(p.k_pad / kSpan);
  const int64_t units = (p.n_pad / 128) * kc_per_tile;
  const int grid = gridDim.x;
  const int gs_log2 = p.group_size_log2;
  const int mode = static_cast<int>(p.zero_mode);
  const bool has_zo = mode != static_cast<int>(ZeroMode::kSymmetric);

  const int64_t u_begin = first_unit_of_block(blockIdx.x, units, grid);
  const int64_t u_end = first_unit_of_block(blockIdx.x + 1, units, grid);
  if (u_begin >= u_end) return;  // whole block leaves together
  // The block's units are consecutive, so its k blocks are one range over the
  // (n_tile, k block) sequence, and its weights one contiguous byte range.
  auto kb_of_unit = [&](int64_t u) {
    const int64_t t = u / kc_per_tile;
    return t * kb_per_tile + (u - t * kc_per_tile) * (Cfg::kUnitK / kSpan);
  };
  const int64_t kb_begin = kb_of_unit(u_begin);
  const int n_chunks = static_cast<int>(kb_of_unit(u_end) - kb_begin);
  const int first_tile = static_cast<int>(kb_begin / kb_per_tile);

  // Weights: the lane's 16 bytes of slice `warp` in each 4096-byte k block.
  const uint4* wp = static_cast<const uint4*>(p.weight) + kb_begin * 256 + warp * 32 + lane;
  // Activations: token lane / 4 (zeros for tokens >= M), words 8 t + lane % 4 (+ 4).
  const int tok = lane >> 2;
  const bool has_row = tok < m_rows;
  const uint32_t* xrow = reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.x) +
                                                           (has_row ? tok : 0) * k_real) +
                         (lane & 3);
  // Group parameters: the lane's word (rows r, r + 8 of slice `warp`) of a 256-byte group.
  const int lane_param = warp * 32 + (lane >> 2) * 4;
  const uint8_t* sbase = static_cast<const uint8_t*>(p.scales) + lane_param;
  const uint8_t* zbase =
      has_zo ? static_cast<const uint8_t*>(p.zo) + lane_param : static_cast<const uint8_t*>(nullptr);

  struct ChunkData {  // what a chunk needs besides its weights
    uint32_t x[kXWords];
    uint32_t s[kGroupsPerChunk];
    uint32_t z[kGroupsPerChunk];
  };
  // (32-bit parameter offsets: the launcher checks that the parameters take < 2 GB)
  const int groups_padded = static_cast<int>(p.groups_padded);
  auto load_chunk_data = [&](ChunkData& d, int tile, int kb, bool pred) {
    const int k0 = kb * kSpan;
    const uint32_t* xr = xrow + k0 / 2;
    // k blocks past K hold zero codes with zero scales; their activations must be finite
    const bool whole = k0 + kSpan <= k_real;
#pragma unroll
    for (int i = 0; i < kXWords; ++i) {
      const int word = 8 * (i >> 1) + 4 * (i & 1);
      const bool in_k = whole || k0 + 2 * (word + (lane & 3)) < k_real;
      d.x[i] = ldg32(xr + word, pred && has_row && in_k);
    }
    const int goff = (tile * groups_padded + (k0 >> gs_log2)) * 256;
#pragma unroll
    for (int gi = 0; gi < kGroupsPerChunk; ++gi) {
      d.s[gi] = ldg32(sbase + goff + gi * 256, pred);
      d.z[gi] = has_zo ? ldg32(zbase + goff + gi * 256, pred) : 0u;
    }
  };

  float acc[1][1][4] = {};
  const GroupConsts gconst = group_consts<T, kBits>();

  // One chunk: dequantize the lane's 16 bytes into kK16 A fragments, one mma each.
  auto compute_chunk = [&](const uint4& w, const ChunkData& d) {
    GroupRegs g;
    GroupRegsF32 gf;
    float fs[2];
    auto set_group = [&](int gi) {
      if constexpr (kF32Path) {
        group_from_words_f32(gf, d.s[gi], d.z[gi], mode);
        fs[0] = gf.s_lo;
        fs[1] = gf.s_hi;
      } else {
        group_from_words<T, !kFold>(g, d.s[gi], d.z[gi], mode, gconst);
        fs[0] = g.fs_lo;
        fs[1] = g.fs_hi;
      }
    };
    float gacc[2][4];
    auto fold = [&]() {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[0][0][e] = fmaf(gacc[0][e] + gacc[1][e], fs[e >> 1], acc[0][0][e]);
      }
    };
    set_group(0);
#pragma unroll
    for (int t = 0; t < kK16; ++t) {
      const int group_start = kTwoGroups && t >= 2 ? 2 : 0;
      if constexpr (kFold && kTwoGroups) {
        if (t == 2) {
          fold();
          set_group(1);
        }
      } else if constexpr (kTwoGroups) {
        if (t == 2) set_group(1);
      }
      uint32_t a[4];
      if constexpr (kBits == 4) {
        const uint32_t q = t == 0 ? w.x : t == 1 ? w.y : t == 2 ? w.z : w.w;
        dequant_int4<T, !kFold>(q, g, a);
      } else if constexpr (kF32Path) {
        dequant_int8_bf16<!kFold>(t == 0 ? w.x : w.z, t == 0 ? w.y : w.w, gf, a);
      } else {
        dequant_int8_f16<!kFold>(t == 0 ? w.x : w.z, t == 0 ? w.y : w.w, g, a);
      }
      const uint32_t b0 = d.x[2 * t], b1 = d.x[2 * t + 1];
      if constexpr (kFold) {
        if (t - group_start < 2) {
          mma16816_first<T>(gacc[t & 1], a, b0, b1);
        } else {
          mma16816<T>(gacc[t & 1], a, b0, b1);
        }
      } else {
        mma16816<T>(acc[0][0], a, b0, b1);
      }
    }
    if constexpr (kFold) fold();
  };

  // Weight ring: kRing slots of 16 bytes per lane in shared memory, private to the lane
  // (a lane reads back only the bytes its own cp.async wrote, so cp.async.wait_group is
  // all the synchronization there is: no barrier, not even a warp one).
  extern __shared__ __align__(16) uint8_t smem_ring[];
  const uint32_t ring0 = smem_addr(smem_ring) + (warp * kRing * 32 + lane) * 16;
  auto issue = [&](int s, int j) {  // chunk j into slot s (zeros past the block's range)
    cp_async16_zfill(ring0 + s * 512, j < n_chunks ? wp + j * 256 : wp, j < n_chunks ? 16 : 0);
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kRing - 1; ++s) issue(s, s);
  int tile = first_tile;  // compute cursor: the chunk computed next
  int kb = static_cast<int>(kb_begin - first_tile * kb_per_tile);
  ChunkData next;
  load_chunk_data(next, tile, kb, true);
  int seg_kb_begin = kb;

  for (int j0 = 0; j0 < n_chunks; j0 += kRing) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      const int j = j0 + s;
      if (j >= n_chunks) break;
      cp_async_wait<kRing - 2>();  // this lane's copy of chunk j has landed
      const uint4 w = lds128(ring0 + s * 512);
      // the slot of chunk j - 1 (read into registers last iteration) takes chunk j + kRing - 1
      issue((s + kRing - 1) % kRing, j + kRing - 1);
      const ChunkData d = next;
      int next_tile = tile;
      int next_kb = kb + 1;
      if (next_kb == kb_per_tile) {
        next_kb = 0;
        ++next_tile;
      }
      load_chunk_data(next, next_tile, next_kb, j + 1 < n_chunks);
      compute_chunk(w, d);
      if (kb == kb_per_tile - 1 || j + 1 == n_chunks) {  // a segment ends (uniform)
        const bool full = seg_kb_begin == 0 && kb == kb_per_tile - 1;
        finish_segment<T, 1, 1, Cfg::kThreads>(p, acc, full, tile, first_tile, units,
                                               kc_per_tile, s_last);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][0][e] = 0.f;
        seg_kb_begin = 0;
      }
      tile = next_tile;
      kb = next_kb;
    }
  }
  cp_async_wait<0>();
}

}  // namespace decode
}  // namespace dqgemm
