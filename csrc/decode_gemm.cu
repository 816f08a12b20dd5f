// Decode GEMM kernel family (W4A16 / W8A16, M = 1..64): launcher and instantiations.
//
// What it computes, the packed layouts, tiles and the deterministic stream-K partition are
// described in decode_gemm.cuh. This file picks one configuration per token tile:
//
//   M <= 8 : 8 warps, 1 slice of 16 channels each, 1 token tile,  4 stages of BK = 256 (4-bit)
//            or 128 (8-bit): 16 KB of weights per stage (3 stages when 3 blocks share an SM,
//            2 when 4 do)
//   M <= 16: 8 warps, 1 slice each,               2 token tiles, 3 stages of 16 KB likewise
//            (4 at 8-bit; 2 when 3 blocks share an SM); at 4-bit with 3 stages the stages
//            are handed over by per-stage mbarriers instead of a block barrier
//   M <= 32: 4 warps, 2 slices each,              4 token tiles, BK = 128, 4 stages
//   M <= 64: 2 warps, 4 slices each,              8 token tiles, BK = 64,  4 stages
//
// At M <= 16 on sm_90 the launcher can also run the same tiles with one more warp that
// only copies (DecodeGemmParams::producer_warp, Config::kProducer: bulk copies of weights,
// group parameters and activation rows, mbarrier hand-over, optionally a programmatic
// dependent launch); cuda_decode.py decides from configs/cuda_decode.json.
//
// Why 16 KB stages at M <= 16: the kernel is bound by instruction issue and latency, not by
// bytes in flight (ncu on the H200, bench/results/NOTES.md: 0.53 issued warps per scheduler
// and cycle, 35% of DRAM peak at 8 KB stages). Every stage pays a fixed cost (barrier, wait,
// address arithmetic, activation and parameter copies) that a larger stage amortizes.
// Symmetric and zero-point weights use the folded-scale kernels (kFold: exact q - z
// fragments, the scale applied per group to fp32 accumulators; one fma per pair of codes
// fewer); offset weights (w = q * s + o) the unfolded ones. M <= 64 has no room for the
// second accumulator set and is never folded.
//
// Why fewer warps per block as M grows: every warp reads the activation fragments of its
// k step from shared memory, so the shared-memory traffic per weight byte grows with
// M / (slices per warp); more slices per warp keep it under the SM's shared-memory
// bandwidth (and several blocks per SM keep the warp count up).
//
// Instantiations: bits {4, 8} x dtype {fp16, bf16} x 4 token tiles, plus the shallower rings
// at M <= 16 (two at M <= 8, one at M <= 16), each folded and unfolded where it can fold.
// Zero-point mode and group size are run-time (uniform branches once per group).
// Constraints checked here: M in 1..64, bits 4/8, fp16/bf16, K % 8 == 0, M * K < 2^31
// (32-bit activation offsets), aligned x, the copying warp only at M <= 16,
// padded sizes multiples of 128, a grid no larger than the number of units.
// Test: pytest tests/test_cuda_decode.py. Benchmark: python bench/cuda_decode_bench.py.

#include "decode_gemm.cuh"

namespace dqgemm {
namespace {

using decode::Config;

template <typename T, typename Cfg, bool kFold>
cudaError_t launch_kernel(const DecodeGemmParams& p) {
  auto kernel = decode::decode_gemm_kernel<T, Cfg, kFold>;
  // The dynamic shared-memory limit (static + dynamic must fit without it: 48 KB) and the
  // carveout (all of L1/shared as shared, so several blocks fit per SM) are per function
  // and device; setting them is cheap and involves no host sync, so it happens on every
  // launch instead of caching per device.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  if (p.programmatic_launch) {
    // Programmatic dependent launch: this grid may start while the previous kernel in the
    // stream finishes; the kernel waits for it (griddepcontrol.wait) before its first
    // activation copy, and prefetches the first stages' weights until then.
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.grid));
    cfg.blockDim = dim3(Cfg::kThreads);
    cfg.dynamicSmemBytes = Cfg::kSmemBytes;
    cfg.stream = p.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, p);
  }
  kernel<<<p.grid, Cfg::kThreads, Cfg::kSmemBytes, p.stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Cfg>
cudaError_t launch_config(const DecodeGemmParams& p) {
  if constexpr (Cfg::kCanFold) {
    if (p.zero_mode != ZeroMode::kOffset) return launch_kernel<T, Cfg, true>(p);
  }
  return launch_kernel<T, Cfg, false>(p);
}

template <typename T, int BITS>
cudaError_t launch_tile(const DecodeGemmParams& p) {
  switch (decode_gemm_m_tile(p.m)) {
    // 16 KB of weights per stage at M <= 16 (BK = 256 at 4-bit, 128 at 8-bit).
    // Ring depth follows the blocks per SM the grid was sized for (configs/cuda_decode.json):
    // the deepest ring with which that many blocks fit in the SM's shared memory.
    case 8:
      if (p.producer_warp) {  // a copying warp (sm_90+; cuda_decode.py decides)
        return p.blocks_per_sm >= 3
                   ? launch_config<T, Config<BITS, 1, 1, BITS == 4 ? 256 : 128, 3, 3, false, true>>(p)
                   : launch_config<T, Config<BITS, 1, 1, BITS == 4 ? 256 : 128, 4, 2, false, true>>(p);
      }
      if (p.blocks_per_sm >= 4) {  // 2 x 24.6 KB, 64 registers: 4 blocks fit
        return launch_config<T, Config<BITS, 1, 1, BITS == 4 ? 256 : 128, 2, 4>>(p);
      }
      return p.blocks_per_sm == 3
                 ? launch_config<T, Config<BITS, 1, 1, BITS == 4 ? 256 : 128, 3, 3>>(p)
                 : launch_config<T, Config<BITS, 1, 1, BITS == 4 ? 256 : 128, 4, 2>>(p);
    // INT4 at 2 blocks per SM with split barriers: same H200 call, against the block
    // barrier, 0.92-0.94x the time on all six shapes at M = 16; INT8 lost (1.14x), as did
    // the small layers at M = 1 (1.10x); bench/results/h200_2026-12-01_s3_decode_quick_split.json.
    case 16:
      if (p.producer_warp) {
        return launch_config<T, Config<BITS, 2, 1, BITS == 4 ? 256 : 128, BITS == 4 ? 3 : 4, 2,
                                       false, true>>(p);
      }
      return p.blocks_per_sm >= 3
                 ? launch_config<T, Config<BITS, 2, 1, BITS == 4 ? 256 : 128, 2, 3>>(p)
                 : launch_config<T, Config<BITS, 2, 1, BITS == 4 ? 256 : 128, BITS == 4 ? 3 : 4, 2,
                                           BITS == 4>>(p);
    case 32: return launch_config<T, Config<BITS, 4, 2, 128, 4>>(p);
    case 64: return launch_config<T, Config<BITS, 8, 4, 64, 4>>(p);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_bits(const DecodeGemmParams& p) {
  return p.bits == 4 ? launch_tile<T, 4>(p) : launch_tile<T, 8>(p);
}

}  // namespace

int decode_gemm_m_tile(int64_t m) {
  if (m <= 0 || m > 64) return 0;
  return m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : 64;
}

int decode_gemm_stage_k(int64_t m, int bits) {
  const int tile = decode_gemm_m_tile(m);
  return tile == 64 ? 64 : (tile <= 16 && bits == 4) ? 256 : 128;
}

cudaError_t launch_decode_gemm(const DecodeGemmParams& p) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const int bk = decode_gemm_stage_k(p.m, p.bits);
  const bool gs_ok = (p.group_size_log2 >= 5 && p.group_size_log2 <= 8) ||
                     p.group_size_log2 == 30;
  if (decode_gemm_m_tile(p.m) == 0 || (p.bits != 4 && p.bits != 8) || !gs_ok ||
      p.k % 8 != 0 || p.m * p.k >= (int64_t{1} << 31) || p.k_pad % 128 != 0 ||
      p.n_pad % 128 != 0 || p.k_pad < p.k || p.n_pad < p.n ||
      (reinterpret_cast<uintptr_t>(p.x) & 15u) != 0 ||
      p.weight == nullptr || p.scales == nullptr || p.y == nullptr || p.counters == nullptr ||
      p.workspace == nullptr ||
      (p.zero_mode != ZeroMode::kSymmetric && p.zo == nullptr) ||
      (p.producer_warp && decode_gemm_m_tile(p.m) > 16)) {
    return cudaErrorInvalidValue;
  }
  const int64_t units = (p.n_pad / 128) * ((p.k_pad + bk - 1) / bk);
  if (p.grid <= 0 || p.grid > units || p.grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16: return launch_bits<__half>(p);
    case DType::kBFloat16: return launch_bits<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dqgemm
