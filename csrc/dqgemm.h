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
