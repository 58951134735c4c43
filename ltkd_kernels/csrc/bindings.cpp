// Python bindings of the C++ CPU backend (built by ltkd_kernels/cpu/__init__.py).
#include <torch/extension.h>

#include <algorithm>

#include "ltkd_cpu.h"
#include "simd.h"

namespace ltkd {

std::string build_info() {
  std::string info;
#if defined(CPU_CAPABILITY_AVX512)
  info = "simd=avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  info = "simd=at::vec(avx2)";
#else
  info = "simd=at::vec(default)";
#endif
  info += " lanes=" + std::to_string(simd::kWidth);
#if defined(_OPENMP)
  info += " openmp=yes";
#else
  info += " openmp=no";
#endif
  return info;
}

// simd::exp applied to a float32 tensor, for the accuracy test (the tail past a multiple of
// the lane count goes through a padded vector too).
at::Tensor vector_exp(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be CPU float32");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const float* src = input.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = input.numel();
  for (int64_t i = 0; i < n; i += simd::kWidth) {
    alignas(64) float lanes[simd::kWidth] = {0.0f};
    const int64_t count = std::min<int64_t>(simd::kWidth, n - i);
    std::copy(src + i, src + i + count, lanes);
    simd::store(lanes, simd::exp(simd::load(lanes)));
    std::copy(lanes, lanes + count, dst + i);
  }
  return out;
}

}  // namespace ltkd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltkd_kernels C++ CPU kernels: grouped KL (LTKD, KD, DKD, BKD) and SRW";
  // The kernels touch no Python object: other Python threads run while they do.
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("grouped_kl_stats", &ltkd::grouped_kl_stats, release_gil(),
        "Per-row group log-sum-exps, within-group KLs and cross-entropy in one read");
  m.def("grouped_kl_grad", &ltkd::grouped_kl_grad, release_gil(),
        "Gradient of the grouped KL with respect to the student logits");
  m.def("srw_weights", &ltkd::srw_weights, release_gil(),
        "SRW weights (B, P) from features (B, P, D)");
  m.def("build_info", &ltkd::build_info, "How the extension was compiled");
  m.def("vector_exp", &ltkd::vector_exp, "The kernels' vectorised exp (for testing)");
}
