// Python bindings of the C++ CPU backend (built by ltkd_kernels/cpu/__init__.py).
//
// The grouped-KL functions take their options as the GroupedKLConfig NamedTuple (a tuple of
// its 15 fields in order; ltkd_kernels/cpu/grouped_kl.py checks the field names once), read
// with the GIL held; the kernels then run with the GIL released.
#include <torch/extension.h>

#include <algorithm>

#include "gradient_cache.h"
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
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += simd::kWidth) {
    alignas(64) float lanes[simd::kWidth] = {0.0f};
    const int64_t count = std::min<int64_t>(simd::kWidth, n - i);
    std::copy(src + i, src + i + count, lanes);
    simd::store(lanes, simd::exp(simd::load(lanes)));
    std::copy(lanes, lanes + count, dst + i);
  }
  return out;
}

namespace {

constexpr size_t kConfigFields = 15;

gkl::Options parse_config(const py::tuple& cfg) {
  TORCH_CHECK_VALUE(cfg.size() == kConfigFields, "cfg must be a GroupedKLConfig (",
                    kConfigFields, " fields), got ", cfg.size(), " values");
  gkl::Options o;
  o.num_groups = cfg[0].cast<int64_t>();
  o.temperature = cfg[1].cast<double>();
  o.alpha = cfg[2].cast<double>();
  o.beta = cfg[3].cast<double>();
  o.rebalance = cfg[4].cast<bool>();
  o.within_teacher = cfg[5].cast<bool>();
  o.ce_weight = cfg[6].cast<double>();
  o.reduction = cfg[7].cast<int64_t>();
  o.group_rule = cfg[8].cast<int64_t>();
  o.topk_rule = cfg[9].cast<int64_t>();
  o.vocab_offset = cfg[10].cast<int64_t>();
  o.vocab_total = cfg[11].cast<int64_t>();
  o.ignore_index = cfg[12].cast<int64_t>();
  o.num_items = cfg[13].cast<double>();
  o.denominator_from_partials = cfg[14].cast<bool>();
  return o;
}

using OptTensor = std::optional<at::Tensor>;

}  // namespace
}  // namespace ltkd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace ltkd;
  m.doc() = "ltkd_kernels C++ CPU kernels: the grouped-KL operators (states, finish, grad) and SRW";
  m.def(
      "grouped_kl_states",
      [](const OptTensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
         const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
         const OptTensor& class_weight, const OptTensor& mask, const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_states(student, teacher, topk_indices, topk_logprobs, groups, target,
                                 class_weight, mask, opt);
      },
      "Op 1: (state (N, 5, G), extras (N, 4))");
  m.def(
      "grouped_kl_finish",
      [](const at::Tensor& state, const at::Tensor& extras, const OptTensor& mask,
         const OptTensor& target, const OptTensor& sample_weight, const OptTensor& group_logmass,
         const OptTensor& batch_partials, const OptTensor& num_items, const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_finish(state, extras, mask, target, sample_weight, group_logmass,
                                 batch_partials, num_items, opt);
      },
      "Op 2: (loss, saved (G + 1,))");
  m.def(
      "grouped_kl_partial",
      [](const at::Tensor& state, const at::Tensor& extras, const OptTensor& mask,
         const OptTensor& target, const OptTensor& sample_weight, const OptTensor& group_logmass,
         const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_partial(state, extras, mask, target, sample_weight, group_logmass, opt);
      },
      "Op 2 with partial_only: the batch partial (2G + 2,)");
  m.def(
      "grouped_kl_loss_forward",
      [](const OptTensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
         const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
         const OptTensor& class_weight, const OptTensor& mask, const OptTensor& sample_weight,
         const OptTensor& group_logmass, const OptTensor& num_items, const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_loss_forward(student, teacher, topk_indices, topk_logprobs, groups,
                                       target, class_weight, mask, sample_weight, group_logmass,
                                       num_items, opt);
      },
      "Ops 1 + 2 in one call: (loss, state, extras, saved)");
  m.def(
      "grouped_kl_grad",
      [](const at::Tensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
         const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
         const OptTensor& class_weight, const OptTensor& mask, const OptTensor& sample_weight,
         const OptTensor& group_logmass, const at::Tensor& state, const at::Tensor& extras,
         const at::Tensor& saved, const at::Tensor& grad_loss, const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_grad(student, teacher, topk_indices, topk_logprobs, groups, target,
                               class_weight, mask, sample_weight, group_logmass, state, extras,
                               saved, grad_loss, opt);
      },
      "Op 3: the gradient with respect to the student logits");
  m.def(
      "grouped_kl_loss_forward_grad",
      [](const at::Tensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
         const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
         const OptTensor& class_weight, const OptTensor& mask, const OptTensor& sample_weight,
         const OptTensor& group_logmass, const OptTensor& num_items, const py::tuple& cfg) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_loss_forward_grad(student, teacher, topk_indices, topk_logprobs, groups,
                                            target, class_weight, mask, sample_weight,
                                            group_logmass, num_items, opt);
      },
      "Ops 1 + 2 + 3 (upstream 1) in one pass: (loss, state, extras, saved, grad or None)");
  m.def(
      "grouped_kl_loss_autograd",
      [](const at::Tensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
         const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
         const OptTensor& class_weight, const OptTensor& mask, const OptTensor& sample_weight,
         const OptTensor& group_logmass, const OptTensor& num_items, const py::tuple& cfg,
         bool fused) {
        const gkl::Options opt = parse_config(cfg);
        py::gil_scoped_release release;
        return grouped_kl_loss_autograd(student, teacher, topk_indices, topk_logprobs, groups,
                                        target, class_weight, mask, sample_weight, group_logmass,
                                        num_items, opt, fused);
      },
      "The loss with a C++ autograd node: forward ops 1 + 2 (+ 3 when fused), backward op 3");
  m.def("grouped_kl_backward_calls", &ltkd::grouped_kl_backward_calls,
        "(scale_grad, grad) calls of the C++ backward node since the process started");
  m.def("grouped_kl_scale_grad", &ltkd::grouped_kl_scale_grad,
        py::call_guard<py::gil_scoped_release>(),
        "grad *= grad_loss in place (one value or one per row); nothing for the value 1");
  m.def("set_force_scalar", &gkl::set_force_scalar,
        "Testing: run the scalar float64 kernels instead of the vectorised ones");
  m.def("force_scalar", &gkl::force_scalar, "Whether the scalar kernels are forced");
  // The SRW kernel touches no Python object: other Python threads run while it does.
  m.def("srw_weights", &ltkd::srw_weights, py::call_guard<py::gil_scoped_release>(),
        "SRW weights (B, P) from features (B, P, D)");
  m.def(
      "gradient_cache_info",
      []() {
        const GradientCacheInfo info = gradient_cache_info();
        return py::dict(py::arg("free_buffers") = info.free_buffers,
                        py::arg("free_bytes") = info.free_bytes,
                        py::arg("live_bytes") = info.live_bytes, py::arg("hits") = info.hits,
                        py::arg("misses") = info.misses, py::arg("limit") = info.limit,
                        py::arg("max_bytes") = info.max_bytes);
      },
      "The gradient cache's state (csrc/gradient_cache.h)");
  m.def("gradient_cache_release", &ltkd::gradient_cache_release,
        "Return the gradient cache's free buffers to the OS");
  m.def("gradient_cache_set_limit", &ltkd::gradient_cache_set_limit,
        "Keep at most this many free gradient buffers (0 turns the cache off) of at most "
        "max_bytes in all");
  m.def("build_info", &ltkd::build_info, "How the extension was compiled");
  m.def("vector_exp", &ltkd::vector_exp, "The kernels' vectorised exp (for testing)");
}
