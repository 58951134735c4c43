// Op 1 of docs/design.md, `states`: one read of each logits row -> per group k the state
//
//   m^S_k = max b_i,  s^S_k = sum exp(b_i - ref(m^S_k)),  m^T_k, s^T_k the same for a,
//   g_k   = sum_{a_i > -inf} exp(a_i - ref(m^T_k)) [(a_i - ref(m^T_k)) - (b_i - ref(m^S_k))]
//
// (b = z^S / T, a = z^T / T + log w, both rounded to float32 as the gradient rounds them) and
// the cross-entropy extras [m^X, s^X, x_t, found].
//
// Vectorised rows (G <= simd::kMaxVectorGroups; G = 5..7 run the 8-group kernel): a row is
// walked in blocks of kBlock classes (float16 / bfloat16 converted to float32 in an L1 buffer,
// float32 read in place) and each block in chunks of simd::kWidth lanes. Every group keeps its
// own running maxima (so a group far below the row's maximum keeps its exact sums); each lane
// keeps its own per-group sums at those maxima. The first block is read twice from L1 (its
// maxima, then its sums), later blocks once, raising a maximum (and rescaling the sums) when a
// chunk holds a new record, which is rare by then. Lane sums are added in a fixed order in
// float64 at the end of the row; a row is reduced by one thread, so results do not depend on
// the thread count. Nothing in the row loop calls a function: every vector register is
// caller-saved, and a call would keep the accumulators in memory.
//
// The TARGET rule (DKD) runs the one-group kernel over the row with the target class left out
// (group 1) and takes the target class (group 0) as a one-element group; BUCKET's rest group is
// the one-group kernel with the entries' classes left out. Top-k entries are handled in float64
// per row. Everything else (more groups, unusual option combinations) takes a scalar float64
// path with the same semantics, in two passes (maxima, then sums).
//
// Accuracy of the within-group KL. The finish computes KL_k = g_k / s^T_k + log(s^S_k / s^T_k)
// from the float32 state; when the two models nearly agree in a group, KL_k is far smaller than
// its terms, whose float32 rounding (of s^S, s^T) would swamp it. When the state predicts a
// relative error above 1e-4, the row is read once more with the final maxima to form, with
// delta_i = (a_i - ref(m^T)) - (b_i - ref(m^S)) computed as (z^T_i - z^S_i) / T + log w_i - c
// (c per group: the logits' difference is exact),
//
//   KL_k = sum pt^T phi(delta) + log1p(u + r) - u,   phi(d) = e^-d - 1 + d >= 0,
//   u = sum pt^T (e^-delta - 1),  r = (student mass where the teacher has none) / s^T,
//
// free of cancellation (phi by its series for |delta| < 1/2), and g_k is stored so that the
// finish's formula gives that KL_k from the stored float32 s^S_k, s^T_k (g then equals the
// defining sum up to the float32 rounding of those sums, and merges as it does). The scalar
// path and the top-k entries (RESTRICT, BUCKET's top group) do the same from float64 sums.
#include <cfloat>

#include "grouped_kl.h"
#include "grouped_kl_math.h"
#include "ltkd_cpu.h"

namespace ltkd {
namespace gkl {
namespace {

using simd::kWidth;
using simd::Vec;

constexpr float kNoMax = -FLT_MAX;  // a running max before any finite value (exp(-inf - it) = 0)
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline float max_reference(float m) { return m == kNoMax ? 0.0f : m; }

// The factor that moves sums from running max `from` to a higher `to`, in every lane: exp(from -
// to), 0 from the no-max sentinel, 1 when the max is unchanged. The vector exp, inline: a call
// in the row loop (even on its rare path) would keep the accumulators out of registers (every
// vector register is caller-saved).
LTKD_ALWAYS_INLINE Vec rescale_factor(float from, float to) {
  if (!(to > from)) return simd::set1(1.0f);
  if (from == kNoMax) return simd::zero();
  return simd::exp(simd::set1(from - to));
}
inline double final_max(float m) { return m == kNoMax ? -kInf : static_cast<double>(m); }

// One group's state in float64, as stored (m = -inf for a group with no finite value), and
// optionally its within-group KL in float64 (to store g so that the finish recovers it).
struct GroupResult {
  double m_s = -kInf, s_s = 0.0, m_t = -kInf, s_t = 0.0, g = 0.0;
  bool has_kl = false;
  double kl = 0.0;
};

// An online (max, sum) in float64: the cross-entropy's log-sum-exp and its merges.
struct Online {
  double m = -kInf, s = 0.0;
  void add(double v) {
    if (v > m) {
      if (s != 0.0) s *= std::exp(ref(m) - v);
      m = v;
    }
    s += std::exp(v - ref(m));
  }
};

// ---------------------------------------------------------------------------------------------
// Walking a row in padded chunks.

struct PaddedChunk {
  alignas(64) float x[kWidth];
  alignas(64) float t[kWidth];
  alignas(64) float lw[kWidth];
  alignas(64) float gid[kWidth];

  // Lanes [0, n) from the row; the others -inf logits, log weight 0, group 0.
  void fill(const float* xs, const float* ts, const float* lws, const float* gids, int64_t n) {
    simd::store(x, simd::load_partial(xs, n, -kInfF));
    simd::store(t, simd::load_partial(ts, n, -kInfF));
    simd::store(lw, lws != nullptr ? simd::load_partial(lws, n, 0.0f) : simd::zero());
    simd::store(gid, gids != nullptr ? simd::load_partial(gids, n, 0.0f) : simd::zero());
  }
  // Leave lane i out (its logits -inf: it adds nothing to any sum).
  void leave_out(int64_t i) {
    x[i] = -kInfF;
    t[i] = -kInfF;
  }
};

// The classes a kernel leaves out of a row: sorted, distinct, in [0, V).
struct Skips {
  const int64_t* cols = nullptr;
  size_t count = 0;
};

// Call fn(x, t, lw, gid) on every chunk of kWidth classes of `row` of `first` (and `second` when
// kTwo; otherwise t = x), leaving out the classes `skips`. lw and gid are the per-class tables
// (nullptr when absent).
template <bool kTwo, typename Fn>
LTKD_ALWAYS_INLINE void walk_row(const RowMatrix& first, const RowMatrix& second, int64_t row,
                                 int64_t vocab, const float* lw_all, const float* ids_all,
                                 Skips skips, Fn&& fn) {
  alignas(64) float buffer_x[kBlock];
  alignas(64) float buffer_t[kBlock];
  PaddedChunk pad;
  size_t next = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = first.block(row, start, n, buffer_x);
    const float* t = kTwo ? second.block(row, start, n, buffer_t) : x;
    const float* lw = lw_all != nullptr ? lw_all + start : nullptr;
    const float* gid = ids_all != nullptr ? ids_all + start : nullptr;
    const int64_t full = n / kWidth * kWidth;
    for (int64_t j = 0; j < full; j += kWidth) {
      simd::prefetch(x + j + kPrefetchAhead);
      if (kTwo) simd::prefetch(t + j + kPrefetchAhead);
      const int64_t base = start + j;
      if (next < skips.count && skips.cols[next] < base + kWidth) {
        pad.fill(x + j, t + j, lw != nullptr ? lw + j : nullptr, gid != nullptr ? gid + j : nullptr,
                 kWidth);
        while (next < skips.count && skips.cols[next] < base + kWidth) {
          pad.leave_out(skips.cols[next++] - base);
        }
        fn(pad.x, pad.t, pad.lw, pad.gid);
      } else {
        fn(x + j, t + j, lw != nullptr ? lw + j : nullptr, gid != nullptr ? gid + j : nullptr);
      }
    }
    if (full < n) {
      const int64_t base = start + full;
      pad.fill(x + full, t + full, lw != nullptr ? lw + full : nullptr,
               gid != nullptr ? gid + full : nullptr, n - full);
      while (next < skips.count && skips.cols[next] < start + n) {
        pad.leave_out(skips.cols[next++] - base);
      }
      fn(pad.x, pad.t, pad.lw, pad.gid);
    }
  }
}

// One chunk of a block walk: kMode 0 block maxima, 1 sums, 2 one pass (online maxima).
template <int kMode, typename State>
LTKD_ALWAYS_INLINE void chunk_step(State& state, typename State::BlockMax& block, const float* x,
                                   const float* t, const float* lw, const float* gid) {
  if constexpr (kMode == 0) {
    state.max_chunk(block, x, t, lw, gid);
  } else if constexpr (kMode == 1) {
    state.sum_chunk(x, t, lw, gid);
  } else {
    state.online_chunk(x, t, lw, gid);
  }
}

// The chunks of one block [start, start + n) (values x, t, lw, gid of the block), the classes
// `skips` from index `next` on left out; returns the index of the first skip past the block.
template <bool kTwo, int kMode, typename State>
LTKD_ALWAYS_INLINE size_t walk_block(State& state, typename State::BlockMax& block,
                                     PaddedChunk& pad, const float* x, const float* t,
                                     const float* lw, const float* gid, int64_t start, int64_t n,
                                     Skips skips, size_t next, const char* ahead_x = nullptr,
                                     const char* ahead_t = nullptr, int64_t ahead_bytes = 0,
                                     const float* write_ahead = nullptr) {
  const int64_t full = n / kWidth * kWidth;
  for (int64_t j = 0; j < full; j += kWidth) {
    if constexpr (kMode != 1) {
      simd::prefetch(x + j + kPrefetchAhead);
      if (kTwo) simd::prefetch(t + j + kPrefetchAhead);
    } else if (ahead_x != nullptr) {
      // The block's second pass reads L1: fetch the next row meanwhile (see walk_row_blocks).
      simd::prefetch(ahead_x + j * ahead_bytes);
      if (kTwo) simd::prefetch(ahead_t + j * ahead_bytes);
      if (write_ahead != nullptr) simd::prefetch_for_write(write_ahead + start + j);
    }
    const int64_t base = start + j;
    if (next < skips.count && skips.cols[next] < base + kWidth) {
      pad.fill(x + j, t + j, lw != nullptr ? lw + j : nullptr, gid != nullptr ? gid + j : nullptr,
               kWidth);
      while (next < skips.count && skips.cols[next] < base + kWidth) {
        pad.leave_out(skips.cols[next++] - base);
      }
      chunk_step<kMode>(state, block, pad.x, pad.t, pad.lw, pad.gid);
    } else {
      chunk_step<kMode>(state, block, x + j, t + j, lw != nullptr ? lw + j : nullptr,
                        gid != nullptr ? gid + j : nullptr);
    }
  }
  if (full < n) {
    const int64_t base = start + full;
    pad.fill(x + full, t + full, lw != nullptr ? lw + full : nullptr,
             gid != nullptr ? gid + full : nullptr, n - full);
    while (next < skips.count && skips.cols[next] < start + n) {
      pad.leave_out(skips.cols[next++] - base);
    }
    chunk_step<kMode>(state, block, pad.x, pad.t, pad.lw, pad.gid);
  }
  return next;
}

// Walk a row block by block. The first block (where most of the maxima's records fall) in two
// passes over its L1-resident values: state.max_chunk on every chunk (block maxima), then
// state.raise (the running maxima raised, the sums rescaled), then state.sum_chunk (sums at
// those maxima): a short row never rescales more than once. The following blocks in one
// pass, state.online_chunk, which raises the maxima when a chunk holds a new record (rare by
// then). (No lambdas here: a closure holding the state's address would keep the accumulators
// in memory.)
//
// A row of one block (vocab <= kBlock) is read from memory by the maxima pass and then summed
// from L1, where the exps take most of the time and no load waits: that pass prefetches the
// row `next_row` (>= 0: the row the caller walks next), so its reads overlap the exps instead
// of following them (measured without: the walk's time on rows read from memory was its time
// on cached rows plus the whole transfer); and, given `write_ahead` (a capture's gradient row,
// written a few rows later), fetches that row's lines for writing.
template <bool kTwo, typename State>
LTKD_ALWAYS_INLINE void walk_row_blocks(const RowMatrix& first, const RowMatrix& second,
                                        int64_t row, int64_t vocab, const float* lw_all,
                                        const float* ids_all, Skips skips, State& state,
                                        int64_t next_row = -1,
                                        const float* write_ahead = nullptr) {
  alignas(64) float buffer_x[kBlock];
  alignas(64) float buffer_t[kBlock];
  PaddedChunk pad;
  typename State::BlockMax block;
  size_t next = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = first.block(row, start, n, buffer_x);
    const float* t = kTwo ? second.block(row, start, n, buffer_t) : x;
    const float* lw = lw_all != nullptr ? lw_all + start : nullptr;
    const float* gid = ids_all != nullptr ? ids_all + start : nullptr;
    if (start == 0) {
      walk_block<kTwo, 0>(state, block, pad, x, t, lw, gid, start, n, skips, next);
      state.raise(block);
      const bool ahead = next_row >= 0 && vocab <= kBlock;
      next = walk_block<kTwo, 1>(
          state, block, pad, x, t, lw, gid, start, n, skips, next,
          ahead ? static_cast<const char*>(first.at(next_row, 0)) : nullptr,
          ahead ? static_cast<const char*>(second.at(next_row, 0)) : nullptr,
          first.element_bytes, ahead ? write_ahead : nullptr);
    } else {
      next = walk_block<kTwo, 2>(state, block, pad, x, t, lw, gid, start, n, skips, next);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Vectorised rows.

template <int G>
LTKD_ALWAYS_INLINE Vec group_values(const simd::GroupTable<G>& table, const float* scalars,
                                    const simd::GroupLanes<G>* lanes) {
  if constexpr (G == 1) {
    return simd::set1(scalars[0]);
  } else {
    return simd::lookup(table, *lanes);
  }
}

template <int G>
LTKD_ALWAYS_INLINE Vec add_in_group(Vec acc, Vec x, const simd::GroupLanes<G>* lanes, int k) {
  if constexpr (G == 1) {
    return simd::add(acc, x);
  } else {
    return simd::masked_add(acc, lanes->in_group[k], x);
  }
}

template <int G>
LTKD_ALWAYS_INLINE Vec max_in_group(Vec acc, Vec x, const simd::GroupLanes<G>* lanes, int k) {
  if constexpr (G == 1) {
    return simd::max_ignore_nan(x, acc);
  } else {
    return simd::masked_max_ignore_nan(acc, lanes->in_group[k], x);
  }
}

// The largest lane of a block's per-lane maxima, or the running max when that is larger.
inline float raised_max(float running, Vec block) {
  const float top = simd::reduce_max(block);
  return top > running ? top : running;
}

// The raw student logits' log-sum-exp (cross-entropy, T = 1), per lane at one max.
struct RawLse {
  float max = kNoMax;
  Vec sum = simd::zero();
  LTKD_ALWAYS_INLINE void raise(Vec block) {
    const float raised = raised_max(max, block);
    if (raised != max) {
      sum = simd::mul(sum, rescale_factor(max, raised));
      max = raised;
    }
  }
  LTKD_ALWAYS_INLINE Vec sum_chunk(Vec raw) {
    const Vec e = simd::exp_kernel(simd::sub(raw, simd::set1(max)));
    sum = simd::add(sum, e);
    return e;
  }
  LTKD_ALWAYS_INLINE Online result() const {
    Online out;
    out.m = final_max(max);
    out.s = simd::reduce_add_double(sum);
    return out;
  }
};

// Per-lane maxima of a block (or of one chunk), per group and model, NaN ignored: what raises
// the running maxima. A local of the walk, not a member: the row's accumulators alone stay in
// registers through the hot loop.
template <int G>
struct BlockMaxima {
  Vec s[G], t[G], raw;
  BlockMaxima() {
    for (int k = 0; k < G; ++k) s[k] = t[k] = simd::neg_inf();
    raw = simd::neg_inf();
  }
};

// Both models: per group and lane the running maxima m^S_k, m^T_k and
//   sum_s[k] = sum exp(b - m^S_k), sum_t[k] = sum exp(a - m^T_k),
//   gap[k]   = sum_{a > -inf} exp(a - m^T_k) [(a - m^T_k) - (b - m^S_k)].
//
// kCapture (G = 1): every chunk's exps e^S = exp(b - m^S), e^T = exp(a - m^T) (and the
// cross-entropy's exp(x - m^X)) are also stored, in chunk order, at the running maxima of the
// moment, into `capture` (the fused forward + gradient, grouped_kl.h); a raise that moves a
// maximum starts a new epoch there.
template <int G, bool kLogWeight, bool kCrossEntropy, bool kCapture = false>
struct BothRow {
  float max_s[G], max_t[G];
  simd::GroupTable<G> max_s_table, max_t_table;
  Vec sum_s[G], sum_t[G], gap[G];
  RawLse raw;
  Vec inv;
  ExpCapture* capture = nullptr;
  float *out_s = nullptr, *out_t = nullptr, *out_x = nullptr;  // the next chunk's slots
  using BlockMax = BlockMaxima<G>;

  explicit BothRow(float inv_t, ExpCapture* cap = nullptr) : inv(simd::set1(inv_t)) {
    static_assert(!kCapture || G == 1, "capture: one group");
    if constexpr (kCapture) {
      capture = cap;
      out_s = cap->s;
      out_t = cap->t;
      out_x = cap->x;
      cap->epoch_count = 0;
      cap->overflow = false;
      cap->add_epoch(0, kNoMax, kNoMax, kNoMax);
    }
    for (int k = 0; k < G; ++k) {
      max_s[k] = kNoMax;
      max_t[k] = kNoMax;
      sum_s[k] = simd::zero();
      sum_t[k] = simd::zero();
      gap[k] = simd::zero();
    }
    max_s_table.set(max_s);
    max_t_table.set(max_t);
  }

  LTKD_ALWAYS_INLINE void values(const float* x, const float* t, const float* lw, Vec& raw_x,
                                 Vec& b, Vec& a) const {
    raw_x = simd::load(x);
    b = simd::mul(raw_x, inv);
    a = simd::mul(simd::load(t), inv);
    if constexpr (kLogWeight) a = simd::add(a, simd::load(lw));
  }

  LTKD_ALWAYS_INLINE void max_values(BlockMax& block, Vec raw_x, Vec b, Vec a,
                                     const simd::GroupLanes<G>* lanes) const {
    for (int k = 0; k < G; ++k) {
      block.s[k] = max_in_group<G>(block.s[k], b, lanes, k);
      block.t[k] = max_in_group<G>(block.t[k], a, lanes, k);
    }
    if constexpr (kCrossEntropy) block.raw = simd::max_ignore_nan(raw_x, block.raw);
  }

  LTKD_ALWAYS_INLINE void max_chunk(BlockMax& block, const float* x, const float* t,
                                    const float* lw, const float* gid) const {
    Vec raw_x, b, a;
    values(x, t, lw, raw_x, b, a);
    if constexpr (G == 1) {
      max_values(block, raw_x, b, a, nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      max_values(block, raw_x, b, a, &lanes);
    }
  }

  // The block's maxima raise the running ones: move every raised group's sums to them. The gap
  // terms shift by drift = (m^S_new - m^S_old) - (m^T_new - m^T_old), weighted by the
  // teacher's old sum.
  LTKD_ALWAYS_INLINE void raise(const BlockMax& block) {
    bool any = false;
    for (int k = 0; k < G; ++k) {
      const float new_s = raised_max(max_s[k], block.s[k]);
      const float new_t = raised_max(max_t[k], block.t[k]);
      if (new_s == max_s[k] && new_t == max_t[k]) continue;
      any = true;
      const Vec rescale_s = rescale_factor(max_s[k], new_s);
      const Vec rescale_t = rescale_factor(max_t[k], new_t);
      const float drift = (max_reference(new_s) - max_reference(max_s[k])) -
                          (max_reference(new_t) - max_reference(max_t[k]));
      if (drift != 0.0f) gap[k] = simd::fmadd(sum_t[k], simd::set1(drift), gap[k]);
      gap[k] = simd::mul(gap[k], rescale_t);
      sum_s[k] = simd::mul(sum_s[k], rescale_s);
      sum_t[k] = simd::mul(sum_t[k], rescale_t);
      max_s[k] = new_s;
      max_t[k] = new_t;
    }
    if (any) {
      max_s_table.set(max_s);
      max_t_table.set(max_t);
    }
    if constexpr (kCrossEntropy) raw.raise(block.raw);
    if constexpr (kCapture) {
      const ExpCapture::Epoch& last = capture->epochs[capture->epoch_count - 1];
      if (last.m_s != max_s[0] || last.m_t != max_t[0] || last.m_x != raw.max) {
        capture->add_epoch((out_s - capture->s) / kWidth, max_s[0], max_t[0], raw.max);
      }
    }
  }

  LTKD_ALWAYS_INLINE void sum_chunk(const float* x, const float* t, const float* lw,
                                    const float* gid) {
    Vec raw_x, b, a;
    values(x, t, lw, raw_x, b, a);
    if constexpr (G == 1) {
      update(raw_x, b, a, nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      update(raw_x, b, a, &lanes);
    }
  }

  // One pass: a chunk with a value above its group's running max raises the maxima first (as
  // a one-chunk block).
  LTKD_ALWAYS_INLINE void online_chunk(const float* x, const float* t, const float* lw,
                                       const float* gid) {
    Vec raw_x, b, a;
    values(x, t, lw, raw_x, b, a);
    if constexpr (G == 1) {
      check(raw_x, b, a, nullptr);
      update(raw_x, b, a, nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      check(raw_x, b, a, &lanes);
      update(raw_x, b, a, &lanes);
    }
  }

  LTKD_ALWAYS_INLINE void check(Vec raw_x, Vec b, Vec a, const simd::GroupLanes<G>* lanes) {
    const Vec mb = group_values<G>(max_s_table, max_s, lanes);
    const Vec ma = group_values<G>(max_t_table, max_t, lanes);
    bool raise = simd::any(simd::either(simd::greater(b, mb), simd::greater(a, ma)));
    if constexpr (kCrossEntropy) raise = raise || simd::any(simd::greater(raw_x, simd::set1(raw.max)));
    if (__builtin_expect(raise, 0)) {
      BlockMax block;
      max_values(block, raw_x, b, a, lanes);
      this->raise(block);
    }
  }

  LTKD_ALWAYS_INLINE void update(Vec raw_x, Vec b, Vec a, const simd::GroupLanes<G>* lanes) {
    const Vec shifted_b = simd::sub(b, group_values<G>(max_s_table, max_s, lanes));
    const Vec shifted_a = simd::sub(a, group_values<G>(max_t_table, max_t, lanes));
    const Vec exp_b = simd::exp_kernel(shifted_b);
    const Vec exp_a = simd::exp_kernel(shifted_a);
    // A class the teacher masks (a = -inf) adds nothing to g; NaN propagates.
    const Vec gap_terms = simd::select(simd::equal(a, simd::neg_inf()), simd::zero(),
                                       simd::mul(exp_a, simd::sub(shifted_a, shifted_b)));
    for (int k = 0; k < G; ++k) {
      sum_s[k] = add_in_group<G>(sum_s[k], exp_b, lanes, k);
      sum_t[k] = add_in_group<G>(sum_t[k], exp_a, lanes, k);
      gap[k] = add_in_group<G>(gap[k], gap_terms, lanes, k);
    }
    if constexpr (kCapture) {
      simd::store(out_s, exp_b);
      simd::store(out_t, exp_a);
      out_s += kWidth;
      out_t += kWidth;
    }
    if constexpr (kCrossEntropy) {
      const Vec exp_x = raw.sum_chunk(raw_x);
      if constexpr (kCapture) {
        simd::store(out_x, exp_x);
        out_x += kWidth;
      }
    }
  }

  LTKD_ALWAYS_INLINE void results(GroupResult* out) const {
    for (int k = 0; k < G; ++k) {
      out[k].m_s = final_max(max_s[k]);
      out[k].m_t = final_max(max_t[k]);
      out[k].s_s = simd::reduce_add_double(sum_s[k]);
      out[k].s_t = simd::reduce_add_double(sum_t[k]);
      out[k].g = simd::reduce_add_double(gap[k]);
    }
  }
};

// One model: per group the running max of v = x / T (+ log w) and sum exp(v - max); with
// kCrossEntropy also the raw values' log-sum-exp.
template <int G, bool kLogWeight, bool kCrossEntropy>
struct SingleRow {
  float max[G];
  simd::GroupTable<G> max_table;
  Vec sum[G];
  RawLse raw;
  Vec inv;
  using BlockMax = BlockMaxima<G>;

  explicit SingleRow(float inv_t) : inv(simd::set1(inv_t)) {
    for (int k = 0; k < G; ++k) {
      max[k] = kNoMax;
      sum[k] = simd::zero();
    }
    max_table.set(max);
  }

  LTKD_ALWAYS_INLINE Vec value(Vec raw_x, const float* lw) const {
    Vec v = simd::mul(raw_x, inv);
    if constexpr (kLogWeight) v = simd::add(v, simd::load(lw));
    return v;
  }

  LTKD_ALWAYS_INLINE void max_chunk(BlockMax& block, const float* x, const float*,
                                    const float* lw, const float* gid) const {
    const Vec raw_x = simd::load(x);
    const Vec v = value(raw_x, lw);
    if constexpr (G == 1) {
      block.s[0] = simd::max_ignore_nan(v, block.s[0]);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      for (int k = 0; k < G; ++k) block.s[k] = max_in_group<G>(block.s[k], v, &lanes, k);
    }
    if constexpr (kCrossEntropy) block.raw = simd::max_ignore_nan(raw_x, block.raw);
  }

  LTKD_ALWAYS_INLINE void raise(const BlockMax& block) {
    bool any = false;
    for (int k = 0; k < G; ++k) {
      const float raised = raised_max(max[k], block.s[k]);
      if (raised == max[k]) continue;
      any = true;
      sum[k] = simd::mul(sum[k], rescale_factor(max[k], raised));
      max[k] = raised;
    }
    if (any) max_table.set(max);
    if constexpr (kCrossEntropy) raw.raise(block.raw);
  }

  LTKD_ALWAYS_INLINE void sum_chunk(const float* x, const float*, const float* lw,
                                    const float* gid) {
    const Vec raw_x = simd::load(x);
    const Vec v = value(raw_x, lw);
    if constexpr (G == 1) {
      sum[0] = simd::add(sum[0], simd::exp_kernel(simd::sub(v, simd::set1(max[0]))));
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      const Vec e = simd::exp_kernel(simd::sub(v, simd::lookup(max_table, lanes)));
      for (int k = 0; k < G; ++k) sum[k] = add_in_group<G>(sum[k], e, &lanes, k);
    }
    if constexpr (kCrossEntropy) raw.sum_chunk(raw_x);
  }

  // One pass: a chunk with a value above its group's running max raises the maxima first.
  LTKD_ALWAYS_INLINE void online_chunk(const float* x, const float* t, const float* lw,
                                       const float* gid) {
    const Vec raw_x = simd::load(x);
    const Vec v = value(raw_x, lw);
    bool raise;
    if constexpr (G == 1) {
      raise = simd::any(simd::greater(v, simd::set1(max[0])));
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      raise = simd::any(simd::greater(v, simd::lookup(max_table, lanes)));
    }
    if constexpr (kCrossEntropy) raise = raise || simd::any(simd::greater(raw_x, simd::set1(raw.max)));
    if (__builtin_expect(raise, 0)) {
      BlockMax block;
      max_chunk(block, x, t, lw, gid);
      this->raise(block);
    }
    sum_chunk(x, t, lw, gid);
  }
};

// The second, cancellation-free pass (see the top of the file), at the final maxima: per group
// the sums of exp(a - m^T) (s^T), of its gap terms (g), of pt^T phi(delta) (h) and of the
// student's mass where a = -inf (rest), all with delta = (t - x) / T + log w - c_k.
template <int G, bool kLogWeight>
struct PreciseRow {
  simd::GroupTable<G> ms_table, mt_table, c_table;
  float ms[G], mt[G], c[G];
  Vec sum_t[G], gap[G], h[G], rest[G];
  Vec inv;

  PreciseRow(float inv_t, const float* ref_s, const float* ref_t) : inv(simd::set1(inv_t)) {
    for (int k = 0; k < G; ++k) {
      ms[k] = ref_s[k];
      mt[k] = ref_t[k];
      c[k] = mt[k] - ms[k];
      sum_t[k] = gap[k] = h[k] = rest[k] = simd::zero();
    }
    ms_table.set(ms);
    mt_table.set(mt);
    c_table.set(c);
  }

  LTKD_ALWAYS_INLINE void chunk(const float* x, const float* t, const float* lw,
                                const float* gid) {
    if constexpr (G == 1) {
      update(x, t, lw, simd::set1(ms[0]), simd::set1(mt[0]), simd::set1(c[0]), nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      update(x, t, lw, simd::lookup(ms_table, lanes), simd::lookup(mt_table, lanes),
             simd::lookup(c_table, lanes), &lanes);
    }
  }

  LTKD_ALWAYS_INLINE void update(const float* x, const float* t, const float* lw, Vec mb, Vec ma,
                                 Vec cc, const simd::GroupLanes<G>* lanes) {
    const Vec raw_x = simd::load(x);
    const Vec raw_t = simd::load(t);
    const Vec b = simd::mul(raw_x, inv);
    Vec a = simd::mul(raw_t, inv);
    Vec d = simd::mul(simd::sub(raw_t, raw_x), inv);
    if constexpr (kLogWeight) {
      const Vec w = simd::load(lw);
      a = simd::add(a, w);
      d = simd::add(d, w);
    }
    const Vec exp_a = simd::exp_kernel(simd::sub(a, ma));
    const Vec exp_b = simd::exp_kernel(simd::sub(b, mb));
    const Vec delta = simd::sub(d, cc);
    // phi(delta) = delta^2 P(delta), P the series of (e^-d - 1 + d) / d^2 to degree 6.
    Vec p = simd::set1(1.0f / 40320.0f);
    p = simd::fmadd(p, delta, simd::set1(-1.0f / 5040.0f));
    p = simd::fmadd(p, delta, simd::set1(1.0f / 720.0f));
    p = simd::fmadd(p, delta, simd::set1(-1.0f / 120.0f));
    p = simd::fmadd(p, delta, simd::set1(1.0f / 24.0f));
    p = simd::fmadd(p, delta, simd::set1(-1.0f / 6.0f));
    p = simd::fmadd(p, delta, simd::set1(0.5f));
    const Vec series = simd::mul(exp_a, simd::mul(simd::mul(delta, delta), p));
    // Past |delta| = 1/2: e^T phi = e^S - e^T + e^T delta (a mild cancellation).
    const Vec direct = simd::fmadd(exp_a, delta, simd::sub(exp_b, exp_a));
    const Vec h_terms_all = simd::select(simd::less(simd::abs(delta), simd::set1(0.5f)), series,
                                         direct);
    const auto masked = simd::equal(a, simd::neg_inf());
    const Vec zero = simd::zero();
    const Vec gap_terms = simd::select(masked, zero, simd::mul(exp_a, delta));
    const Vec h_terms = simd::select(masked, zero, h_terms_all);
    const Vec rest_terms = simd::select(masked, exp_b, zero);
    for (int k = 0; k < G; ++k) {
      sum_t[k] = add_in_group<G>(sum_t[k], exp_a, lanes, k);
      gap[k] = add_in_group<G>(gap[k], gap_terms, lanes, k);
      h[k] = add_in_group<G>(h[k], h_terms, lanes, k);
      rest[k] = add_in_group<G>(rest[k], rest_terms, lanes, k);
    }
  }

  // KL_k = h / s^T + log1p(u + r) - u, u = (h - g) / s^T, r = rest / s^T.
  LTKD_ALWAYS_INLINE double kl(int k) const {
    const double s_t = simd::reduce_add_double(sum_t[k]);
    const double g = simd::reduce_add_double(gap[k]);
    const double hk = simd::reduce_add_double(h[k]);
    const double r = simd::reduce_add_double(rest[k]) / s_t;
    const double u = (hk - g) / s_t;
    return hk / s_t + (std::log1p(u + r) - u);
  }
};

// A group whose float32 state predicts a relative error of the finish's within-group KL above
// 1e-4 (its terms far larger than their sum), and that is not exact already (a one-class
// group: g = 0, s^S = s^T = 1).
bool ill_conditioned(double s_s, double s_t, double g) {
  const float ss = static_cast<float>(s_s), st = static_cast<float>(s_t);
  const float gf = static_cast<float>(g);
  if (!(ss > 0.0f && st > 0.0f) || !std::isfinite(ss) || !std::isfinite(st) ||
      !std::isfinite(gf)) {
    return false;
  }
  if (gf == 0.0f && ss == st) return false;
  // A screening test: float32 precision is enough to tell a KL far above its predicted error.
  const float ratio = gf / st;
  const float kl = ratio + std::log(ss / st);
  const float error = 4e-7f * (1.0f + std::fabs(ratio));
  return !(std::fabs(kl) > 1e4f * error);
}

// Kernels of one row: results for G groups (template G), cross-entropy stats when asked.
using BothFn = void (*)(const RowInputs&, int64_t, Skips, GroupResult*, Online*);
using SingleFn = void (*)(const RowInputs&, const RowMatrix&, float, int64_t, Skips,
                          GroupResult*, Online*);

template <int G, bool kLogWeight, bool kCrossEntropy, bool kCapture>
LTKD_ALWAYS_INLINE void both_row_walk(const RowInputs& in, int64_t row, Skips skip,
                                      GroupResult* out, Online* ce, ExpCapture* capture) {
  BothRow<G, kLogWeight, kCrossEntropy, kCapture> state(in.inv_t, capture);
  walk_row_blocks<true>(in.student, in.teacher, row, in.vocab,
                        kLogWeight ? in.log_weight : nullptr, G > 1 ? in.group_ids : nullptr, skip,
                        state, row + 1 < in.rows ? row + 1 : -1,
                        kCapture ? capture->gradient_row : nullptr);
  if constexpr (kCapture) capture->chunks = (state.out_s - capture->s) / kWidth;
  state.results(out);
  if constexpr (kCrossEntropy) *ce = state.raw.result();

  bool any = false;
  for (int k = 0; k < G; ++k) any = any || ill_conditioned(out[k].s_s, out[k].s_t, out[k].g);
  if (!any) return;
  float ref_s[G], ref_t[G];
  for (int k = 0; k < G; ++k) {
    ref_s[k] = max_reference(state.max_s[k]);
    ref_t[k] = max_reference(state.max_t[k]);
  }
  PreciseRow<G, kLogWeight> precise(in.inv_t, ref_s, ref_t);
  walk_row<true>(in.student, in.teacher, row, in.vocab, kLogWeight ? in.log_weight : nullptr,
                 G > 1 ? in.group_ids : nullptr, skip,
                 [&](const float* x, const float* t, const float* lw,
                     const float* gid) LTKD_ALWAYS_INLINE_LAMBDA { precise.chunk(x, t, lw, gid); });
  for (int k = 0; k < G; ++k) {
    if (!ill_conditioned(out[k].s_s, out[k].s_t, out[k].g)) continue;
    const double kl = precise.kl(k);
    if (std::isfinite(kl)) {
      out[k].has_kl = true;
      out[k].kl = kl;
    }
  }
}

template <int G, bool kLogWeight, bool kCrossEntropy>
void both_row(const RowInputs& in, int64_t row, Skips skip, GroupResult* out, Online* ce) {
  both_row_walk<G, kLogWeight, kCrossEntropy, false>(in, row, skip, out, ce, nullptr);
}

template <bool kLogWeight, bool kCrossEntropy>
void captured_both_row(const RowInputs& in, int64_t row, Skips skip, GroupResult* out,
                       Online* ce, ExpCapture* capture) {
  both_row_walk<1, kLogWeight, kCrossEntropy, true>(in, row, skip, out, ce, capture);
}

// both_row<1> with its exps captured (the fused forward + gradient).
using CapturedFn = void (*)(const RowInputs&, int64_t, Skips, GroupResult*, Online*,
                            ExpCapture*);

CapturedFn pick_captured(bool log_weight, bool ce) {
  if (log_weight) return ce ? &captured_both_row<true, true> : &captured_both_row<true, false>;
  return ce ? &captured_both_row<false, true> : &captured_both_row<false, false>;
}

// One model (`matrix`, at `inv_t`): m and s into the student slots of `out`.
template <int G, bool kLogWeight, bool kCrossEntropy>
void single_row(const RowInputs& in, const RowMatrix& matrix, float inv_t, int64_t row,
                Skips skip, GroupResult* out, Online* ce) {
  SingleRow<G, kLogWeight, kCrossEntropy> state(inv_t);
  walk_row_blocks<false>(matrix, matrix, row, in.vocab, kLogWeight ? in.log_weight : nullptr,
                         G > 1 ? in.group_ids : nullptr, skip, state,
                         row + 1 < in.rows ? row + 1 : -1);
  for (int k = 0; k < G; ++k) {
    out[k].m_s = final_max(state.max[k]);
    out[k].s_s = simd::reduce_add_double(state.sum[k]);
  }
  if constexpr (kCrossEntropy) *ce = state.raw.result();
}

// The template group count for G groups (0: the scalar path).
int vector_groups(int G) {
  if (G <= 4) return G;
  return G <= simd::kMaxVectorGroups ? simd::kMaxVectorGroups : 0;
}

template <int G>
BothFn pick_both_for(bool log_weight, bool ce) {
  if (log_weight) {
    if constexpr (G == 1) return ce ? &both_row<1, true, true> : &both_row<1, true, false>;
    return nullptr;
  }
  return ce ? &both_row<G, false, true> : &both_row<G, false, false>;
}

BothFn pick_both(int vector_g, bool log_weight, bool ce) {
  switch (vector_g) {
    case 1: return pick_both_for<1>(log_weight, ce);
    case 2: return pick_both_for<2>(log_weight, ce);
    case 3: return pick_both_for<3>(log_weight, ce);
    case 4: return pick_both_for<4>(log_weight, ce);
    case 8: return pick_both_for<8>(log_weight, ce);
    default: return nullptr;
  }
}

template <int G>
SingleFn pick_single_for(bool log_weight, bool ce) {
  if (log_weight) return ce ? nullptr : &single_row<G, true, false>;
  return ce ? &single_row<G, false, true> : &single_row<G, false, false>;
}

SingleFn pick_single(int vector_g, bool log_weight, bool ce) {
  switch (vector_g) {
    case 1: return pick_single_for<1>(log_weight, ce);
    case 2: return pick_single_for<2>(log_weight, ce);
    case 3: return pick_single_for<3>(log_weight, ce);
    case 4: return pick_single_for<4>(log_weight, ce);
    case 8: return pick_single_for<8>(log_weight, ce);
    default: return nullptr;
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar float64 rows: any number of groups and any option combination, in two passes (the
// maxima, then the sums at the final maxima; NaN maxima propagate as torch's amax). b and a
// are rounded to float32 as the vectorised kernels and the gradient round them; the teacher-
// student differences d_i = a_i - b_i are taken from the raw inputs in float64, and the
// within-group KL from the cancellation-free sums (see the top of the file).

enum class Models { kBoth, kStudent, kTeacher };

struct TwoPassSums {
  std::vector<double> m_s, m_t, s_s, s_t, g, h, rest;
  void reset(int G) {
    const size_t n = static_cast<size_t>(G);
    m_s.assign(n, -kInf);
    m_t.assign(n, -kInf);
    s_s.assign(n, 0.0);
    s_t.assign(n, 0.0);
    g.assign(n, 0.0);
    h.assign(n, 0.0);
    rest.assign(n, 0.0);
  }
};

// KL_k = h / s^T + log1p(u + r) - u with u = (h - g) / s^T, r = rest / s^T, when finite.
double cancellation_free_kl(double s_s, double s_t, double g, double h, double rest) {
  if (s_s > 0.0 && s_t > 0.0 && std::isfinite(s_s) && std::isfinite(s_t) && std::isfinite(g) &&
      std::isfinite(h) && std::isfinite(rest)) {
    const double u = (h - g) / s_t;
    const double r = rest / s_t;
    return h / s_t + (std::log1p(u + r) - u);
  }
  return within_kl(s_s, s_t, g);
}

// source(visit) calls visit(k, b, a, d) once per class of the row. student_ref: the student
// reference points of g per group (RENORMALIZE: from the all-V student pass; the student slots
// are then left to the caller), or nullptr.
template <typename Source>
void two_pass(int G, Models models, const double* student_ref, const Source& source,
              GroupResult* out, TwoPassSums& t) {
  const bool student = models != Models::kTeacher;
  const bool teacher = models != Models::kStudent;
  const bool own_student = student && student_ref == nullptr;
  t.reset(G);
  source([&](int k, double b, double a, double) {
    if (own_student) t.m_s[k] = nan_max(t.m_s[k], b);
    if (teacher) t.m_t[k] = nan_max(t.m_t[k], a);
  });
  source([&](int k, double b, double a, double d) {
    double e_s = 0.0;
    if (own_student) {
      e_s = std::exp(b - ref(t.m_s[k]));
      t.s_s[k] += e_s;
    }
    if (!teacher) return;
    const double e_t = std::exp(a - ref(t.m_t[k]));
    t.s_t[k] += e_t;
    if (!student) return;
    if (a != -kInf) {
      // With this pass's own student sums, delta takes the logits' exact difference d (the KL
      // below is then formed from delta alone). With the student's sums and maxima from
      // another pass (student_ref), g must use the values those sums used, a and b as
      // rounded: an exact d against references from rounded values is off by the rounding of
      // a / T (|a| * 6e-8), which no later term cancels (a one-class group's g was not 0).
      const double delta = student_ref != nullptr
                               ? (a - ref(t.m_t[k])) - (b - student_ref[k])
                               : d - (ref(t.m_t[k]) - ref(t.m_s[k]));
      t.g[k] += e_t * delta;
      // h (and rest) serve the KL formed below, from this pass's own student sums only.
      if (own_student) t.h[k] += e_t * (std::expm1(-delta) + delta);
    } else {
      t.rest[k] += e_s;
    }
  });
  for (int k = 0; k < G; ++k) {
    GroupResult& r = out[k];
    if (own_student) {
      r.m_s = t.m_s[k];
      r.s_s = t.s_s[k];
    }
    if (teacher) {
      r.m_t = t.m_t[k];
      r.s_t = t.s_t[k];
      r.g = student ? t.g[k] : 0.0;
    }
    if (own_student && teacher) {
      r.has_kl = true;
      r.kl = cancellation_free_kl(r.s_s, r.s_t, r.g, t.h[k], t.rest[k]);
    }
  }
}

struct Scratch {
  TwoPassSums sums;
  std::vector<GroupResult> results, entries;
  std::vector<uint64_t> index_seen;
  std::vector<double> entry_b, entry_a, entry_d, student_ref;
  std::vector<int> entry_group;
  std::vector<uint8_t> entry_valid;
  std::vector<int64_t> skip_cols;
  alignas(64) float buffer_x[kBlock];
  alignas(64) float buffer_t[kBlock];
};

// The group of a class for the scalar path (TARGET: the target alone is group 0).
inline int scalar_group(const RowInputs& in, int64_t col, int64_t local_target) {
  if (in.opt.group_rule == kGroupClass) return in.class_group(col);
  if (in.opt.group_rule == kGroupTarget) return col == local_target ? 0 : 1;
  return 0;
}

// A dense row on the scalar path: every group of `out` (G of them), the cross-entropy's online
// log-sum-exp into `ce` when asked.
void scalar_dense_row(const RowInputs& in, int64_t row, int64_t local_target, Models models,
                      bool with_ce, GroupResult* out, Online* ce, Scratch& sc) {
  const bool student = models != Models::kTeacher;
  const bool teacher = models != Models::kStudent;
  const float inv_t = in.inv_t;
  const double inv_t_double = in.inv_t_double;
  bool first_pass = true;
  auto source = [&](const auto& visit) {
    for (int64_t start = 0; start < in.vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, in.vocab - start);
      const float* x = student ? in.student.block(row, start, n, sc.buffer_x) : nullptr;
      const float* t = teacher ? in.teacher.block(row, start, n, sc.buffer_t) : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t col = start + i;
        const float lw = in.log_weight != nullptr ? in.log_weight[col] : 0.0f;
        const float b = student ? x[i] * inv_t : 0.0f;
        float a = teacher ? t[i] * inv_t : 0.0f;
        if (teacher && in.log_weight != nullptr) a += lw;
        double d = 0.0;
        if (student && teacher) {
          d = (static_cast<double>(t[i]) - static_cast<double>(x[i])) * inv_t_double + lw;
        }
        if (with_ce && first_pass) ce->add(static_cast<double>(x[i]));
        visit(scalar_group(in, col, local_target), b, a, d);
      }
    }
    first_pass = false;
  };
  two_pass(in.G, models, nullptr, source, out, sc.sums);
}

// ---------------------------------------------------------------------------------------------
// One row of `states`.

struct RowContext {
  const RowInputs& in;
  std::atomic<int64_t>& first_bad_row;
};

// Store a group's result into the (5, G) row of the state. NaN in a group's sum (a NaN or +inf
// logit) makes its max NaN too unless the max is +inf, as torch's amax does. With a float64
// within-group KL, g is stored so that g / s^T + log s^S - log s^T gives it from the stored
// float32 sums.
void store_group(float* state_row, int G, int k, const GroupResult& r) {
  auto max_slot = [](double m, double s) {
    if (s != s && m != kInf) return kNaN;
    return m;
  };
  const float s_s = static_cast<float>(r.s_s);
  const float s_t = static_cast<float>(r.s_t);
  float g = static_cast<float>(r.g);
  if (r.has_kl && std::isfinite(r.kl) && s_s > 0.0f && s_t > 0.0f && std::isfinite(s_s) &&
      std::isfinite(s_t)) {
    // The finish's log(s^S / s^T), from the same float32 sums.
    const double ratio = log_ratio(static_cast<double>(s_s), static_cast<double>(s_t));
    g = static_cast<float>(static_cast<double>(s_t) * (r.kl - ratio));
  }
  state_row[0 * G + k] = static_cast<float>(max_slot(r.m_s, r.s_s));
  state_row[1 * G + k] = s_s;
  state_row[2 * G + k] = static_cast<float>(max_slot(r.m_t, r.s_t));
  state_row[3 * G + k] = s_t;
  state_row[4 * G + k] = g;
}

// The slots of an absent model are 0 (an empty group of a present model has max -inf).
void absent_model_slots(Models models, GroupResult* res, int G) {
  for (int k = 0; k < G; ++k) {
    if (models == Models::kTeacher) {
      res[k].m_s = 0.0;
      res[k].s_s = 0.0;
      res[k].g = 0.0;
    } else if (models == Models::kStudent) {
      res[k].m_t = 0.0;
      res[k].s_t = 0.0;
      res[k].g = 0.0;
    }
  }
}

// The TARGET rule's group 0 (the target class alone) on the scalar path.
void target_class_group(const RowInputs& in, int64_t row, int64_t local_target, Models models,
                        GroupResult* res, Scratch& sc) {
  const bool student = models != Models::kTeacher;
  const bool teacher = models != Models::kStudent;
  const float x = student ? in.student.value(row, local_target) : 0.0f;
  const float t = teacher ? in.teacher.value(row, local_target) : 0.0f;
  const float lw = in.log_weight != nullptr ? in.log_weight[local_target] : 0.0f;
  const float b = x * in.inv_t;
  float a = t * in.inv_t;
  if (in.log_weight != nullptr) a += lw;
  const double d = (static_cast<double>(t) - static_cast<double>(x)) * in.inv_t_double + lw;
  two_pass(1, models, nullptr, [&](const auto& visit) { visit(0, b, a, d); }, res, sc.sums);
}

// Dense teacher (or no teacher): the kernels over the row.
// `capture` (only where captures_exps(in): the one-group kernel over both models): its exps.
void dense_row(const RowInputs& in, int64_t row, bool found, int64_t local_target, bool with_ce,
               GroupResult* res, Online* ce, Scratch& sc, ExpCapture* capture) {
  const Options& opt = in.opt;
  const Models models = in.has_student && in.has_teacher
                            ? Models::kBoth
                            : (in.has_student ? Models::kStudent : Models::kTeacher);
  const bool target_rule = opt.group_rule == kGroupTarget;
  const int kernel_groups = opt.group_rule == kGroupClass ? in.G : 1;
  const int vg = force_scalar() ? 0 : vector_groups(kernel_groups);
  BothFn both = nullptr;
  SingleFn single = nullptr;
  if (vg > 0 && models == Models::kBoth) both = pick_both(vg, in.log_weight != nullptr, with_ce);
  if (vg > 0 && models != Models::kBoth) {
    single = pick_single(vg, models == Models::kTeacher && in.log_weight != nullptr, with_ce);
  }
  if (both == nullptr && single == nullptr) {
    scalar_dense_row(in, row, local_target, models, with_ce, res, ce, sc);
    absent_model_slots(models, res, in.G);
    return;
  }
  // The vectorised kernel: groups [0, kernel_groups), or with the TARGET rule group 1 (every
  // class but the target) and the target class as group 0.
  Skips skip;
  if (target_rule && found) skip = Skips{&local_target, 1};
  GroupResult tmp[simd::kMaxVectorGroups];
  if (capture != nullptr) {
    pick_captured(in.log_weight != nullptr, with_ce)(in, row, skip, tmp, ce, capture);
  } else if (both != nullptr) {
    both(in, row, skip, tmp, ce);
  } else {
    const bool teacher = models == Models::kTeacher;
    single(in, teacher ? in.teacher : in.student, in.inv_t, row, skip, tmp, ce);
    if (teacher) {
      for (int k = 0; k < vg; ++k) {
        tmp[k].m_t = tmp[k].m_s;
        tmp[k].s_t = tmp[k].s_s;
      }
    }
  }
  std::copy(tmp, tmp + kernel_groups, target_rule ? res + 1 : res);
  if (target_rule && found) {
    target_class_group(in, row, local_target, models, res, sc);
    if (with_ce) ce->add(static_cast<double>(in.student.value(row, local_target)));
  }
  absent_model_slots(models, res, in.G);
}

// The student over all V in its groups (RENORMALIZE): into the student slots of res.
void student_all_classes(const RowInputs& in, int64_t row, int64_t local_target, bool with_ce,
                         GroupResult* res, Online* ce, Scratch& sc) {
  const Options& opt = in.opt;
  const bool target_rule = opt.group_rule == kGroupTarget;
  const int kernel_groups = opt.group_rule == kGroupClass ? in.G : 1;
  const int G = in.G;
  const bool found = local_target >= 0 && local_target < in.vocab;
  const int vg = force_scalar() ? 0 : vector_groups(kernel_groups);
  const SingleFn single = vg > 0 ? pick_single(vg, false, with_ce) : nullptr;
  sc.entries.assign(static_cast<size_t>(G), GroupResult());
  GroupResult* out = sc.entries.data();
  if (single == nullptr) {
    scalar_dense_row(in, row, local_target, Models::kStudent, with_ce, out, ce, sc);
  } else {
    Skips skip;
    if (target_rule && found) skip = Skips{&local_target, 1};
    GroupResult tmp[simd::kMaxVectorGroups];
    single(in, in.student, in.inv_t, row, skip, tmp, ce);
    std::copy(tmp, tmp + kernel_groups, target_rule ? out + 1 : out);
    if (target_rule && found) {
      const float b = in.student.value(row, local_target) * in.inv_t;
      two_pass(1, Models::kStudent, nullptr, [&](const auto& visit) { visit(0, b, 0.0, 0.0); },
               out, sc.sums);
      if (with_ce) ce->add(static_cast<double>(in.student.value(row, local_target)));
    }
  }
  for (int k = 0; k < G; ++k) {
    res[k].m_s = out[k].m_s;
    res[k].s_s = out[k].s_s;
  }
}

// BUCKET's group 1, the rest bucket [m_rest, s_rest, log r^T, no_rest, 0] (docs/design.md): the
// student's state over the classes that are no valid entry (their own max and sum, like any
// group's) and the teacher's log(1 - sum_j exp(lp_j)). Group 0 (the entries) is in res[0].
void bucket_rest(const RowInputs& in, int64_t row, const double* a, int64_t K, bool with_ce,
                 GroupResult* res, Online* ce, Scratch& sc) {
  // The valid entries' classes, sorted.
  sc.skip_cols.clear();
  for (int64_t j = 0; j < K; ++j) {
    if (sc.entry_valid[j]) sc.skip_cols.push_back(in.topk_indices.index(row, j));
  }
  std::sort(sc.skip_cols.begin(), sc.skip_cols.end());
  const bool no_rest = static_cast<int64_t>(sc.skip_cols.size()) == in.vocab;
  const SingleFn single = force_scalar() ? nullptr : pick_single(1, false, with_ce);
  double m_rest = -kInf, s_rest = 0.0;
  if (single != nullptr) {
    GroupResult rest[1];
    single(in, in.student, in.inv_t, row, Skips{sc.skip_cols.data(), sc.skip_cols.size()}, rest,
           ce);
    m_rest = rest[0].m_s;
    s_rest = rest[0].s_s;
  } else {
    // Two passes in float64 over the classes that are no entry.
    size_t next = 0;
    for (int pass = 0; pass < 2; ++pass) {
      next = 0;
      for (int64_t i = 0; i < in.vocab; ++i) {
        if (next < sc.skip_cols.size() && sc.skip_cols[next] == i) {
          ++next;
          continue;
        }
        const float x = in.student.value(row, i);
        const double b = static_cast<float>(x * in.inv_t);
        if (pass == 0) {
          m_rest = nan_max(m_rest, b);
          if (with_ce) ce->add(static_cast<double>(x));
        } else {
          s_rest += std::exp(b - ref(m_rest));
        }
      }
    }
  }
  if (with_ce) {
    for (const int64_t col : sc.skip_cols) ce->add(static_cast<double>(in.student.value(row, col)));
  }
  // The teacher's top log-sum lp_max + log1p(sum_{j != max} exp(lp_j - lp_max)), then log r^T.
  double lp_max = -kInf;
  for (int64_t j = 0; j < K; ++j) lp_max = nan_max(lp_max, a[j]);
  double others = 0.0;
  for (int64_t j = 0; j < K; ++j) others += std::exp(a[j] - ref(lp_max));
  others -= 1.0;
  if (others < -1.0) others = -1.0;
  const double log_top = lp_max + std::log1p(others);
  GroupResult& r = res[1];
  r = GroupResult();
  r.m_s = no_rest ? -kInf : m_rest;
  r.s_s = no_rest ? 0.0 : s_rest;
  r.m_t = no_rest ? -kInf : log1mexp(log_top);
  r.s_t = no_rest ? 1.0 : 0.0;
  r.g = 0.0;
}

void topk_row(const RowInputs& in, int64_t row, int64_t local_target, bool with_ce,
              GroupResult* res, Online* ce, Scratch& sc) {
  const Options& opt = in.opt;
  const int64_t K = in.topk;
  const int G = in.G;
  const bool bucket = opt.topk_rule == kTopkBucket;
  sc.entry_b.resize(static_cast<size_t>(K));
  sc.entry_a.resize(static_cast<size_t>(K));
  sc.entry_d.resize(static_cast<size_t>(K));
  sc.entry_group.resize(static_cast<size_t>(K));
  sc.entry_valid.resize(static_cast<size_t>(K));
  double* b = sc.entry_b.data();
  double* a = sc.entry_a.data();
  double* d = sc.entry_d.data();
  int* group = sc.entry_group.data();
  // The entries gather K student logits at scattered columns. RENORMALIZE reads the whole
  // student row first (its sums), so the gathers then hit the cache; the other rules prefetch
  // every entry's line before the gathers, so the K misses overlap instead of queueing (a
  // gather per entry from memory cost ~50 ns an entry, k = 64 at V = 32000 doubled the
  // forward's time).
  const bool student_first = in.has_student && opt.topk_rule == kTopkRenormalize;
  if (student_first) {
    student_all_classes(in, row, local_target, with_ce, res, ce, sc);
  } else if (in.has_student) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t idx = in.topk_indices.index(row, j);
      if (idx >= 0) simd::prefetch(in.student.at(row, idx));
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    const int64_t idx = in.topk_indices.index(row, j);
    const float lp = static_cast<float>(in.topk_logprobs.real(row, j));
    const bool valid = idx >= 0 && lp != -kInfF;
    sc.entry_valid[j] = valid;
    a[j] = -kInf;
    b[j] = -kInf;
    d[j] = 0.0;
    if (valid) {
      const float lw = in.log_weight != nullptr ? in.log_weight[idx] : 0.0f;
      float a_f = lp * in.inv_t;
      if (in.log_weight != nullptr) a_f += lw;
      a[j] = a_f;
      if (in.has_student) {
        const float x = in.student.value(row, idx);
        b[j] = x * in.inv_t;
        d[j] = (static_cast<double>(lp) - static_cast<double>(x)) * in.inv_t_double + lw;
      }
    }
    const int64_t col = idx < 0 ? 0 : idx;
    if ((bucket && in.has_student) || opt.group_rule == kGroupOne) {
      group[j] = 0;
    } else if (opt.group_rule == kGroupClass) {
      group[j] = in.class_group(col);
    } else {
      group[j] = col == local_target ? 0 : 1;
    }
  }
  auto entries = [&](const auto& visit) {
    for (int64_t j = 0; j < K; ++j) visit(group[j], b[j], a[j], d[j]);
  };

  if (!in.has_student) {  // teacher only: its slots over the entries, student slots 0
    two_pass(G, Models::kTeacher, nullptr, entries, res, sc.sums);
    absent_model_slots(Models::kTeacher, res, G);
    return;
  }
  if (opt.topk_rule == kTopkRestrict) {
    two_pass(G, Models::kBoth, nullptr, entries, res, sc.sums);
    if (with_ce) {
      GroupResult all[1];
      const SingleFn fn = force_scalar() ? nullptr : pick_single(1, false, false);
      if (fn != nullptr) {
        fn(in, in.student, 1.0f, row, Skips{}, all, nullptr);
        ce->m = all[0].m_s;
        ce->s = all[0].s_s;
      } else {
        for (int64_t i = 0; i < in.vocab; ++i) ce->add(in.student.value(row, i));
      }
    }
    return;
  }
  if (bucket) {
    // Group 0: the entries (both models); group 1: the rest bucket.
    two_pass(1, Models::kBoth, nullptr, entries, res, sc.sums);
    bucket_rest(in, row, a, K, with_ce, res, ce, sc);
    return;
  }
  // RENORMALIZE: the student over all V (its groups, above); the teacher and g over the
  // entries, g relative to the all-V student maxima.
  sc.student_ref.resize(static_cast<size_t>(G));
  for (int k = 0; k < G; ++k) {
    // A NaN sum (a NaN or +inf logit) makes the group's max NaN (as torch's amax), so g too.
    if (res[k].s_s != res[k].s_s && res[k].m_s != kInf) res[k].m_s = kNaN;
    sc.student_ref[k] = ref(res[k].m_s);
  }
  two_pass(G, Models::kBoth, sc.student_ref.data(), entries, res, sc.sums);
}

// The extras row: [the cross-entropy's max and sum, the target's logit, whether it is in V].
void store_extras(const RowInputs& in, int64_t row, int64_t local_target, bool found,
                  bool with_ce, const Online& ce, float* extras_row) {
  if (!in.has_target) return;
  extras_row[3] = found ? 1.0f : 0.0f;
  if (with_ce) {
    double m = ce.m;
    if (ce.s != ce.s && m != kInf) m = kNaN;
    extras_row[0] = static_cast<float>(m);
    extras_row[1] = static_cast<float>(ce.s);
    extras_row[2] = found ? in.student.value(row, local_target) : 0.0f;
  }
}

// `capture`: see dense_row (nullptr: none).
void states_row(const RowContext& ctx, int64_t row, float* state_row, float* extras_row,
                Scratch& sc, ExpCapture* capture = nullptr) {
  const RowInputs& in = ctx.in;
  const int G = in.G;
  std::fill(state_row, state_row + kSlots * G, 0.0f);
  std::fill(extras_row, extras_row + kExtras, 0.0f);
  if (!in.valid[row]) return;
  const Options& opt = in.opt;
  int64_t local_target = -1;
  bool found = false;
  if (in.has_target) {
    local_target = in.local_target(row);
    found = local_target >= 0 && local_target < in.vocab;
  }
  const bool with_ce = opt.with_ce() && in.has_target && in.has_student;
  if (in.has_topk && !topk_row_ok(in.topk_indices, row, in.topk, in.index_bound, sc.index_seen)) {
    int64_t seen = ctx.first_bad_row.load();
    while (row < seen && !ctx.first_bad_row.compare_exchange_weak(seen, row)) {
    }
    return;
  }
  sc.results.assign(static_cast<size_t>(G), GroupResult());
  GroupResult* res = sc.results.data();
  Online ce;
  if (in.has_topk) {
    topk_row(in, row, local_target, with_ce, res, &ce, sc);
  } else {
    dense_row(in, row, found, local_target, with_ce, res, &ce, sc, capture);
  }
  for (int k = 0; k < G; ++k) store_group(state_row, G, k, res[k]);
  store_extras(in, row, local_target, found, with_ce, ce, extras_row);
}

}  // namespace

bool captures_exps(const RowInputs& in) {
  if (force_scalar() || !in.has_student || !in.has_teacher || in.has_topk) return false;
  if (in.opt.group_rule == kGroupOne) return in.G == 1;
  return in.opt.group_rule == kGroupTarget && in.G == 2 && !in.opt.rebalance;
}

void captured_states_row(const RowInputs& in, int64_t row, float* state_row, float* extras_row,
                         ExpCapture& capture) {
  capture.chunks = 0;  // an invalid row is not walked
  capture.epoch_count = 0;
  capture.overflow = false;
  std::atomic<int64_t> no_topk{0};  // no top-k entries here: no bad row to report
  thread_local Scratch scratch;
  states_row(RowContext{in, no_topk}, row, state_row, extras_row, scratch, &capture);
}

void states_into(const RowInputs& in, float* state, float* extras) {
  std::atomic<int64_t> first_bad_row{std::numeric_limits<int64_t>::max()};
  const RowContext ctx{in, first_bad_row};
  const int64_t state_stride = static_cast<int64_t>(kSlots) * in.G;
  // Work per row: its classes, or its top-k entries without logits.
  const int64_t work = in.has_student || in.has_teacher ? in.vocab : std::max<int64_t>(in.topk, 1);
  for_each_task(in.rows, work, [&](int64_t first, int64_t last) {
    const auto scratch = std::make_unique<Scratch>();
    for (int64_t row = first; row < last; ++row) {
      states_row(ctx, row, state + row * state_stride, extras + row * kExtras, *scratch);
    }
  });
  const int64_t bad = first_bad_row.load();
  TORCH_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(),
                    "topk_indices values must lie in [-1, ", in.index_bound,
                    ") with no class repeated in a row; row ", bad, " is not");
}

}  // namespace gkl

std::tuple<at::Tensor, at::Tensor> grouped_kl_states(
    const std::optional<at::Tensor>& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const gkl::Options& opt) {
  const gkl::RowInputs in = gkl::prepare_row_inputs(student, teacher, topk_indices, topk_logprobs,
                                                    groups, target, class_weight, mask, opt,
                                                    /*for_grad=*/false);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor state = at::empty({in.rows, gkl::kSlots, in.G}, options);
  at::Tensor extras = at::empty({in.rows, gkl::kExtras}, options);
  gkl::states_into(in, state.data_ptr<float>(), extras.data_ptr<float>());
  return {state, extras};
}

}  // namespace ltkd
