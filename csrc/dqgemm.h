// dqgemm C++/CUDA interface: plain parameter structs and launchers.
//
// Nothing in csrc/ includes a torch header. The Python layer (python/dqgemm/_ext.py and
// the kernel wrappers in python/dqgemm/kernels/) validates tensors, then fills these
// structs with raw device pointers, sizes and the CUDA stream of the current torch stream.
// Launchers return cudaSuccess or the CUDA error; the binding turns errors into Python
// exceptions with the failing launcher's name.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dqgemm {

// Element types crossing the binding. Values are part of the Python contract (_ext.py).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// How codes become weights (see python/dqgemm/format.py):
//   kSymmetric:  w = (q - 2^(bits-1)) * s
//   kZeroPoint:  w = (q - z) * s
//   kOffset:     w = q * s + o
enum class ZeroMode : int { kSymmetric = 0, kZeroPoint = 1, kOffset = 2 };

// Dequantize a canonical kpack-v1 weight [N, K] into a dense row-major fp16/bf16 [N, K].
struct DequantParams {
  const void* qdata = nullptr;      // uint8 [N, row_bytes]
  const void* scales = nullptr;     // scale_dtype [N, num_groups]
  const float* zeros = nullptr;     // fp32 [N, num_groups]: zero points or offsets; may be null
  const int32_t* g_idx = nullptr;   // int32 [K] or null (group = k / group_size)
  void* out = nullptr;              // out_dtype [N, K], row-major
  int64_t n = 0;                    // out_features
  int64_t k = 0;                    // in_features
  int64_t row_bytes = 0;            // bytes per packed row = ceil(K * bits / 8)
  int64_t num_groups = 0;
  int64_t group_size = 0;           // effective: K for per-channel
  int bits = 4;
  DType scale_dtype = DType::kFloat16;
  DType out_dtype = DType::kFloat16;
  ZeroMode zero_mode = ZeroMode::kSymmetric;
  cudaStream_t stream = nullptr;
};

cudaError_t launch_dequantize(const DequantParams& p);

}  // namespace dqgemm

// ---------------------------------------------------------------------------------------
// Decode GEMM (csrc/decode_gemm.cu): y[M, N] = x[M, K] @ dequant(W)^T (+ bias), M <= 64,
// weights and group parameters in the re-laid-out format of
// python/dqgemm/kernels/cuda_decode.py (see the header of csrc/decode_gemm.cuh).
// ---------------------------------------------------------------------------------------
namespace dqgemm {

struct DecodeGemmParams {
  const void* x = nullptr;        // dtype [M, K] row-major, 16-byte aligned, K % 8 == 0
  const void* weight = nullptr;   // packed codes [N_pad/128][K_pad/SPAN][8][32][16 bytes]
  const void* scales = nullptr;   // dtype [N_pad/128][groups_padded][8][8][2]
  const void* zo = nullptr;       // zero points or offsets, same layout as scales; or null
  const void* bias = nullptr;     // dtype [N] or null
  void* y = nullptr;              // dtype [M, N] row-major
  float* workspace = nullptr;     // fp32 partial sums, >= 2 * grid * M * 128 floats
  int32_t* counters = nullptr;    // int32 [N_pad / 128], all 0 on entry; left 0 on exit
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t n_pad = 0;              // multiple of 128
  int64_t k_pad = 0;              // multiple of 128
  int64_t groups_padded = 0;      // groups per 128-channel tile in the parameter layout
  int group_size_log2 = 7;        // 5..8; 30 for per-channel
  int bits = 4;
  DType dtype = DType::kFloat16;  // activations, output, group parameters
  ZeroMode zero_mode = ZeroMode::kSymmetric;
  int blocks_per_sm = 2;          // resident blocks per SM the grid was sized for: at
                                  // M <= 16, 3 (M <= 8: also 4) picks a shallower ring
                                  // that lets that many fit
  bool producer_warp = false;     // M <= 16, sm_90+: the configuration with a copying warp
                                  // (bulk copies; csrc/decode_gemm.cuh, Config::kProducer)
  bool programmatic_launch = false;  // sm_90+: programmatic dependent launch
                                     // (the weights prefetched while the previous kernel
                                     // in the stream finishes)
  int grid = 0;                   // blocks (stream-K ranges); <= units
  cudaStream_t stream = nullptr;
};

// Tokens per block tile for a given M (8, 16, 32 or 64): the kernel configuration.
int decode_gemm_m_tile(int64_t m);
// k per pipeline stage of the configuration used for M and bits
// (units = N_pad/128 * ceil(K_pad / bk)).
int decode_gemm_stage_k(int64_t m, int bits);
cudaError_t launch_decode_gemm(const DecodeGemmParams& p);

}  // namespace dqgemm

// ---------------------------------------------------------------------------------------
// Prefill GEMM (csrc/prefill_gemm.cu): the same product for any M on Hopper (sm_90a,
// wgmma), on the cuda_decode weight layout (the same packed tensors as DecodeGemmParams).
// ---------------------------------------------------------------------------------------
namespace dqgemm {

struct PrefillGemmParams {
  const void* x = nullptr;        // dtype [M, K] row-major, 16-byte aligned, K % 8 == 0
  const void* weight = nullptr;   // cuda_decode layout (see DecodeGemmParams)
  const void* scales = nullptr;
  const void* zo = nullptr;
  const void* bias = nullptr;     // dtype [N] or null
  void* y = nullptr;              // dtype [M, N] row-major
  float* workspace = nullptr;     // k_splits > 1: >= grid * m_tile * n_tile floats;
                                  // stream-K: >= 2 * stream_k_blocks * m_tile * n_tile
  int32_t* counters = nullptr;    // k_splits > 1 or stream-K: int32 [tiles], all 0 on
                                  // entry; left 0
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t n_pad = 0;              // multiple of 128
  int64_t k_pad = 0;              // multiple of 128
  int64_t groups_padded = 0;
  int group_size_log2 = 7;        // 5..8; 30 for per-channel
  int bits = 4;
  DType dtype = DType::kFloat16;
  ZeroMode zero_mode = ZeroMode::kSymmetric;
  int m_tile = 128;               // tokens per block tile: 64, 128 or 256
  int n_tile = 128;               // channels per block tile: 128, or 256 (m_tile <= 128)
  int k_splits = 1;               // blocks per output tile along K (deterministic sum)
  bool warp_specialized = false;  // a copying warpgroup
  // > 0: stream-K over this many blocks (warp_specialized and k_splits = 1 only, not
  // m_tile 128 with n_tile 256): every block takes an equal share of the (tile, k stage)
  // units; partial tiles are summed deterministically (csrc/prefill_gemm.cu).
  int stream_k_blocks = 0;
  cudaStream_t stream = nullptr;
};

// True when this build holds the sm_90a kernels (the wgmma instructions exist only there).
bool prefill_gemm_compiled();
cudaError_t launch_prefill_gemm(const PrefillGemmParams& p);

}  // namespace dqgemm
