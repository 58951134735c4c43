// Python bindings of the C++ CPU backend (built by ltkd_kernels/cpu/__init__.py).
#include <torch/extension.h>

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

}  // namespace ltkd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ltkd_kernels C++ CPU kernels: grouped KL (LTKD, KD, DKD, BKD) and SRW";
  m.def("grouped_kl_stats", &ltkd::grouped_kl_stats,
        "Per-row group log-sum-exps, within-group KLs and cross-entropy in one read");
  m.def("grouped_kl_grad", &ltkd::grouped_kl_grad,
        "Gradient of the grouped KL with respect to the student logits");
  m.def("srw_weights", &ltkd::srw_weights, "SRW weights (B, P) from features (B, P, D)");
  m.def("build_info", &ltkd::build_info, "How the extension was compiled");
}
