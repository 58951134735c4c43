// Per-row arithmetic of the finish (docs/design.md, "Op 2"), in float64 and log space, shared by
// the finish (row losses, batch partials) and the gradient (its per-row coefficients). Every
// function follows ltkd_kernels/ops/grouped_kl_torch.py, NaN / inf conventions included.
//
// Rows are taken in blocks: the block's (rows x G) values are laid out flat and their exps and
// logs computed by ATen's vectorised float64 functions (SLEEF, 1 ulp), element by element, so a
// row's results do not depend on the block it falls in.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <memory>
#include <vector>

#include "grouped_kl.h"

namespace ltkd {
namespace gkl {

// The reference point of a group: its maximum, or 0 while it has no finite logit.
inline double ref(double m) { return m == -kInf ? 0.0 : m; }

// max that propagates NaN (as torch.amax / torch.maximum).
inline double nan_max(double a, double b) {
  if (a != a || b != b) return std::numeric_limits<double>::quiet_NaN();
  return a > b ? a : b;
}

// torch.logsumexp over n values: -inf when all are -inf, +inf with an +inf, NaN with a NaN.
inline double logsumexp(const double* x, int n) {
  double top = -kInf;
  for (int i = 0; i < n; ++i) top = nan_max(top, x[i]);
  if (top != top) return top;
  if (top == -kInf || top == kInf) return top;
  double total = 0.0;
  for (int i = 0; i < n; ++i) total += std::exp(x[i] - top);
  return top + std::log(total);
}

// log(1 - exp(x)) for x <= 0 (clamped), accurate at both ends.
inline double log1mexp(double x) {
  if (x > 0.0) x = 0.0;  // clamp(max=0), NaN kept
  return x > -0.6931471805599453 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// log(numerator / denominator) of two positive sums: log1p of their relative difference when
// they are close (ratio in [1/2, 2]), the difference of their logarithms otherwise.
inline double log_ratio(double numerator, double denominator, double log_numerator,
                        double log_denominator) {
  if (numerator >= 0.5 * denominator && numerator <= 2.0 * denominator) {
    return std::log1p((numerator - denominator) / denominator);
  }
  return log_numerator - log_denominator;
}
inline double log_ratio(double numerator, double denominator) {
  if (numerator >= 0.5 * denominator && numerator <= 2.0 * denominator) {
    return std::log1p((numerator - denominator) / denominator);
  }
  return std::log(numerator) - std::log(denominator);
}

// KL(pt^T_k || pt^S_k) = g_k / s^T_k + log(s^S_k / s^T_k): 0 for a massless teacher group,
// +inf where the student group has no mass but the teacher's has.
inline double within_kl(double s_s, double s_t, double g, double log_s_s, double log_s_t) {
  if (s_t == 0.0) return 0.0;
  if (s_s == 0.0 && s_t > 0.0) return kInf;
  return g / s_t + log_ratio(s_s, s_t, log_s_s, log_s_t);
}
inline double within_kl(double s_s, double s_t, double g) {
  if (s_t == 0.0) return 0.0;
  if (s_s == 0.0 && s_t > 0.0) return kInf;
  return g / s_t + log_ratio(s_s, s_t);
}

// q (log q - log p) with 0 log 0 = 0, +inf where p = 0 < q, NaN kept.
inline double kl_term(double log_q, double q, double log_p) {
  if (log_q == -kInf) return 0.0;
  if (log_p == -kInf && log_q > -kInf) return kInf;
  return q * (log_q - log_p);
}

// In place over n values: exp, log (vectorised float64).
inline void vector_exp(double* x, int64_t n) {
  using DVec = at::vec::Vectorized<double>;
  at::vec::map([](DVec v) { return v.exp(); }, x, x, n);
}
inline void vector_log(double* x, int64_t n) {
  using DVec = at::vec::Vectorized<double>;
  at::vec::map([](DVec v) { return v.log(); }, x, x, n);
}
inline void vector_log1p(double* x, int64_t n) {
  using DVec = at::vec::Vectorized<double>;
  at::vec::map([](DVec v) { return v.log1p(); }, x, x, n);
}

// A block of consecutive rows of the state and, per row and group, log s, log p and p of both
// models and the rebalanced log q, q (arrays of rows x G, row-major).
struct RowBlock {
  int G = 1;
  int64_t capacity = 0;  // rows
  int64_t count = 0;     // rows loaded
  int64_t first = 0;     // the first row's index
  std::unique_ptr<double[]> storage;  // uninitialised: every value is written before it is read
  double *m_s, *s_s, *m_t, *s_t, *g;
  double *ls_s, *lp_s, *p_s, *ls_t, *lp_t, *p_t, *lq, *q, *work, *ratio;
  double *row_a, *row_b;

  RowBlock(int groups, int64_t rows) : G(groups), capacity(rows) {
    const int64_t n = rows * groups;
    storage.reset(new double[static_cast<size_t>(15 * n + 2 * rows)]);
    double* p = storage.get();
    for (double** array : {&m_s, &s_s, &m_t, &s_t, &g, &ls_s, &lp_s, &p_s, &ls_t, &lp_t, &p_t,
                           &lq, &q, &work, &ratio}) {
      *array = p;
      p += n;
    }
    row_a = p;
    row_b = p + rows;
  }

  void load(const View& state, int64_t first_row, int64_t rows) {
    first = first_row;
    count = rows;
    if (state.dtype == at::kFloat) {  // the common case: no per-element dtype dispatch
      for (int64_t i = 0; i < rows; ++i) {
        const char* row = state.data + (first_row + i) * state.stride[0];
        double* slots[kSlots] = {m_s, s_s, m_t, s_t, g};
        for (int slot = 0; slot < kSlots; ++slot) {
          const char* at_slot = row + slot * state.stride[1];
          for (int k = 0; k < G; ++k) {
            slots[slot][i * G + k] = *reinterpret_cast<const float*>(at_slot + k * state.stride[2]);
          }
        }
      }
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      for (int k = 0; k < G; ++k) {
        const int64_t at = i * G + k;
        m_s[at] = state.real(first_row + i, 0, k);
        s_s[at] = state.real(first_row + i, 1, k);
        m_t[at] = state.real(first_row + i, 2, k);
        s_t[at] = state.real(first_row + i, 3, k);
        g[at] = state.real(first_row + i, 4, k);
      }
    }
  }

  // log(s^S / s^T) per row and group (log_ratio, its log1p vectorised); masses() done.
  void log_ratios() {
    const int64_t n = count * G;
    for (int64_t at = 0; at < n; ++at) {
      const bool close = s_s[at] >= 0.5 * s_t[at] && s_s[at] <= 2.0 * s_t[at];
      ratio[at] = close ? (s_s[at] - s_t[at]) / s_t[at] : 0.0;
    }
    vector_log1p(ratio, n);
    for (int64_t at = 0; at < n; ++at) {
      const bool close = s_s[at] >= 0.5 * s_t[at] && s_s[at] <= 2.0 * s_t[at];
      if (!close) ratio[at] = ls_s[at] - ls_t[at];
    }
  }

  // One model's masses: log s, log p = lse_k - logsumexp_j lse_j (maxima and sums kept apart),
  // p. G = 1: p = s / s (1, or NaN for a row with no finite logit or a NaN / inf sum).
  void group_mass(const double* m, const double* s, double* log_s, double* log_p, double* p) {
    const int64_t n = count * G;
    std::copy(s, s + n, log_s);
    vector_log(log_s, n);
    if (G == 1) {
      for (int64_t i = 0; i < count; ++i) p[i] = s[i] / s[i];
      std::copy(p, p + count, log_p);
      vector_log(log_p, count);
      return;
    }
    for (int64_t i = 0; i < count; ++i) {
      double top = -kInf;
      for (int k = 0; k < G; ++k) {
        const int64_t at = i * G + k;
        top = nan_max(top, s[at] != 0.0 ? ref(m[at]) : -kInf);
      }
      top = ref(top);
      for (int k = 0; k < G; ++k) work[i * G + k] = ref(m[i * G + k]) - top;
    }
    std::copy(work, work + n, p);
    vector_exp(p, n);
    for (int64_t i = 0; i < count; ++i) {
      double total = 0.0;
      for (int k = 0; k < G; ++k) {
        const int64_t at = i * G + k;
        p[at] = s[at] != 0.0 ? s[at] * p[at] : 0.0;
        total += p[at];
      }
      row_a[i] = total;
      row_b[i] = total;
    }
    vector_log(row_b, count);
    for (int64_t i = 0; i < count; ++i) {
      const double inverse = 1.0 / row_a[i];
      for (int k = 0; k < G; ++k) {
        const int64_t at = i * G + k;
        log_p[at] = work[at] + log_s[at] - row_b[i];
        p[at] *= inverse;
      }
    }
  }

  // Both models' masses (BUCKET: over [top-k, rest]); `student` false: the teacher's only.
  void masses(const Options& opt, const View& group_logmass, bool student = true) {
    const int64_t n = count * G;
    if (opt.topk_rule == kTopkBucket) {
      // The student's masses as for any two groups; the teacher's top mass is its entries' own
      // log-sum, its rest mass log r^T is stored in group 1's m^T slot.
      if (student) group_mass(m_s, s_s, ls_s, lp_s, p_s);
      std::copy(s_t, s_t + n, ls_t);
      vector_log(ls_t, n);
      for (int64_t i = 0; i < count; ++i) {
        lp_t[2 * i] = ref(m_t[2 * i]) + ls_t[2 * i];
        lp_t[2 * i + 1] = m_t[2 * i + 1];
      }
      std::copy(lp_t, lp_t + n, p_t);
      vector_exp(p_t, n);
      return;
    }
    if (student) group_mass(m_s, s_s, ls_s, lp_s, p_s);
    if (group_logmass.present) {
      std::copy(s_t, s_t + n, ls_t);
      vector_log(ls_t, n);
      for (int64_t i = 0; i < count; ++i) {
        for (int k = 0; k < G; ++k) lp_t[i * G + k] = group_logmass.real(first + i, k);
      }
      std::copy(lp_t, lp_t + n, p_t);
      vector_exp(p_t, n);
    } else {
      group_mass(m_t, s_t, ls_t, lp_t, p_t);
    }
  }

  // log q_k and q_k: the rebalanced teacher group distribution (p^T without rebalancing).
  void rebalanced(const Options& opt, const double* log_scale) {
    const int64_t n = count * G;
    if (!opt.rebalance) {
      std::copy(lp_t, lp_t + n, lq);
      std::copy(p_t, p_t + n, q);
      return;
    }
    for (int64_t i = 0; i < count; ++i) {
      double top = -kInf;
      for (int k = 0; k < G; ++k) {
        lq[i * G + k] = log_scale[k] + lp_t[i * G + k];
        top = nan_max(top, lq[i * G + k]);
      }
      row_a[i] = top;
      // A row with no finite top (all -inf, an +inf or a NaN) is finished below as torch does.
      const double shift = std::isfinite(top) ? top : 0.0;
      for (int k = 0; k < G; ++k) q[i * G + k] = lq[i * G + k] - shift;
    }
    vector_exp(q, n);
    for (int64_t i = 0; i < count; ++i) {
      double total = 0.0;
      for (int k = 0; k < G; ++k) total += q[i * G + k];
      row_b[i] = total;
      work[i] = total;
    }
    vector_log(work, count);
    for (int64_t i = 0; i < count; ++i) {
      double* lq_row = lq + i * G;
      double* q_row = q + i * G;
      if (std::isfinite(row_a[i])) {
        const double lse = row_a[i] + work[i];
        for (int k = 0; k < G; ++k) {
          lq_row[k] -= lse;
          q_row[k] /= row_b[i];
        }
      } else {
        const double lse = logsumexp(lq_row, G);  // -inf, +inf or NaN: as torch
        for (int k = 0; k < G; ++k) {
          lq_row[k] -= lse;
          q_row[k] = std::exp(lq_row[k]);
        }
      }
    }
  }

  // KL(pt^T_k || pt^S_k) of local row i; log_ratios() done.
  double within(int64_t i, int k) const {
    const int64_t at = i * G + k;
    if (s_t[at] == 0.0) return 0.0;
    if (s_s[at] == 0.0 && s_t[at] > 0.0) return kInf;
    return g[at] / s_t[at] + ratio[at];
  }

  // row_r = kl_r + ce_weight ce_r of local row i (valid or not); masses(), log_ratios() and,
  // for G > 1, rebalanced() done.
  double row_loss(const Options& opt, bool has_target, const View& extras,
                  const View& group_logmass, int64_t i) const {
    const double T2 = opt.temperature * opt.temperature;
    const int64_t base = i * G;
    double kl;
    if (opt.topk_rule == kTopkBucket) {
      const double cross = kl_term(lp_t[base], p_t[base], lp_s[base]) +
                           kl_term(lp_t[base + 1], p_t[base + 1], lp_s[base + 1]);
      kl = cross + p_t[base] * within(i, 0);
    } else if (G == 1 && !group_logmass.present) {
      // One group: both masses are 1 (log 0 added, or NaN for a row with no distribution).
      kl = T2 * opt.beta * within(i, 0) + (lp_s[base] + lp_t[base]);
    } else {
      double cross = 0.0, within_sum = 0.0;
      for (int k = 0; k < G; ++k) {
        cross += kl_term(lq[base + k], q[base + k], lp_s[base + k]);
        within_sum += (opt.within_teacher ? p_t[base + k] : 1.0) * within(i, k);
      }
      kl = T2 * (opt.alpha * cross + opt.beta * within_sum);
    }
    const int64_t row = first + i;
    if (has_target && !(extras.real(row, 3) == 1.0)) {
      kl = std::numeric_limits<double>::quiet_NaN();  // the target is no class of the vocabulary
    }
    if (opt.with_ce()) {
      const double ce = ref(extras.real(row, 0)) + std::log(extras.real(row, 1)) -
                        extras.real(row, 2);
      kl += opt.ce_weight * ce;
    }
    return kl;
  }
};

// Rows per block (a function of G only: the blocks fix the finish's summation order).
inline int64_t block_rows(int G) { return std::clamp<int64_t>(4096 / std::max(G, 1), 1, 256); }

}  // namespace gkl
}  // namespace ltkd
