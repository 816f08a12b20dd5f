// Dequantize kernel family: canonical kpack-v1 weight -> dense fp16/bf16 [N, K].
//
// What it computes: out[n, k] = dequant(q[n, k]) for the formulas in dqgemm.h (ZeroMode).
// It serves two purposes: QuantizedWeight.dequantize() on the GPU, and the large-M path
// "dequantize, then cuBLAS" (python/dqgemm/kernels/cuda_dequant.py), where the extra pass
// costs bytes(read packed) + bytes(write fp16) at copy bandwidth.
//
// Layouts: qdata uint8 [N, row_bytes], codes along K, 4-bit low nibble first (format.py).
//          scales [N, G] in fp16/bf16/fp32; zeros/offsets fp32 [N, G]; g_idx int32 [K].
//          out row-major [N, K].
// Work split, three paths picked by the launcher:
//   chunk16: one thread turns one 16-byte load (32 INT4 / 16 INT8 codes) into 16-byte stores;
//            needs no g_idx, K % 32 == 0 (INT4) or K % 16 == 0 (INT8), 16-byte aligned rows.
//   vec8:    one thread makes 8 outputs (one 16-byte store) from a 4- or 8-byte load; K % 8 == 0.
//   scalar:  one element per thread, anything else (odd K).
// A chunk shares one group because group sizes are multiples of 32 (or K itself); with g_idx
// each element looks its group up (vec8 / scalar paths).
// Test: tests/test_cuda.py (GPU only). Benchmark: python -m dqgemm bench --backends cuda.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dqgemm.h"

namespace dqgemm {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct GroupTerms {
  float scale;
  float sub;   // subtracted from q before scaling (symmetric / zero point)
  float add;   // added after scaling (offset mode)
};

template <typename ScaleT>
__device__ __forceinline__ GroupTerms group_terms(const DequantParams& p, int64_t n, int64_t g) {
  const int64_t idx = n * p.num_groups + g;
  GroupTerms t;
  t.scale = to_float(static_cast<const ScaleT*>(p.scales)[idx]);
  t.sub = 0.f;
  t.add = 0.f;
  if (p.zero_mode == ZeroMode::kSymmetric) {
    t.sub = static_cast<float>(1 << (p.bits - 1));
  } else if (p.zero_mode == ZeroMode::kZeroPoint) {
    t.sub = p.zeros[idx];
  } else {
    t.add = p.zeros[idx];
  }
  return t;
}

__device__ __forceinline__ int64_t group_of(const DequantParams& p, int64_t k) {
  return p.g_idx != nullptr ? static_cast<int64_t>(p.g_idx[k]) : k / p.group_size;
}

__device__ __forceinline__ float apply(const GroupTerms& t, unsigned q) {
  return (static_cast<float>(q) - t.sub) * t.scale + t.add;
}

// Eight codes starting at an 8-aligned k, as one 64-bit word of bytes (8-bit) or one
// 32-bit word of nibbles (4-bit), unpacked into q[0..7].
template <int kBits>
__device__ __forceinline__ void load_codes8(const DequantParams& p, int64_t n, int64_t k,
                                            unsigned (&q)[8]) {
  const uint8_t* row = static_cast<const uint8_t*>(p.qdata) + n * p.row_bytes;
  if constexpr (kBits == 4) {
    // ld.global.nc: the packed weight is read once and never written by this kernel.
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(row + k / 2));
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = (word >> (4 * i)) & 0xFu;
  } else {
    const uint2 words = __ldg(reinterpret_cast<const uint2*>(row + k));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = (words.x >> (8 * i)) & 0xFFu;
      q[i + 4] = (words.y >> (8 * i)) & 0xFFu;
    }
  }
}

template <typename ScaleT, typename OutT, int kBits>
__global__ void dequantize_vec8_kernel(DequantParams p) {
  const int64_t vecs_per_row = p.k / 8;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= p.n * vecs_per_row) return;
  const int64_t n = v / vecs_per_row;
  const int64_t k = (v - n * vecs_per_row) * 8;

  unsigned q[8];
  load_codes8<kBits>(p, n, k, q);

  alignas(16) OutT vals[8];
  if (p.g_idx == nullptr) {
    const GroupTerms t = group_terms<ScaleT>(p, n, k / p.group_size);
#pragma unroll
    for (int i = 0; i < 8; ++i) vals[i] = from_float<OutT>(apply(t, q[i]));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const GroupTerms t = group_terms<ScaleT>(p, n, group_of(p, k + i));
      vals[i] = from_float<OutT>(apply(t, q[i]));
    }
  }
  OutT* out = static_cast<OutT*>(p.out) + n * p.k + k;
  *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(vals);
}

// The fast path: one thread turns one 16-byte load (32 INT4 or 16 INT8 codes) into 4 or 2
// 16-byte stores. Bigger chunks per thread keep more bytes in flight per instruction issued,
// which is what lifts this pass towards copy bandwidth. 32-bit index math: the launcher only
// takes this path when the number of chunks fits in 31 bits.
template <typename ScaleT, typename OutT, int kBits>
__global__ void __launch_bounds__(256) dequantize_chunk16_kernel(DequantParams p) {
  constexpr int kCodes = 16 * 8 / kBits;  // codes per 16-byte chunk
  const unsigned chunks_per_row = static_cast<unsigned>(p.row_bytes / 16);
  const unsigned chunk = blockIdx.x * blockDim.x + threadIdx.x;
  if (chunk >= static_cast<unsigned>(p.n) * chunks_per_row) return;
  const unsigned n = chunk / chunks_per_row;
  const unsigned k0 = (chunk - n * chunks_per_row) * kCodes;

  const uint8_t* src = static_cast<const uint8_t*>(p.qdata) + static_cast<int64_t>(n) * p.row_bytes;
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + (chunk - n * chunks_per_row));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  // Group sizes are multiples of 32 (or K itself), so a chunk never straddles two groups.
  const GroupTerms t = group_terms<ScaleT>(p, n, k0 / p.group_size);
  OutT* dst = static_cast<OutT*>(p.out) + static_cast<int64_t>(n) * p.k + k0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    alignas(16) OutT vals[32 / kBits];
#pragma unroll
    for (int i = 0; i < 32 / kBits; ++i) {
      vals[i] = from_float<OutT>(apply(t, (words[w] >> (kBits * i)) & ((1u << kBits) - 1u)));
    }
    if constexpr (kBits == 4) {
      reinterpret_cast<uint4*>(dst)[w] = *reinterpret_cast<const uint4*>(vals);
    } else {
      reinterpret_cast<uint2*>(dst)[w] = *reinterpret_cast<const uint2*>(vals);
    }
  }
}

template <typename ScaleT, typename OutT, int kBits>
__global__ void dequantize_scalar_kernel(DequantParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.n * p.k) return;
  const int64_t n = e / p.k;
  const int64_t k = e - n * p.k;
  const uint8_t* row = static_cast<const uint8_t*>(p.qdata) + n * p.row_bytes;
  unsigned q;
  if constexpr (kBits == 4) {
    q = (row[k / 2] >> (4 * (k & 1))) & 0xFu;
  } else {
    q = row[k];
  }
  const GroupTerms t = group_terms<ScaleT>(p, n, group_of(p, k));
  static_cast<OutT*>(p.out)[e] = from_float<OutT>(apply(t, q));
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename ScaleT, typename OutT, int kBits>
cudaError_t launch_typed(const DequantParams& p) {
  constexpr int kThreads = 256;
  const uintptr_t q_addr = reinterpret_cast<uintptr_t>(p.qdata);
  const int64_t chunks = p.n * (p.row_bytes / 16);
  const bool chunk16 = p.g_idx == nullptr && p.k % (16 * 8 / kBits) == 0 &&
                       p.row_bytes % 16 == 0 && (q_addr & 15u) == 0 && aligned16(p.out) &&
                       chunks < 0x7FFFFFFF;
  const bool vec = p.k % 8 == 0 && aligned16(p.out) && (p.row_bytes % (kBits == 4 ? 4 : 8)) == 0 &&
                   (q_addr & (kBits == 4 ? 3u : 7u)) == 0;
  const int64_t items = chunk16 ? chunks : vec ? p.n * (p.k / 8) : p.n * p.k;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (chunk16) {
    dequantize_chunk16_kernel<ScaleT, OutT, kBits><<<grid, kThreads, 0, p.stream>>>(p);
  } else if (vec) {
    dequantize_vec8_kernel<ScaleT, OutT, kBits><<<grid, kThreads, 0, p.stream>>>(p);
  } else {
    dequantize_scalar_kernel<ScaleT, OutT, kBits><<<grid, kThreads, 0, p.stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename ScaleT, typename OutT>
cudaError_t launch_bits(const DequantParams& p) {
  return p.bits == 4 ? launch_typed<ScaleT, OutT, 4>(p) : launch_typed<ScaleT, OutT, 8>(p);
}

template <typename OutT>
cudaError_t launch_scale(const DequantParams& p) {
  switch (p.scale_dtype) {
    case DType::kFloat16: return launch_bits<__half, OutT>(p);
    case DType::kBFloat16: return launch_bits<__nv_bfloat16, OutT>(p);
    case DType::kFloat32: return launch_bits<float, OutT>(p);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_dequantize(const DequantParams& p) {
  if (p.n == 0 || p.k == 0) return cudaSuccess;
  if ((p.bits != 4 && p.bits != 8) || p.group_size <= 0 || p.num_groups <= 0) {
    return cudaErrorInvalidValue;
  }
  switch (p.out_dtype) {
    case DType::kFloat16: return launch_scale<__half>(p);
    case DType::kBFloat16: return launch_scale<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dqgemm
