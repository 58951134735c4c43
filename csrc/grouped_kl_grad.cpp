// Op 3 of docs/design.md, `grad`: one more read of each row and one write of
//
//   d row / d x_i = u { T (cross_k pt^S_i + within_k (pt^S_i - pt^T_i))
//                       + ce_weight (softmax(x)_i - [i = t]) }
//
// (the within part as a difference of probabilities, exact where they agree). The maximum and
// the sum are kept apart: pt^S_i = exp(b_i - ref(m^S_k)) / s^S_k, the 1 / s folded into the
// per-group coefficients (a float32 log-sum-exp m + log s would round the arg-max's pt to
// exactly 1 at |z / T| ~ 700), so that per class and model it is one subtraction and one exp:
//
//   out_i = e^S_i A_k + (e^S_i B_k - e^T_i C_k),   e = exp(value - ref(m_k)),
//   A = u T cross / s^S,  B = u T within / s^S,  C = u T within / s^T   (0 for an empty group).
//
// The per-row coefficients come from the state and `saved` in float64 (grouped_kl_math.h), a
// block of rows at a time; the row is written by a vectorised kernel (G <= 8) or a scalar one,
// then a few columns by the scalar formula: the top-k entries, the TARGET rule's target class
// (its own group) and the cross-entropy's target (- [i = t]). Invalid rows get zeros.
#include <cfloat>
#include <memory>

#include "gradient_cache.h"
#include "grouped_kl.h"
#include "grouped_kl_math.h"
#include "ltkd_cpu.h"

namespace ltkd {
namespace gkl {
namespace {

using simd::kWidth;
using simd::Vec;

// One row's coefficients (float32), per group k: the reference points ms, mt and A, B, C above;
// D = u T (cross + within) / s^S (RENORMALIZE's student part off the entries). The
// cross-entropy's ref(m^X), u ce_weight / s^X (ce_scaled) and u ce_weight (the - [i = t]).
// BUCKET: its top group's reference point and u P / (s_top / P^S_top) (at the entries), its
// rest group's u (P r^S - r^T) / s_rest (in D[1], with ms[1]).
struct RowCoefficients {
  const float *ms, *mt, *a, *b, *c, *d;  // G each
  float mx, ce_scaled, ce, bucket_ms, bucket_top, u;
};

inline double inverse_or_zero(double s) { return s == 0.0 ? 0.0 : 1.0 / s; }

struct GradContext {
  const RowInputs& in;
  View state, extras, saved, grad_loss;
  View sample_weight, group_logmass;
  char* grad;
  int64_t grad_element_bytes;
  at::ScalarType grad_dtype;
  bool stream;
  bool with_ce;  // cross-entropy with a target
};

double upstream(const GradContext& ctx, int64_t row) {
  const Options& opt = ctx.in.opt;
  const int G = ctx.in.G;
  const bool one = ctx.grad_loss.dim == 0 || ctx.grad_loss.size[0] == 1;
  const double gl = one ? ctx.grad_loss.real_at(ctx.grad_loss.data) : ctx.grad_loss.real(row);
  double u = gl * (ctx.sample_weight.present ? ctx.sample_weight.real(row) : 1.0);
  if (opt.reduction == kReduceMean) {
    const double denominator = ctx.saved.real(G);
    u = denominator != 0.0 ? u / denominator : 0.0;
  }
  return u;
}

// The coefficients of a block of consecutive rows, from their states in float64 (the exps and
// logs vectorised over the block, element by element: a row's coefficients do not depend on
// its block).
struct CoefficientBlock {
  static constexpr int kScalars = 6;
  int G;
  int64_t capacity;
  RowBlock rb;
  std::vector<float> values;  // 6 arrays of capacity x G, then capacity x kScalars
  std::vector<double> log_scale;
  float *ms, *mt, *a, *b, *c, *d, *scalars;

  CoefficientBlock(int groups, int64_t rows, const View& saved)
      : G(groups), capacity(rows), rb(groups, rows),
        values(static_cast<size_t>(rows * (6 * groups + kScalars))),
        log_scale(static_cast<size_t>(groups)) {
    float* p = values.data();
    for (float** array : {&ms, &mt, &a, &b, &c, &d}) {
      *array = p;
      p += rows * groups;
    }
    scalars = p;
    for (int k = 0; k < groups; ++k) log_scale[k] = saved.real(k);
  }

  RowCoefficients row(int64_t i) const {
    const int64_t at = i * G;
    const float* sc = scalars + i * kScalars;
    return RowCoefficients{ms + at, mt + at, a + at, b + at, c + at, d + at,
                           sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]};
  }

  void compute(const GradContext& ctx, int64_t first, int64_t count) {
    const Options& opt = ctx.in.opt;
    const bool bucket = opt.topk_rule == kTopkBucket;
    const bool one_group = G == 1 && !ctx.group_logmass.present;
    rb.load(ctx.state, first, count);
    rb.masses(opt, ctx.group_logmass);
    if (!bucket && !one_group) rb.rebalanced(opt, log_scale.data());
    for (int64_t i = 0; i < count; ++i) {
      const int64_t row = first + i;
      const double u = upstream(ctx, row);
      float* sc = scalars + i * kScalars;
      std::fill(sc, sc + kScalars, 0.0f);
      sc[5] = static_cast<float>(u);
      const int64_t base = i * G;
      for (int k = 0; k < G; ++k) {
        ms[base + k] = static_cast<float>(ref(rb.m_s[base + k]));
        mt[base + k] = static_cast<float>(ref(rb.m_t[base + k]));
      }
      if (bucket) {
        // At the entries u (P p^S_i - p^T_i), p^S_i = exp(b_i - ref(m^S_top)) P^S_top / s_top;
        // off them u (P r^S - r^T) pt^rest_i (never r^T / r^S, which overflows).
        // P = P^T_top + r^T = 1 + excess; r^S - r^T from the larger of the two, without
        // cancellation.
        const double log_r_t = rb.lp_t[base + 1], log_r_s = rb.lp_s[base + 1];
        const bool has_rest = log_r_t != -kInf;
        double excess = std::expm1(rb.lp_t[base]);
        if (has_rest && excess < 0.0) excess = 0.0;
        double rest_gap = log_r_s >= log_r_t ? -std::exp(log_r_s) * std::expm1(log_r_t - log_r_s)
                                             : std::exp(log_r_t) * std::expm1(log_r_s - log_r_t);
        if (!(has_rest || log_r_s != -kInf)) rest_gap = 0.0;
        const double coef_rest = std::exp(log_r_s) * excess + rest_gap;
        sc[3] = ms[base];
        sc[4] = static_cast<float>(u * (1.0 + excess) * std::exp(rb.lp_s[base] - rb.ls_s[base]));
        for (int k = 0; k < G; ++k) a[base + k] = b[base + k] = c[base + k] = d[base + k] = 0.0f;
        d[base + 1] = static_cast<float>(u * coef_rest * inverse_or_zero(rb.s_s[base + 1]));
      } else {
        const double scale = u * opt.temperature;
        for (int k = 0; k < G; ++k) {
          const int64_t at = base + k;
          double cross = 0.0, within;
          if (one_group) {
            within = opt.beta * (rb.s_t[at] != 0.0 ? 1.0 : 0.0);
          } else {
            const double weight = opt.within_teacher ? rb.p_t[at] : 1.0;
            within = opt.beta * weight * (rb.s_t[at] != 0.0 ? 1.0 : 0.0);
            cross = opt.alpha * (rb.p_s[at] - rb.q[at]);
          }
          const double inv_s = inverse_or_zero(rb.s_s[at]);
          const double inv_t = inverse_or_zero(rb.s_t[at]);
          a[at] = static_cast<float>(scale * cross * inv_s);
          b[at] = static_cast<float>(scale * within * inv_s);
          c[at] = static_cast<float>(scale * within * inv_t);
          d[at] = static_cast<float>(scale * (cross + within) * inv_s);
        }
      }
      if (ctx.with_ce) {
        const double s_x = ctx.extras.real(row, 1);
        sc[0] = static_cast<float>(ref(ctx.extras.real(row, 0)));
        sc[1] = static_cast<float>(u * opt.ce_weight * inverse_or_zero(s_x));
        sc[2] = static_cast<float>(u * opt.ce_weight);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Vectorised chunk functors: return the gradient of kWidth classes.

template <int G>
struct Tables {
  simd::GroupTable<G> table;
  float first = 0.0f;  // G = 1: the value
  // Up to G values of `from` (the rest 0), read straight from it: the kernel's G may exceed
  // the row's group count.
  void set(const float* from, int count) {
    first = from[0];
    if constexpr (G > 1) table.set(from, count);
  }
  LTKD_ALWAYS_INLINE Vec get(const simd::GroupLanes<G>* lanes) const {
    if constexpr (G == 1) {
      return simd::set1(first);
    } else {
      return simd::lookup(table, *lanes);
    }
  }
};

// The per-group tables a row kernel reads: the student's reference points and coefficient
// (ms, coef: A, or D for one model) and, with a dense teacher, mt, B, C.
struct KernelTables {
  const float *ms, *coef;
  const float *mt = nullptr, *b = nullptr, *c = nullptr;
  int count = 1;  // groups in the tables
};

// kTeacher: e^S A + (e^S B - e^T C); else e^S coef. Plus the cross-entropy's
// u ce_weight softmax(x)_i with kCrossEntropy.
template <int G, bool kTeacher, bool kLogWeight, bool kCrossEntropy>
struct GradChunk {
  Tables<G> ms, coef, mt, b, c;
  Vec inv, mx, ce;

  GradChunk(const KernelTables& t, const RowCoefficients& row, float inv_t)
      : inv(simd::set1(inv_t)), mx(simd::set1(row.mx)), ce(simd::set1(row.ce_scaled)) {
    ms.set(t.ms, t.count);
    coef.set(t.coef, t.count);
    if constexpr (kTeacher) {
      mt.set(t.mt, t.count);
      b.set(t.b, t.count);
      c.set(t.c, t.count);
    }
  }

  LTKD_ALWAYS_INLINE Vec operator()(const float* x, const float* t, const float* lw,
                                    const float* gid) const {
    if constexpr (G == 1) {
      return compute(x, t, lw, nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      return compute(x, t, lw, &lanes);
    }
  }

  LTKD_ALWAYS_INLINE Vec compute(const float* x, const float* t, const float* lw,
                                 const simd::GroupLanes<G>* lanes) const {
    const Vec raw_x = simd::load(x);
    const Vec e_s = simd::exp_kernel(simd::sub(simd::mul(raw_x, inv), ms.get(lanes)));
    Vec out;
    if constexpr (kTeacher) {
      Vec a = simd::mul(simd::load(t), inv);
      if constexpr (kLogWeight) a = simd::add(a, simd::load(lw));
      const Vec e_t = simd::exp_kernel(simd::sub(a, mt.get(lanes)));
      const Vec within = simd::fmsub(e_s, b.get(lanes), simd::mul(e_t, c.get(lanes)));
      out = simd::fmadd(e_s, coef.get(lanes), within);
    } else {
      out = simd::mul(e_s, coef.get(lanes));
    }
    if constexpr (kCrossEntropy) {
      out = simd::fmadd(ce, simd::exp_kernel(simd::sub(raw_x, mx)), out);
    }
    return out;
  }
};

// The scalar chunk functor (more groups, unusual combinations): the same formula per lane.
struct ScalarChunk {
  const KernelTables& t;
  const RowCoefficients& row;
  bool teacher, ce, class_ids;
  float inv_t;
  LTKD_ALWAYS_INLINE Vec operator()(const float* x, const float* tx, const float* lw,
                                    const float* gid) const {
    alignas(64) float lanes[kWidth];
    for (int i = 0; i < kWidth; ++i) {
      const int k = class_ids ? static_cast<int>(gid[i]) : 0;
      const float e_s = std::exp(x[i] * inv_t - t.ms[k]);
      float v;
      if (teacher) {
        float a = tx[i] * inv_t;
        if (lw != nullptr) a += lw[i];
        const float e_t = std::exp(a - t.mt[k]);
        v = std::fma(e_s, t.coef[k], std::fma(e_s, t.b[k], -(e_t * t.c[k])));  // as the kernel
      } else {
        v = e_s * t.coef[k];
      }
      if (ce) v += row.ce_scaled * std::exp(x[i] - row.mx);
      lanes[i] = v;
    }
    return simd::load(lanes);
  }
};

// A column set by the scalar formula, and the top-k entry at it (-1: none).
struct Fixup {
  int64_t col;
  int64_t entry;
  bool operator<(const Fixup& o) const { return col < o.col; }
};

struct PaddedGradChunk {
  alignas(64) float x[kWidth];
  alignas(64) float t[kWidth];
  alignas(64) float lw[kWidth];
  alignas(64) float gid[kWidth];
  alignas(64) float out[kWidth];
  void fill(const float* xs, const float* ts, const float* lws, const float* gids, int64_t n) {
    simd::store(x, simd::load_partial(xs, n, -kInfF));
    simd::store(t, simd::load_partial(ts, n, -kInfF));
    simd::store(lw, lws != nullptr ? simd::load_partial(lws, n, 0.0f) : simd::zero());
    simd::store(gid, gids != nullptr ? simd::load_partial(gids, n, 0.0f) : simd::zero());
  }
};

// Write the gradient row: chunk(x, t, lw, gid) for every chunk, then fix(col) at the fix-up
// columns (grouped by block, blocks ascending), block by block, stored in the output's dtype. The fix-ups are applied after
// each block's vector loop: a call inside that loop would keep its constants out of registers.
template <typename Chunk, typename Fix>
void write_row(const GradContext& ctx, int64_t row, bool teacher, const float* lw_all,
               const float* ids_all, const Fixup* fixups, size_t fixup_count, const Chunk& chunk,
               const Fix& fix) {
  const RowInputs& in = ctx.in;
  alignas(64) float buffer_x[kBlock];
  alignas(64) float buffer_t[kBlock];
  alignas(64) float buffer_out[kBlock];
  PaddedGradChunk pad;
  const bool in_place = ctx.grad_dtype == at::kFloat;
  char* grad_row = ctx.grad + row * in.vocab * ctx.grad_element_bytes;
  const Chunk local = chunk;  // a copy the loop can keep in registers
  size_t next = 0;
  for (int64_t start = 0; start < in.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, in.vocab - start);
    const float* x = in.student.block(row, start, n, buffer_x);
    const float* t = teacher ? in.teacher.block(row, start, n, buffer_t) : x;
    const float* lw = lw_all != nullptr ? lw_all + start : nullptr;
    const float* gid = ids_all != nullptr ? ids_all + start : nullptr;
    // A streamed block goes straight to memory; a block with fix-ups is formed in the L1 buffer
    // and then streamed (a plain store into a line just streamed out fetches it back from
    // memory: ~60 ns per top-k entry, the backward's largest cost at k = 64).
    const bool fixes_here = next < fixup_count && fixups[next].col < start + n;
    const bool via_buffer = !in_place || (ctx.stream && fixes_here);
    float* dest = in_place ? reinterpret_cast<float*>(grad_row) + start : nullptr;
    float* out = via_buffer ? buffer_out : dest;
    const int64_t full = n / kWidth * kWidth;
    if (ctx.stream && !via_buffer) {
      for (int64_t j = 0; j < full; j += kWidth) {
        simd::prefetch(x + j + kPrefetchAhead);
        if (teacher) simd::prefetch(t + j + kPrefetchAhead);
        simd::stream_store(out + j, local(x + j, t + j, lw != nullptr ? lw + j : nullptr,
                                          gid != nullptr ? gid + j : nullptr));
      }
    } else {
      for (int64_t j = 0; j < full; j += kWidth) {
        simd::prefetch(x + j + kPrefetchAhead);
        if (teacher) simd::prefetch(t + j + kPrefetchAhead);
        simd::store(out + j, local(x + j, t + j, lw != nullptr ? lw + j : nullptr,
                                   gid != nullptr ? gid + j : nullptr));
      }
    }
    if (full < n) {
      pad.fill(x + full, t + full, lw != nullptr ? lw + full : nullptr,
               gid != nullptr ? gid + full : nullptr, n - full);
      simd::store(pad.out, local(pad.x, pad.t, pad.lw, pad.gid));
      std::copy(pad.out, pad.out + (n - full), out + full);
    }
    while (next < fixup_count && fixups[next].col < start + n) {
      out[fixups[next].col - start] = fix(fixups[next]);
      ++next;
    }
    if (!in_place) {
      store_from_float(out, ctx.grad_dtype, grad_row + start * ctx.grad_element_bytes, n);
    } else if (via_buffer) {  // streamed: the row's blocks are 64-byte aligned (ctx.stream)
      for (int64_t j = 0; j < full; j += kWidth) simd::stream_store(dest + j, simd::load(out + j));
      std::copy(out + full, out + n, dest + full);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One row.

enum class Kind { kDense, kRenormalize, kRestrict, kBucket };

struct RowScratchGrad {
  std::vector<Fixup> fixups, ordered;
  std::vector<int32_t> block_starts;
  std::vector<uint64_t> index_seen;
};

template <int G, bool kTeacher, bool kLogWeight, bool kCrossEntropy, typename Fix>
void vector_row(const GradContext& ctx, int64_t row, const KernelTables& t,
                const RowCoefficients& c, const float* ids, float inv_t,
                const RowScratchGrad& sc, const Fix& fix) {
  const GradChunk<G, kTeacher, kLogWeight, kCrossEntropy> chunk(t, c, inv_t);
  write_row(ctx, row, kTeacher, kLogWeight ? ctx.in.log_weight : nullptr, G > 1 ? ids : nullptr,
            sc.fixups.data(), sc.fixups.size(), chunk, fix);
}

// A vectorised kernel for G (template) groups; false when none fits (then the scalar one).
template <int G, typename Fix>
bool vector_row_for(const GradContext& ctx, int64_t row, const KernelTables& t,
                    const RowCoefficients& c, const float* ids, bool teacher, bool log_weight,
                    bool ce, float inv_t, const RowScratchGrad& sc, const Fix& fix) {
  if (teacher && log_weight) {
    if constexpr (G == 1) {
      if (ce) {
        vector_row<1, true, true, true>(ctx, row, t, c, ids, inv_t, sc, fix);
      } else {
        vector_row<1, true, true, false>(ctx, row, t, c, ids, inv_t, sc, fix);
      }
      return true;
    }
    return false;
  }
  if (teacher) {
    if (ce) {
      vector_row<G, true, false, true>(ctx, row, t, c, ids, inv_t, sc, fix);
    } else {
      vector_row<G, true, false, false>(ctx, row, t, c, ids, inv_t, sc, fix);
    }
  } else if (ce) {
    vector_row<G, false, false, true>(ctx, row, t, c, ids, inv_t, sc, fix);
  } else {
    vector_row<G, false, false, false>(ctx, row, t, c, ids, inv_t, sc, fix);
  }
  return true;
}

template <typename Fix>
bool dispatch_vector(int vector_g, const GradContext& ctx, int64_t row, const KernelTables& t,
                     const RowCoefficients& c, const float* ids, bool teacher, bool log_weight,
                     bool ce, float inv_t, const RowScratchGrad& sc, const Fix& fix) {
  switch (vector_g) {
    case 1: return vector_row_for<1>(ctx, row, t, c, ids, teacher, log_weight, ce, inv_t, sc, fix);
    case 2: return vector_row_for<2>(ctx, row, t, c, ids, teacher, log_weight, ce, inv_t, sc, fix);
    case 3: return vector_row_for<3>(ctx, row, t, c, ids, teacher, log_weight, ce, inv_t, sc, fix);
    case 4: return vector_row_for<4>(ctx, row, t, c, ids, teacher, log_weight, ce, inv_t, sc, fix);
    case 8: return vector_row_for<8>(ctx, row, t, c, ids, teacher, log_weight, ce, inv_t, sc, fix);
    default: return false;
  }
}

int vector_groups(int G) {
  if (G <= 4) return G;
  return G <= simd::kMaxVectorGroups ? simd::kMaxVectorGroups : 0;
}

struct ZeroChunk {
  LTKD_ALWAYS_INLINE Vec operator()(const float*, const float*, const float*, const float*) const {
    return simd::zero();
  }
};

// Order the fix-ups by block of kBlock columns, blocks ascending: what write_row needs (it
// applies a block's fix-ups after the block's vector loop, in any order within the block). A
// counting sort, O(k + V / kBlock), where sorting by column cost ~1 us a row at k = 64.
void order_by_block(RowScratchGrad& sc, int64_t vocab) {
  const size_t count = sc.fixups.size();
  if (count <= 8) {
    std::sort(sc.fixups.begin(), sc.fixups.end());
    return;
  }
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  sc.block_starts.assign(static_cast<size_t>(blocks + 1), 0);
  for (const Fixup& f : sc.fixups) ++sc.block_starts[static_cast<size_t>(f.col / kBlock) + 1];
  for (int64_t b = 0; b < blocks; ++b) sc.block_starts[b + 1] += sc.block_starts[b];
  sc.ordered.resize(count);
  for (const Fixup& f : sc.fixups) sc.ordered[sc.block_starts[static_cast<size_t>(f.col / kBlock)]++] = f;
  sc.fixups.swap(sc.ordered);
}

// The dense teacher's gradient at one column of group k by the scalar formula (the vector
// kernels' e^S A + (e^S B - e^T C), x the student's logit there).
float dense_column(const RowInputs& in, int64_t row, int64_t col, int k, const RowCoefficients& c,
                   float x) {
  const float e_s = std::exp(x * in.inv_t - c.ms[k]);
  float a = in.teacher.value(row, col) * in.inv_t;
  if (in.log_weight != nullptr) a += in.log_weight[col];
  return std::fma(e_s, c.a[k], std::fma(e_s, c.b[k], -(std::exp(a - c.mt[k]) * c.c[k])));
}

// v plus the cross-entropy's u ce_weight (softmax(x)_col - [col = target]) at one column.
float with_ce_column(float v, const RowCoefficients& c, float x, bool is_target) {
  v += c.ce_scaled * std::exp(x - c.mx);
  if (is_target) v -= c.ce;
  return v;
}

void grad_row(const GradContext& ctx, int64_t row, const RowCoefficients& c, RowScratchGrad& sc,
              std::atomic<int64_t>& first_bad_row) {
  const RowInputs& in = ctx.in;
  const Options& opt = in.opt;
  const int G = in.G;
  char* grad_row_ptr = ctx.grad + row * in.vocab * ctx.grad_element_bytes;
  if (in.has_topk && !topk_row_ok(in.topk_indices, row, in.topk, in.index_bound, sc.index_seen)) {
    int64_t seen = first_bad_row.load();
    while (row < seen && !first_bad_row.compare_exchange_weak(seen, row)) {
    }
    fill_zero(grad_row_ptr, in.vocab, ctx.grad_element_bytes);
    return;
  }
  const Kind kind = !in.has_topk ? Kind::kDense
                    : opt.topk_rule == kTopkRenormalize ? Kind::kRenormalize
                    : opt.topk_rule == kTopkRestrict    ? Kind::kRestrict
                                                        : Kind::kBucket;
  const bool target_rule = opt.group_rule == kGroupTarget;
  const int64_t local_target = in.has_target ? in.local_target(row) : -1;
  const bool found = local_target >= 0 && local_target < in.vocab;

  // Fix-up columns: valid top-k entries, the TARGET rule's class, the cross-entropy's target.
  sc.fixups.clear();
  if (in.has_topk) {
    for (int64_t j = 0; j < in.topk; ++j) {
      const int64_t idx = in.topk_indices.index(row, j);
      const float lp = static_cast<float>(in.topk_logprobs.real(row, j));
      if (idx >= 0 && lp != -kInfF) sc.fixups.push_back({idx, j});
    }
  }
  if (found && (target_rule || ctx.with_ce)) {
    bool present = false;
    for (const Fixup& f : sc.fixups) present = present || f.col == local_target;
    if (!present) sc.fixups.push_back({local_target, -1});
  }
  order_by_block(sc, in.vocab);

  const float inv_t = in.inv_t;
  auto group_of = [&](int64_t col) -> int {
    if (opt.group_rule == kGroupClass) return in.class_group(col);
    if (target_rule) return col == local_target ? 0 : 1;
    return 0;
  };
  // The whole gradient at one column, by the scalar formula.
  auto fix = [&](const Fixup& f) -> float {
    const int64_t col = f.col;
    const float x = in.student.value(row, col);
    const float b = x * inv_t;
    float lp = 0.0f, a_entry = 0.0f;
    if (f.entry >= 0) {
      lp = static_cast<float>(in.topk_logprobs.real(row, f.entry));
      a_entry = lp * inv_t;
      if (in.log_weight != nullptr) a_entry += in.log_weight[col];
    }
    float v = 0.0f;
    if (kind == Kind::kBucket) {
      if (f.entry >= 0) {
        v = c.bucket_top * std::exp(b - c.bucket_ms) - c.u * std::exp(lp);
      } else {
        v = c.d[1] * std::exp(b - c.ms[1]);
      }
    } else {
      const int k = group_of(col);
      if (kind == Kind::kDense) {
        v = dense_column(in, row, col, k, c, x);
      } else if (f.entry >= 0) {  // an entry (RENORMALIZE, RESTRICT)
        const float e_s = std::exp(b - c.ms[k]);
        v = std::fma(e_s, c.a[k], std::fma(e_s, c.b[k], -(std::exp(a_entry - c.mt[k]) * c.c[k])));
      } else if (kind == Kind::kRenormalize) {
        v = std::exp(b - c.ms[k]) * c.d[k];
      }  // RESTRICT: 0 off the entries
    }
    return ctx.with_ce ? with_ce_column(v, c, x, col == local_target) : v;
  };

  if (kind == Kind::kRestrict) {
    if (ctx.with_ce) {
      // The cross-entropy's softmax over every class: the one-group kernel at T = 1.
      const KernelTables softmax{&c.mx, &c.ce_scaled};
      const GradChunk<1, false, false, false> chunk(softmax, c, 1.0f);
      write_row(ctx, row, false, nullptr, nullptr, sc.fixups.data(), sc.fixups.size(), chunk, fix);
    } else {
      write_row(ctx, row, false, nullptr, nullptr, sc.fixups.data(), sc.fixups.size(), ZeroChunk(),
                fix);
    }
    return;
  }
  const bool teacher = kind == Kind::kDense;
  int first = 0;  // the kernel's group 0 (TARGET rule: group 1, the target is a fix-up)
  int count = 1;
  const float* ids = nullptr;
  if (kind == Kind::kBucket) {
    first = 1;  // off the entries: the rest group's pt^rest
  } else if (opt.group_rule == kGroupClass) {
    count = G;
    ids = in.group_ids;
  } else if (target_rule) {
    first = 1;
  }
  KernelTables tables{c.ms + first, (teacher ? c.a : c.d) + first};
  if (teacher) {
    tables.mt = c.mt + first;
    tables.b = c.b + first;
    tables.c = c.c + first;
  }
  tables.count = count;
  const bool log_weight = teacher && in.log_weight != nullptr;
  const int vg = force_scalar() ? 0 : vector_groups(count);
  if (vg > 0 && dispatch_vector(vg, ctx, row, tables, c, ids, teacher, log_weight, ctx.with_ce,
                                inv_t, sc, fix)) {
    return;
  }
  const ScalarChunk chunk{tables, c, teacher, ctx.with_ce, ids != nullptr, inv_t};
  write_row(ctx, row, teacher, log_weight ? in.log_weight : nullptr, ids, sc.fixups.data(),
            sc.fixups.size(), chunk, fix);
}

// ---------------------------------------------------------------------------------------------
// The fused forward + gradient (a dense teacher, the one-group rule: KD, BKD; the TARGET rule
// without rebalancing: DKD, the walked group being its group 1).
//
// The states walk already computed every exp the gradient needs, at the running maxima of the
// moment (grouped_kl.h, ExpCapture): e^S_i = exp(b_i - ref(M^S)) = e'_i exp(m_e - M^S), m_e the
// maximum of the chunk's epoch. So the gradient row is written right after the row's state,
// from the captured e' still in L1/L2, with no exp per class:
//
//   out_i = e'^S_i A_e + (e'^S_i B_e - e'^T_i C_e) [+ ce_e e'^X_i],   A_e = A exp(m^S_e - M^S), ...
//
// the coefficients A, B, C, ce of grad_row (the row's float32 state, the upstream gradient 1).
// An epoch at the final maxima (all of a row of at most kBlock classes) uses them unchanged:
// the same operations, so the same bits, as grad_row. Rows whose final maxima are not finite, or
// with more epochs than the capture holds, take grad_row.

// exp(m - M) for an epoch at maximum m (final maximum M): 1 at M, 0 before any finite value
// (the epoch's exps are then exp(-inf) = 0, or NaN from a NaN logit: NaN * 0 stays NaN).
double epoch_factor(float m, float final_m) {
  if (m == final_m) return 1.0;
  if (m == -FLT_MAX) return 0.0;
  return std::exp(static_cast<double>(m) - static_cast<double>(final_m));
}

// The references the row's coefficients use are the walk's final maxima, but for the
// cross-entropy's: under the TARGET rule the target's logit, left out of the walk, joins it
// afterwards (and may be the maximum), so the epochs are rescaled to the coefficients' own
// references (c.ms, c.mt, c.mx), which must be finite.
bool capture_usable(const ExpCapture& cap, int64_t chunks, bool ce, const RowCoefficients& c,
                    int k) {
  if (cap.overflow || cap.epoch_count == 0 || cap.chunks != chunks) return false;
  const ExpCapture::Epoch& last = cap.epochs[cap.epoch_count - 1];
  auto finite = [](float m) { return std::isfinite(m) && m != -FLT_MAX; };
  return finite(last.m_s) && finite(last.m_t) && std::isfinite(c.ms[k]) &&
         std::isfinite(c.mt[k]) && (!ce || (finite(last.m_x) && std::isfinite(c.mx)));
}

struct EpochVectors {
  Vec a, b, c, ce;
};

// Group k's coefficients (the walked group: 0, or 1 under the TARGET rule) for epoch e.
EpochVectors epoch_vectors(const ExpCapture::Epoch& e, const RowCoefficients& c, int k,
                           bool ce) {
  const double fs = epoch_factor(e.m_s, c.ms[k]), ft = epoch_factor(e.m_t, c.mt[k]);
  auto scaled = [](float coef, double factor) {
    return factor == 1.0 ? coef : static_cast<float>(static_cast<double>(coef) * factor);
  };
  EpochVectors v;
  v.a = simd::set1(scaled(c.a[k], fs));
  v.b = simd::set1(scaled(c.b[k], fs));
  v.c = simd::set1(scaled(c.c[k], ft));
  v.ce = simd::set1(ce ? scaled(c.ce_scaled, epoch_factor(e.m_x, c.mx)) : 0.0f);
  return v;
}

// The gradient row from the captured exps (float32 gradient); the target's column (the
// cross-entropy's, and the TARGET rule's group 0) by grad_row's scalar formula.
template <bool kCrossEntropy>
void write_captured_row(const GradContext& ctx, int64_t row, const RowCoefficients& c,
                        const ExpCapture& cap) {
  const RowInputs& in = ctx.in;
  const int64_t vocab = in.vocab;
  const bool target_rule = in.opt.group_rule == kGroupTarget;
  const int k = target_rule ? 1 : 0;  // the walked group
  float* grad_row = reinterpret_cast<float*>(ctx.grad) + row * vocab;
  int64_t fix_col = -1;
  if ((kCrossEntropy || target_rule) && in.has_target) {
    const int64_t t = in.local_target(row);
    if (t >= 0 && t < vocab) fix_col = t;
  }
  int epoch = 0;
  EpochVectors v = epoch_vectors(cap.epochs[0], c, k, kCrossEntropy);
  int64_t boundary = cap.epoch_count > 1 ? cap.epochs[1].chunk : cap.chunks;
  alignas(64) float buffer_out[kBlock];
  alignas(64) float pad[kWidth];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const bool fixes_here = fix_col >= start && fix_col < start + n;
    const bool via_buffer = ctx.stream && fixes_here;
    const bool stream = ctx.stream && !via_buffer;
    float* out = via_buffer ? buffer_out : grad_row + start;
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t chunk = (start + j) / kWidth;
      while (chunk >= boundary) {
        ++epoch;
        v = epoch_vectors(cap.epochs[epoch], c, k, kCrossEntropy);
        boundary = epoch + 1 < cap.epoch_count ? cap.epochs[epoch + 1].chunk : cap.chunks;
      }
      const Vec e_s = simd::load(cap.s + chunk * kWidth);
      const Vec e_t = simd::load(cap.t + chunk * kWidth);
      Vec value = simd::fmadd(e_s, v.a, simd::fmsub(e_s, v.b, simd::mul(e_t, v.c)));
      if constexpr (kCrossEntropy) value = simd::fmadd(v.ce, simd::load(cap.x + chunk * kWidth), value);
      if (j + kWidth <= n) {
        if (stream) {
          simd::stream_store(out + j, value);
        } else {
          simd::store(out + j, value);
        }
      } else {
        simd::store(pad, value);
        std::copy(pad, pad + (n - j), out + j);
      }
    }
    if (fixes_here) {
      // grad_row's fix-up: the whole column by the scalar formula (the target's group: 0
      // under both rules).
      const float x = in.student.value(row, fix_col);
      const float value = dense_column(in, row, fix_col, 0, c, x);
      out[fix_col - start] = kCrossEntropy ? with_ce_column(value, c, x, true) : value;
    }
    if (via_buffer) {
      const int64_t full = n / kWidth * kWidth;
      for (int64_t j = 0; j < full; j += kWidth) {
        simd::stream_store(grad_row + start + j, simd::load(buffer_out + j));
      }
      std::copy(buffer_out + full, buffer_out + n, grad_row + start + full);
    }
  }
}

// A buffer of at least `floats` floats for captured exps. Up to kKeptCaptureFloats it is the
// calling thread's, kept between calls: a fresh buffer of this size (tens to hundreds of KiB) is
// a new mapping whose pages fault on first touch, which cost more than the gradient's own
// arithmetic at classification sizes. Larger ones (rows of over 256K classes) live in `owned`
// for the call: their faults are small against the row's work, and a thread keeps no more
// than 4 MiB.
constexpr int64_t kKeptCaptureFloats = int64_t{1} << 20;

float* capture_buffer(int64_t floats, std::unique_ptr<float[]>& owned) {
  if (floats > kKeptCaptureFloats) {
    owned.reset(new float[static_cast<size_t>(floats)]);
    return owned.get();
  }
  thread_local std::unique_ptr<float[]> buffer;
  thread_local int64_t size = 0;
  if (size < floats) {
    buffer.reset(new float[static_cast<size_t>(floats)]);
    size = floats;
  }
  return buffer.get();
}

// Rows per block of the fused pass: their captured exps (2 or 3 floats a class) stay within
// about 64 KiB (one row when a row needs more), so that they are still in the L1/L2 caches
// when the block's gradient rows are written (256 KiB measured no faster).
int64_t fused_rows_per_block(int64_t vocab, int streams) {
  const int64_t bytes_per_row = ((vocab + kWidth - 1) / kWidth) * kWidth * streams * 4;
  return std::clamp<int64_t>((int64_t{64} << 10) / std::max<int64_t>(bytes_per_row, 1), 1, 64);
}

// Whether the fused pass serves a call: rows captures_exps serves, no group_logmass, and a
// float32 gradient (a float16/bfloat16 one would be rounded twice by the backward's scale).
bool fuses_gradient(const RowInputs& in, bool has_group_logmass, at::ScalarType grad_dtype) {
  return captures_exps(in) && !has_group_logmass && grad_dtype == at::kFloat;
}

// Whether the gradient is written with non-temporal stores: float32, rows of whole 64-byte
// lines, and larger than the caches it would otherwise evict.
bool streams_gradient(const at::Tensor& grad, int64_t vocab) {
  return simd::kHasStreamStore && grad.scalar_type() == at::kFloat && vocab % kWidth == 0 &&
         reinterpret_cast<uintptr_t>(grad.data_ptr()) % 64 == 0 &&
         static_cast<size_t>(grad.nbytes()) >= kStreamMinBytes;
}

}  // namespace
}  // namespace gkl

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grouped_kl_loss_forward_grad(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt) {
  using namespace gkl;
  const RowInputs in = prepare_row_inputs(student, teacher, topk_indices, topk_logprobs, groups,
                                          target, class_weight, mask, opt, /*for_grad=*/true);
  if (!fuses_gradient(in, group_logmass.has_value(), student.scalar_type())) {
    auto [loss, state, extras, saved] =
        grouped_kl_loss_forward(student, teacher, topk_indices, topk_logprobs, groups, target,
                                class_weight, mask, sample_weight, group_logmass, num_items, opt);
    return {loss, state, extras, saved, at::Tensor()};
  }
  const int64_t rows = in.rows, vocab = in.vocab;
  const int G = in.G;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor state = at::empty({rows, kSlots, G}, f32);
  at::Tensor extras = at::empty({rows, kExtras}, f32);
  const FinishInputs fin = prepare_finish_inputs(state, extras, mask, target, sample_weight,
                                                 std::nullopt, std::nullopt, num_items, opt);
  // What the gradient needs of the finish before the rows: the mean's denominator (the
  // finish's own function, so the same float) and the upstream gradient 1 (scaled in the
  // backward).
  const double denominator = local_denominator(fin);
  // The finish's `saved`: no rebalancing here, so log scales 0, then the denominator (filled
  // here: no ATen op runs).
  at::Tensor pre_saved = at::empty({G + 1}, f32);
  std::fill(pre_saved.data_ptr<float>(), pre_saved.data_ptr<float>() + G, 0.0f);
  pre_saved.data_ptr<float>()[G] = static_cast<float>(denominator);
  at::Tensor one = at::empty({}, f32);
  one.data_ptr<float>()[0] = 1.0f;
  at::Tensor grad = empty_gradient(rows, vocab, student.options());
  const bool with_ce = opt.with_ce() && target.has_value();
  const GradContext ctx{in,
                        View(state),
                        View(extras),
                        View(pre_saved),
                        View(one),
                        sample_weight.has_value() ? View(*sample_weight) : View(),
                        View(),
                        static_cast<char*>(grad.data_ptr()),
                        static_cast<int64_t>(grad.element_size()),
                        grad.scalar_type(),
                        streams_gradient(grad, vocab),
                        with_ce};
  float* state_data = state.data_ptr<float>();
  float* extras_data = extras.data_ptr<float>();
  const int64_t chunks = (vocab + kWidth - 1) / kWidth;
  const int streams = with_ce ? 3 : 2;
  const int64_t block_rows_fused = fused_rows_per_block(vocab, streams);
  std::atomic<int64_t> first_bad_row{std::numeric_limits<int64_t>::max()};
  // Tasks of at most about 16K classes: a fused task does twice the work of a states task per
  // row, and finer tasks keep both threads busy to the end when one of them waits on memory.
  const int64_t task_rows = rows_per_task(rows, vocab, int64_t{16} << 10);
  for_each_task_of(rows, task_rows, [&](int64_t first, int64_t last) {
    const int64_t capacity = std::min(block_rows_fused, last - first);
    std::unique_ptr<float[]> owned;
    float* exps = capture_buffer(capacity * chunks * kWidth * streams, owned);
    std::vector<ExpCapture> captures(static_cast<size_t>(capacity));
    for (int64_t i = 0; i < capacity; ++i) {
      float* base = exps + i * chunks * kWidth * streams;
      captures[i].s = base;
      captures[i].t = base + chunks * kWidth;
      captures[i].x = with_ce ? base + 2 * chunks * kWidth : nullptr;
    }
    CoefficientBlock block(G, capacity, ctx.saved);
    RowScratchGrad scratch;
    for (int64_t start = first; start < last; start += capacity) {
      const int64_t count = std::min(capacity, last - start);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = start + i;
        captures[i].gradient_row = reinterpret_cast<const float*>(ctx.grad) + row * vocab;
        captured_states_row(in, row, state_data + row * kSlots * G,
                            extras_data + row * kExtras, captures[i]);
      }
      block.compute(ctx, start, count);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = start + i;
        if (!in.valid[row]) {
          fill_zero(ctx.grad + row * vocab * ctx.grad_element_bytes, vocab,
                    ctx.grad_element_bytes);
        } else if (capture_usable(captures[i], chunks, with_ce, block.row(i),
                                  in.opt.group_rule == kGroupTarget ? 1 : 0)) {
          if (with_ce) {
            write_captured_row<true>(ctx, row, block.row(i), captures[i]);
          } else {
            write_captured_row<false>(ctx, row, block.row(i), captures[i]);
          }
        } else {
          grad_row(ctx, row, block.row(i), scratch, first_bad_row);
        }
      }
    }
  });
  at::Tensor loss = opt.reduction == kReduceNone ? at::empty({rows}, f32) : at::empty({}, f32);
  at::Tensor saved = at::empty({G + 1}, f32);
  finish_into(fin, loss.data_ptr<float>(), saved.data_ptr<float>());
  return {loss, state, extras, saved, grad};
}

void grouped_kl_scale_grad(const at::Tensor& grad, const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad.device().is_cpu() && grad.scalar_type() == at::kFloat &&
                        grad.dim() == 2 && grad.is_contiguous(),
                    "grad must be a contiguous 2-d float32 CPU tensor");
  const int64_t rows = grad.size(0), vocab = grad.size(1);
  TORCH_CHECK_VALUE(grad_loss.device().is_cpu() &&
                        (grad_loss.numel() == 1 || (grad_loss.dim() == 1 && grad_loss.size(0) == rows)),
                    "grad_loss must hold one value or one per row, got shape ", grad_loss.sizes());
  const gkl::View upstream(grad_loss);
  const bool one_value = grad_loss.numel() == 1;
  if (one_value && upstream.real_at(upstream.data) == 1.0) return;
  float* data = grad.data_ptr<float>();
  for_each_task(rows, vocab, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const double g = one_value ? upstream.real_at(upstream.data) : upstream.real(row);
      if (g == 1.0) continue;
      const simd::Vec factor = simd::set1(static_cast<float>(g));
      float* p = data + row * vocab;
      const int64_t full = vocab / simd::kWidth * simd::kWidth;
      for (int64_t j = 0; j < full; j += simd::kWidth) {
        simd::store(p + j, simd::mul(simd::load(p + j), factor));
      }
      for (int64_t j = full; j < vocab; ++j) p[j] *= static_cast<float>(g);
    }
  });
}

at::Tensor grouped_kl_grad(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const at::Tensor& state,
    const at::Tensor& extras, const at::Tensor& saved, const at::Tensor& grad_loss,
    const gkl::Options& opt) {
  using namespace gkl;
  const RowInputs in = prepare_row_inputs(student, teacher, topk_indices, topk_logprobs, groups,
                                          target, class_weight, mask, opt, /*for_grad=*/true);
  const int64_t rows = in.rows, vocab = in.vocab;
  const int G = in.G;
  TORCH_CHECK_VALUE(state.device().is_cpu() && state.dim() == 3 && state.size(0) == rows &&
                        state.size(1) == kSlots && state.size(2) == G,
                    "state must be a CPU tensor of shape (", rows, ", 5, ", G, "), got ",
                    state.sizes());
  TORCH_CHECK_VALUE(extras.device().is_cpu() && extras.dim() == 2 && extras.size(0) == rows &&
                        extras.size(1) == kExtras,
                    "extras must be a CPU tensor of shape (", rows, ", 4), got ", extras.sizes());
  TORCH_CHECK_VALUE(saved.device().is_cpu() && saved.dim() == 1 && saved.size(0) == G + 1,
                    "saved must be a CPU tensor of shape (", G + 1, ",), got ", saved.sizes());
  const bool per_row = opt.reduction == kReduceNone;
  TORCH_CHECK_VALUE(grad_loss.device().is_cpu() &&
                        (grad_loss.numel() == 1 ||
                         (per_row && grad_loss.dim() == 1 && grad_loss.size(0) == rows)),
                    "grad_loss must hold one value", per_row ? " or one per row" : "",
                    ", got shape ", grad_loss.sizes());
  for (const at::Tensor* t : {&state, &extras, &saved, &grad_loss}) {
    const auto dtype = t->scalar_type();
    TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                          dtype == at::kBFloat16,
                      "state, extras, saved and grad_loss must be float tensors");
  }
  if (sample_weight.has_value()) {
    TORCH_CHECK_VALUE(sample_weight->dim() == 1 && sample_weight->size(0) == rows,
                      "sample_weight must have shape (", rows, ",)");
  }
  if (group_logmass.has_value()) {
    TORCH_CHECK_VALUE(group_logmass->dim() == 2 && group_logmass->size(0) == rows &&
                          group_logmass->size(1) == G,
                      "group_logmass must have shape (", rows, ", ", G, ")");
  }
  at::Tensor grad = empty_gradient(rows, vocab, student.options());
  View grad_loss_view(grad_loss);
  if (grad_loss.dim() > 1) grad_loss_view.dim = 0;  // one value of any shape
  const GradContext ctx{in,
                        View(state),
                        View(extras),
                        View(saved),
                        grad_loss_view,
                        sample_weight.has_value() ? View(*sample_weight) : View(),
                        group_logmass.has_value() ? View(*group_logmass) : View(),
                        static_cast<char*>(grad.data_ptr()),
                        static_cast<int64_t>(grad.element_size()),
                        grad.scalar_type(),
                        streams_gradient(grad, vocab),
                        opt.with_ce() && target.has_value()};
  std::atomic<int64_t> first_bad_row{std::numeric_limits<int64_t>::max()};
  // Rows in tasks; per task, blocks of rows: their coefficients, then their gradients.
  const int64_t rows_in_block = std::clamp<int64_t>(2048 / std::max(G, 1), 1, 64);
  for_each_task(rows, vocab, [&](int64_t first, int64_t last) {
    CoefficientBlock block(G, std::min(rows_in_block, last - first), ctx.saved);
    RowScratchGrad scratch;
    for (int64_t start = first; start < last; start += block.capacity) {
      const int64_t count = std::min(block.capacity, last - start);
      block.compute(ctx, start, count);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = start + i;
        if (!in.valid[row]) {
          fill_zero(ctx.grad + row * vocab * ctx.grad_element_bytes, vocab,
                    ctx.grad_element_bytes);
          continue;
        }
        grad_row(ctx, row, block.row(i), scratch, first_bad_row);
      }
    }
  });
  const int64_t bad = first_bad_row.load();
  TORCH_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(),
                    "topk_indices values must lie in [-1, ", in.index_bound,
                    ") with no class repeated in a row; row ", bad, " is not");
  return grad;
}

}  // namespace ltkd
