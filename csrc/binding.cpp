// pybind11 module dqgemm._C: the only place Python meets the CUDA launchers.
//
// It links no libtorch (so it survives torch upgrades): functions take raw device
// pointers (Python ints from Tensor.data_ptr()), sizes and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream), fill a plain params struct and call the
// launcher. Tensor checks (dtype, shape, device, alignment) happen in Python before this.
// A CUDA error becomes a RuntimeError naming the launcher and the CUDA error string.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "dqgemm.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dqgemm.") + what + ": CUDA error " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

void dequantize(uintptr_t qdata, uintptr_t scales, uintptr_t zeros, uintptr_t g_idx,
                uintptr_t out, int64_t n, int64_t k, int64_t row_bytes, int64_t num_groups,
                int64_t group_size, int bits, int scale_dtype, int out_dtype, int zero_mode,
                uintptr_t stream) {
  dqgemm::DequantParams p;
  p.qdata = as_ptr<const void>(qdata);
  p.scales = as_ptr<const void>(scales);
  p.zeros = as_ptr<const float>(zeros);
  p.g_idx = as_ptr<const int32_t>(g_idx);
  p.out = as_ptr<void>(out);
  p.n = n;
  p.k = k;
  p.row_bytes = row_bytes;
  p.num_groups = num_groups;
  p.group_size = group_size;
  p.bits = bits;
  p.scale_dtype = static_cast<dqgemm::DType>(scale_dtype);
  p.out_dtype = static_cast<dqgemm::DType>(out_dtype);
  p.zero_mode = static_cast<dqgemm::ZeroMode>(zero_mode);
  p.stream = as_ptr<CUstream_st>(stream);
  check(dqgemm::launch_dequantize(p), "dequantize");
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "runtime_version");
  return v;
}

// Number of visible devices, or a RuntimeError with the driver's reason (for example
// "CUDA driver version is insufficient" on a machine with no GPU driver).
int device_count() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "device_count");
  return count;
}

// Decode GEMM (csrc/decode_gemm.cu). Pointers and sizes as documented in dqgemm.h
// (DecodeGemmParams); the Python wrapper (kernels/cuda_decode.py) checks the tensors.
void decode_gemm(uintptr_t x, uintptr_t weight, uintptr_t scales, uintptr_t zo, uintptr_t bias,
                 uintptr_t y, uintptr_t workspace, uintptr_t counters, int64_t m, int64_t n,
                 int64_t k, int64_t n_pad, int64_t k_pad, int64_t groups_padded,
                 int group_size_log2, int bits, int dtype, int zero_mode, int blocks_per_sm,
                 bool producer_warp, bool programmatic_launch, int grid, uintptr_t stream) {
  dqgemm::DecodeGemmParams p;
  p.x = as_ptr<const void>(x);
  p.weight = as_ptr<const void>(weight);
  p.scales = as_ptr<const void>(scales);
  p.zo = as_ptr<const void>(zo);
  p.bias = as_ptr<const void>(bias);
  p.y = as_ptr<void>(y);
  p.workspace = as_ptr<float>(workspace);
  p.counters = as_ptr<int32_t>(counters);
  p.m = m;
  p.n = n;
  p.k = k;
  p.n_pad = n_pad;
  p.k_pad = k_pad;
  p.groups_padded = groups_padded;
  p.group_size_log2 = group_size_log2;
  p.bits = bits;
  p.dtype = static_cast<dqgemm::DType>(dtype);
  p.zero_mode = static_cast<dqgemm::ZeroMode>(zero_mode);
  p.blocks_per_sm = blocks_per_sm;
  p.producer_warp = producer_warp;
  p.programmatic_launch = programmatic_launch;
  p.grid = grid;
  p.stream = as_ptr<CUstream_st>(stream);
  check(dqgemm::launch_decode_gemm(p), "decode_gemm");
}

// Prefill GEMM (csrc/prefill_gemm.cu), on the same packed weight as decode_gemm; the
// Python wrapper (kernels/cuda_prefill.py) checks the tensors and picks m_tile / k_splits.
void prefill_gemm(uintptr_t x, uintptr_t weight, uintptr_t scales, uintptr_t zo,
                  uintptr_t bias, uintptr_t y, uintptr_t workspace, uintptr_t counters,
                  int64_t m, int64_t n, int64_t k, int64_t n_pad, int64_t k_pad,
                  int64_t groups_padded, int group_size_log2, int bits, int dtype,
                  int zero_mode, int m_tile, int n_tile, int k_splits, bool warp_specialized,
                  int stream_k_blocks, uintptr_t stream) {
  dqgemm::PrefillGemmParams p;
  p.x = as_ptr<const void>(x);
  p.weight = as_ptr<const void>(weight);
  p.scales = as_ptr<const void>(scales);
  p.zo = as_ptr<const void>(zo);
  p.bias = as_ptr<const void>(bias);
  p.y = as_ptr<void>(y);
  p.workspace = as_ptr<float>(workspace);
  p.counters = as_ptr<int32_t>(counters);
  p.m = m;
  p.n = n;
  p.k = k;
  p.n_pad = n_pad;
  p.k_pad = k_pad;
  p.groups_padded = groups_padded;
  p.group_size_log2 = group_size_log2;
  p.bits = bits;
  p.dtype = static_cast<dqgemm::DType>(dtype);
  p.zero_mode = static_cast<dqgemm::ZeroMode>(zero_mode);
  p.m_tile = m_tile;
  p.n_tile = n_tile;
  p.k_splits = k_splits;
  p.warp_specialized = warp_specialized;
  p.stream_k_blocks = stream_k_blocks;
  p.stream = as_ptr<CUstream_st>(stream);
  check(dqgemm::launch_prefill_gemm(p), "prefill_gemm");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dqgemm CUDA kernels (raw pointers and streams; no torch types)";
  m.attr("COMPILED_ARCHS") = DQGEMM_COMPILED_ARCHS;
  m.def("dequantize", &dequantize, py::arg("qdata"), py::arg("scales"), py::arg("zeros"),
        py::arg("g_idx"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("row_bytes"),
        py::arg("num_groups"), py::arg("group_size"), py::arg("bits"), py::arg("scale_dtype"),
        py::arg("out_dtype"), py::arg("zero_mode"), py::arg("stream"),
        "Dequantize a kpack-v1 weight into a dense fp16/bf16 [N, K] buffer.");
  m.def("decode_gemm", &decode_gemm, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("zo"), py::arg("bias"), py::arg("y"), py::arg("workspace"), py::arg("counters"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("n_pad"), py::arg("k_pad"),
        py::arg("groups_padded"), py::arg("group_size_log2"), py::arg("bits"), py::arg("dtype"),
        py::arg("zero_mode"), py::arg("blocks_per_sm"), py::arg("producer_warp"),
        py::arg("programmatic_launch"), py::arg("grid"), py::arg("stream"),
        "Decode GEMM (M <= 64) on a cuda_decode-packed weight; see csrc/decode_gemm.cuh.");
  m.def("decode_gemm_m_tile", &dqgemm::decode_gemm_m_tile, py::arg("m"),
        "Token tile (8/16/32/64) the decode GEMM uses for M (0 if M is out of range).");
  m.def("decode_gemm_stage_k", &dqgemm::decode_gemm_stage_k, py::arg("m"), py::arg("bits"),
        "k per pipeline stage of the decode GEMM configuration used for M and bits.");
  m.def("prefill_gemm", &prefill_gemm, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("zo"), py::arg("bias"), py::arg("y"), py::arg("workspace"), py::arg("counters"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("n_pad"), py::arg("k_pad"),
        py::arg("groups_padded"), py::arg("group_size_log2"), py::arg("bits"), py::arg("dtype"),
        py::arg("zero_mode"), py::arg("m_tile"), py::arg("n_tile"), py::arg("k_splits"),
        py::arg("warp_specialized"), py::arg("stream_k_blocks"), py::arg("stream"),
        "Prefill GEMM (sm_90a wgmma, any M) on a cuda_decode-packed weight; see "
        "csrc/prefill_gemm.cu.");
  m.def("runtime_version", &runtime_version, "CUDA runtime version this module links.");
  m.def("device_count", &device_count, "Visible CUDA devices (raises if the driver fails).");
}
