// Entry points of the C++ CPU backend (bound to Python in bindings.cpp).
//
// The grouped-KL pair has the argument list of the ``grouped_kl_stats`` / ``grouped_kl_grad``
// operators documented in ltkd_kernels/grouped_kl.py, shared with the Triton launchers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ltkd {

// Returns (lse_student, lse_teacher, within_kl, ce, lse_raw); see grouped_kl.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_kl_stats(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& group_target,
    const std::optional<at::Tensor>& teacher_log_weight,
    const std::optional<at::Tensor>& ce_target, const std::optional<at::Tensor>& row_valid,
    int64_t num_groups, double temperature);

// Returns the (N, V) gradient with respect to the student logits, in their dtype.
at::Tensor grouped_kl_grad(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& group_target,
    const std::optional<at::Tensor>& teacher_log_weight,
    const std::optional<at::Tensor>& ce_target, const std::optional<at::Tensor>& row_valid,
    int64_t num_groups, double temperature, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, const at::Tensor& coef_student, const at::Tensor& coef_teacher,
    const at::Tensor& lse_raw, const at::Tensor& grad_ce);

// SRW weights (B, P) float32 from features (B, P, D); see srw.cpp.
at::Tensor srw_weights(const at::Tensor& features, const std::optional<at::Tensor>& mask,
                       double tau, double eps);

// How this build was compiled: SIMD path, lane count, OpenMP.
std::string build_info();

}  // namespace ltkd
