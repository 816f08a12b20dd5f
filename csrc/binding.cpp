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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dqgemm CUDA kernels (raw pointers and streams; no torch types)";
  m.attr("COMPILED_ARCHS") = DQGEMM_COMPILED_ARCHS;
  m.def("dequantize", &dequantize, py::arg("qdata"), py::arg("scales"), py::arg("zeros"),
        py::arg("g_idx"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("row_bytes"),
        py::arg("num_groups"), py::arg("group_size"), py::arg("bits"), py::arg("scale_dtype"),
        py::arg("out_dtype"), py::arg("zero_mode"), py::arg("stream"),
        "Dequantize a kpack-v1 weight into a dense fp16/bf16 [N, K] buffer.");
  m.def("runtime_version", &runtime_version, "CUDA runtime version this module links.");
  m.def("device_count", &device_count, "Visible CUDA devices (raises if the driver fails).");
}
