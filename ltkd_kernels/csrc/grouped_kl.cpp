// C++ CPU kernels of the grouped KL: one machinery behind LTKD, KD, DKD and BKD.
//
// The same algorithm as ltkd_kernels/triton/grouped_kl_kernels.py, one row per task:
//
//   stats: in one read of each row, per group k the online log-sum-exps lse_k = m_k + log s_k
//     (running max m_k, s_k = sum_{i in k} exp(x_i - m_k)) of b = z^S / T and
//     a = z^T / T (+ log w), and the within-group KL
//       KL_k = sum_{i in k} pt^T_i [(a_i - m^T_k) - (b_i - m^S_k)] + log s^S_k - log s^T_k,
//     its sum accumulated at the running maxima (shifted when a max moves);
//   grad: one more read of each row and one write of
//     (coef^S_{g(i)} pt^S_i - coef^T_{g(i)} pt^T_i) / T + gce (softmax(z^S)_i - [i = t]).
//
// A row is walked in blocks of kBlock classes (converted to float32 in an L1 buffer when the
// logits are float16/bfloat16; float32 rows are read in place) and each block in chunks of
// simd::kWidth lanes. Each lane keeps its own per-group sums, all at one per-group running max:
// when a chunk holds a value above its group's max (rare after the first few chunks) the max is
// raised and the sums are rescaled. Lane sums are added in a fixed order at the end of the row,
// and a row is reduced by one thread, so results do not depend on the thread count. Per element
// and model: one exp, a compare, and a (masked) add per group; per-group values are looked up
// from one register (a permute on AVX-512), never gathered from memory.
//
// How a class maps to a group (as in the Triton kernels): `groups` (V,) given: groups[i]; else
// `group_target` (N,) given: group 0 is the row's target class, group 1 the rest; else one group.
// Up to simd::kMaxVectorGroups groups run vectorised; more groups (and option combinations no
// loss uses) take a scalar loop with the same semantics.
//
// -inf conventions, matching the Triton kernels: a -inf logit adds 0 to every sum; a group with
// no finite logit has lse -inf; a teacher group with no mass has within_kl 0; a student group
// with no mass where the teacher has mass has within_kl +inf. Rows with row_valid false get zero
// statistics and a zero gradient. Running maxima start at -FLT_MAX rather than -inf so that
// exp(-inf - max) is 0 without a select.
#include "ltkd_cpu.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ltkd {
namespace {

using simd::kWidth;
using simd::Vec;

// Classes per block: a multiple of kWidth and of the 2 x kWidth half-precision vectors.
constexpr int64_t kBlock = 1024;
constexpr float kNoMax = -FLT_MAX;
// Prefetch this many floats ahead of the chunk being read.
constexpr int64_t kPrefetchAhead = 256;
// Gradients from this size on are written with non-temporal stores (larger than the caches
// they would otherwise evict).
constexpr size_t kStreamMinBytes = size_t{32} << 20;

// ---------------------------------------------------------------------------------------------
// Reading rows as float32 and writing the gradient in the student's dtype.

struct RowMatrix {
  const char* data;       // first element
  int64_t row_bytes;      // row stride in bytes
  at::ScalarType dtype;   // float32, float16 or bfloat16; unit stride along V
  int64_t element_bytes;

  explicit RowMatrix(const at::Tensor& t)
      : data(static_cast<const char*>(t.data_ptr())),
        row_bytes(t.stride(0) * static_cast<int64_t>(t.element_size())),
        dtype(t.scalar_type()),
        element_bytes(static_cast<int64_t>(t.element_size())) {}

  const void* at(int64_t row, int64_t col) const {
    return data + row * row_bytes + col * element_bytes;
  }

  // Classes [start, start + n) of `row` as float32: in place for float32, else converted into
  // `buffer` (kBlock floats).
  const float* block(int64_t row, int64_t start, int64_t n, float* buffer) const {
    const void* src = at(row, start);
    if (dtype == at::kFloat) return static_cast<const float*>(src);
    if (dtype == at::kHalf) {
      convert_to_float(static_cast<const at::Half*>(src), buffer, n);
    } else {
      convert_to_float(static_cast<const at::BFloat16*>(src), buffer, n);
    }
    return buffer;
  }

  template <typename scalar_t>
  static void convert_to_float(const scalar_t* src, float* dst, int64_t n) {
    using FVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + FVec::size() <= n; i += FVec::size()) {
      simd::prefetch(src + i + kPrefetchAhead);
      FVec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
};

// Write n float32 values to a gradient row of dtype `dtype`.
void store_from_float(const float* src, at::ScalarType dtype, void* dst, int64_t n) {
  if (dtype == at::kHalf) {
    at::vec::convert(src, static_cast<at::Half*>(dst), n);
  } else if (dtype == at::kBFloat16) {
    at::vec::convert(src, static_cast<at::BFloat16*>(dst), n);
  } else {
    std::copy(src, src + n, static_cast<float*>(dst));
  }
}

// Ask for transparent huge pages on a large, freshly allocated output: first-touch faults on
// 4 KiB pages cost about as much as computing the gradient. Advisory (errors ignored); torch's
// THP_MEM_ALLOC_ENABLE=1 does the same for every large allocation.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < 4 * kHugePage) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (first + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (first + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

void fill_zero(at::ScalarType dtype, void* dst, int64_t n) {
  std::memset(dst, 0, static_cast<size_t>(n) * (dtype == at::kFloat ? 4 : 2));
}

// ---------------------------------------------------------------------------------------------
// Arguments shared by the row functions.

struct GroupedKLArgs {
  RowMatrix student;
  RowMatrix teacher;
  const float* group_ids;           // (V,) float copy of `groups`, or nullptr
  const int64_t* group_target;      // (N,) class of group 0 per row, or nullptr
  const float* teacher_log_weight;  // (V,) log w added to a, or nullptr
  const int64_t* ce_target;         // (N,) cross-entropy target, or nullptr
  const bool* row_valid;            // (N,), or nullptr (all rows valid)
  int64_t vocab;
  int num_groups;
  float inv_temperature;
};

// The group ids of classes [start, start + n) as floats: from `groups`, built for the DKD
// split (target -> 0, rest -> 1), or all 0 for one group.
const float* block_group_ids(const GroupedKLArgs& args, int64_t row, int64_t start, int64_t n,
                             float* buffer) {
  if (args.group_ids != nullptr) return args.group_ids + start;
  if (args.group_target != nullptr) {
    std::fill(buffer, buffer + n, 1.0f);
    const int64_t target = args.group_target[row];
    if (target >= start && target < start + n) buffer[target - start] = 0.0f;
  } else {
    std::fill(buffer, buffer + n, 0.0f);
  }
  return buffer;
}

// One chunk of kWidth classes, padded past the end of the row: logits -inf (add nothing to
// any sum), log weight 0, group 0.
struct PaddedChunk {
  alignas(64) float student[kWidth];
  alignas(64) float teacher[kWidth];
  alignas(64) float log_weight[kWidth];
  alignas(64) float group_ids[kWidth];
  alignas(64) float out[kWidth];

  void fill(const float* x, const float* t, const float* lw, const float* gid, int64_t n) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < kWidth; ++i) {
      const bool in_row = i < n;
      student[i] = in_row ? x[i] : neg_inf;
      teacher[i] = in_row ? t[i] : neg_inf;
      log_weight[i] = in_row && lw != nullptr ? lw[i] : 0.0f;
      group_ids[i] = in_row && gid != nullptr ? gid[i] : 0.0f;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Vectorised statistics (G <= kMaxVectorGroups).

// The reference point of the within-group KL terms: a group's running max, 0 while it has no
// finite logit (as the Triton kernel's -inf max read as 0).
inline float max_reference(float max) { return max == kNoMax ? 0.0f : max; }

// Raise running maxima to cover `values` (lanes with group ids `group_ids`). Scalar: the rare
// path, a new record in a group.
template <int G>
LTKD_ALWAYS_INLINE void raise_maxima(Vec values, const float* group_ids, float* max) {
  alignas(64) float lanes[kWidth];
  simd::store(lanes, values);
  for (int i = 0; i < kWidth; ++i) {
    const int k = G == 1 ? 0 : static_cast<int>(group_ids[i]);
    if (lanes[i] > max[k]) max[k] = lanes[i];
  }
}

template <int G>
inline Vec group_values(const simd::GroupTable<G>& table, const float* scalars,
                        const simd::GroupLanes<G>* lanes) {
  if constexpr (G == 1) {
    return simd::set1(scalars[0]);
  } else {
    return simd::lookup(table, *lanes);
  }
}

template <int G>
inline Vec add_in_group(Vec acc, Vec x, const simd::GroupLanes<G>* lanes, int k) {
  if constexpr (G == 1) {
    return simd::add(acc, x);
  } else {
    return simd::masked_add(acc, lanes->in_group[k], x);
  }
}

// A row's running statistics, per group k and lane: the running maxima m^S_k, m^T_k and
//   sum_student[k] = sum exp(b_i - m^S_k),  sum_teacher[k] = sum exp(a_i - m^T_k),
//   gap[k]         = sum exp(a_i - m^T_k) [(a_i - m^T_k) - (b_i - m^S_k)],
// so that KL_k = gap / s^T + log s^S - log s^T. Taking the terms relative to the maxima keeps
// them small (a one-class group gives exactly 0) instead of differences of large lse values.
template <int G, bool kLogWeight, bool kCrossEntropy>
struct StatsRowState {
  float max_student[G];
  float max_teacher[G];
  simd::GroupTable<G> max_student_table;
  simd::GroupTable<G> max_teacher_table;
  Vec sum_student[G];
  Vec sum_teacher[G];
  Vec gap[G];
  float raw_max;  // online logsumexp of the raw student logits (cross-entropy)
  Vec raw_sum;

  void init() {
    for (int k = 0; k < G; ++k) {
      max_student[k] = kNoMax;
      max_teacher[k] = kNoMax;
      sum_student[k] = simd::zero();
      sum_teacher[k] = simd::zero();
      gap[k] = simd::zero();
    }
    max_student_table.set(max_student);
    max_teacher_table.set(max_teacher);
    raw_max = kNoMax;
    raw_sum = simd::zero();
  }

  // New records in b or a: move every group's sums to the new maxima. The gap terms shift by
  // drift = (m^S_new - m^S_old) - (m^T_new - m^T_old), weighted by the teacher's old sum.
  LTKD_ALWAYS_INLINE void raise(Vec b, Vec a, const float* gid) {
    float new_student[G], new_teacher[G];
    std::copy(max_student, max_student + G, new_student);
    std::copy(max_teacher, max_teacher + G, new_teacher);
    raise_maxima<G>(b, gid, new_student);
    raise_maxima<G>(a, gid, new_teacher);
    for (int k = 0; k < G; ++k) {
      // Every group is updated (with factors 1 and drift 0 when unchanged): no data-dependent
      // index into the lane sums, so they stay in registers.
      const float rescale_student =
          new_student[k] > max_student[k] ? std::exp(max_student[k] - new_student[k]) : 1.0f;
      const float rescale_teacher =
          new_teacher[k] > max_teacher[k] ? std::exp(max_teacher[k] - new_teacher[k]) : 1.0f;
      const float drift = (max_reference(new_student[k]) - max_reference(max_student[k])) -
                          (max_reference(new_teacher[k]) - max_reference(max_teacher[k]));
      if (drift != 0.0f) gap[k] = simd::fmadd(sum_teacher[k], simd::set1(drift), gap[k]);
      gap[k] = simd::mul(gap[k], simd::set1(rescale_teacher));
      sum_student[k] = simd::mul(sum_student[k], simd::set1(rescale_student));
      sum_teacher[k] = simd::mul(sum_teacher[k], simd::set1(rescale_teacher));
      max_student[k] = new_student[k];
      max_teacher[k] = new_teacher[k];
    }
    max_student_table.set(max_student);
    max_teacher_table.set(max_teacher);
  }

  // One chunk of kWidth classes: x raw student logits, t raw teacher logits, lw log weights,
  // gid float group ids (G > 1).
  LTKD_ALWAYS_INLINE void chunk(const float* x, const float* t, const float* lw,
                                const float* gid, Vec inv_temperature) {
    const Vec raw = simd::load(x);
    const Vec b = simd::mul(raw, inv_temperature);
    Vec a = simd::mul(simd::load(t), inv_temperature);
    if constexpr (kLogWeight) a = simd::add(a, simd::load(lw));
    if constexpr (G == 1) {
      update(raw, b, a, gid, nullptr);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      update(raw, b, a, gid, &lanes);
    }
  }

  LTKD_ALWAYS_INLINE void update(Vec raw, Vec b, Vec a, const float* gid,
                                 const simd::GroupLanes<G>* lanes) {
    Vec max_b = group_values<G>(max_student_table, max_student, lanes);
    Vec max_a = group_values<G>(max_teacher_table, max_teacher, lanes);
    if (simd::any(simd::either(simd::greater(b, max_b), simd::greater(a, max_a)))) {
      raise(b, a, gid);
      max_b = group_values<G>(max_student_table, max_student, lanes);
      max_a = group_values<G>(max_teacher_table, max_teacher, lanes);
    }
    const Vec shifted_b = simd::sub(b, max_b);
    const Vec shifted_a = simd::sub(a, max_a);
    const Vec exp_b = simd::exp(shifted_b);
    const Vec exp_a = simd::exp(shifted_a);
    // 0 * gap stays 0 where the teacher has no mass, even when the gap is inf or NaN. (A group
    // still at kNoMax has only -inf logits so far: its shifted values are -inf, as with the
    // Triton kernel's reference 0.)
    const Vec zero = simd::zero();
    const Vec gap_terms = simd::select(simd::greater(exp_a, zero),
                                       simd::mul(exp_a, simd::sub(shifted_a, shifted_b)), zero);
    for (int k = 0; k < G; ++k) {
      sum_student[k] = add_in_group<G>(sum_student[k], exp_b, lanes, k);
      sum_teacher[k] = add_in_group<G>(sum_teacher[k], exp_a, lanes, k);
      gap[k] = add_in_group<G>(gap[k], gap_terms, lanes, k);
    }
    if constexpr (kCrossEntropy) {
      Vec max_raw = simd::set1(raw_max);
      if (simd::any(simd::greater(raw, max_raw))) {
        float new_max[1] = {raw_max};
        raise_maxima<1>(raw, nullptr, new_max);
        raw_sum = simd::mul(raw_sum, simd::set1(std::exp(raw_max - new_max[0])));
        raw_max = new_max[0];
        max_raw = simd::set1(raw_max);
      }
      raw_sum = simd::add(raw_sum, simd::exp(simd::sub(raw, max_raw)));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Outputs of the statistics, and the per-group finish shared by both paths.

struct StatsOutputs {
  float* lse_student;  // (N, G)
  float* lse_teacher;  // (N, G)
  float* within_kl;    // (N, G)
  float* ce;           // (N,) or nullptr
  float* lse_raw;      // (N,) or nullptr
};

// lse_k = m_k + log s_k (-inf for an empty group: m stays -FLT_MAX and s is 0) and
// KL_k = gap / s^T + log s^S - log s^T.
inline void store_group_statistics(const StatsOutputs& out, int64_t index, float max_student,
                                   float sum_student, float max_teacher, float sum_teacher,
                                   float gap) {
  const float log_sum_student = std::log(sum_student);
  const float log_sum_teacher = std::log(sum_teacher);
  const float lse_student = max_student + log_sum_student;
  out.lse_student[index] = lse_student;
  out.lse_teacher[index] = max_teacher + log_sum_teacher;
  float within = gap / sum_teacher + log_sum_student - log_sum_teacher;
  // A student group with no mass where the teacher has some: +inf.
  if (lse_student == -std::numeric_limits<float>::infinity()) {
    within = std::numeric_limits<float>::infinity();
  }
  // A teacher group with no mass: nothing to match, 0 (also for a NaN sum, as the Triton kernel).
  out.within_kl[index] = sum_teacher > 0.0f ? within : 0.0f;
}

inline void store_cross_entropy(const GroupedKLArgs& args, const StatsOutputs& out, int64_t row,
                                float lse_raw) {
  const int64_t target = args.ce_target[row];
  float target_logit;
  const void* p = args.student.at(row, target);
  if (args.student.dtype == at::kFloat) {
    target_logit = *static_cast<const float*>(p);
  } else if (args.student.dtype == at::kHalf) {
    target_logit = static_cast<float>(*static_cast<const at::Half*>(p));
  } else {
    target_logit = static_cast<float>(*static_cast<const at::BFloat16*>(p));
  }
  out.ce[row] = lse_raw - target_logit;
  out.lse_raw[row] = lse_raw;
}

template <int G, bool kLogWeight, bool kCrossEntropy>
void stats_row_vectorized(const GroupedKLArgs& args, const StatsOutputs& out, int64_t row) {
  alignas(64) float student_buffer[kBlock];
  alignas(64) float teacher_buffer[kBlock];
  alignas(64) float group_buffer[kBlock];
  PaddedChunk tail;
  StatsRowState<G, kLogWeight, kCrossEntropy> state;
  state.init();
  const Vec inv_temperature = simd::set1(args.inv_temperature);
  for (int64_t start = 0; start < args.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, args.vocab - start);
    const float* x = args.student.block(row, start, n, student_buffer);
    const float* t = args.teacher.block(row, start, n, teacher_buffer);
    const float* lw = kLogWeight ? args.teacher_log_weight + start : nullptr;
    const float* gid = G > 1 ? block_group_ids(args, row, start, n, group_buffer) : nullptr;
    const int64_t full = n / kWidth * kWidth;
    for (int64_t j = 0; j < full; j += kWidth) {
      simd::prefetch(x + j + kPrefetchAhead);
      simd::prefetch(t + j + kPrefetchAhead);
      state.chunk(x + j, t + j, kLogWeight ? lw + j : nullptr, G > 1 ? gid + j : nullptr,
                  inv_temperature);
    }
    if (full < n) {
      tail.fill(x + full, t + full, kLogWeight ? lw + full : nullptr,
                G > 1 ? gid + full : nullptr, n - full);
      state.chunk(tail.student, tail.teacher, tail.log_weight, tail.group_ids, inv_temperature);
    }
  }
  const int64_t base = row * G;
  for (int k = 0; k < G; ++k) {
    store_group_statistics(out, base + k, state.max_student[k],
                           simd::reduce_add(state.sum_student[k]), state.max_teacher[k],
                           simd::reduce_add(state.sum_teacher[k]), simd::reduce_add(state.gap[k]));
  }
  if constexpr (kCrossEntropy) {
    store_cross_entropy(args, out, row, state.raw_max + std::log(simd::reduce_add(state.raw_sum)));
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar statistics: any number of groups and any option combination. One running sum per
// group (not per lane), so the sums are kept in float64.

void stats_row_scalar(const GroupedKLArgs& args, const StatsOutputs& out, int64_t row,
                      std::vector<float>& maxima, std::vector<double>& sums) {
  alignas(64) float student_buffer[kBlock];
  alignas(64) float teacher_buffer[kBlock];
  alignas(64) float group_buffer[kBlock];
  const int G = args.num_groups;
  maxima.assign(static_cast<size_t>(2 * G), kNoMax);
  sums.assign(static_cast<size_t>(3 * G), 0.0);
  float* max_s = maxima.data();
  float* max_t = max_s + G;
  double* sum_s = sums.data();
  double* sum_t = sum_s + G;
  double* gap = sum_t + G;
  float raw_max = kNoMax;
  double raw_sum = 0.0;
  const float inv_t = args.inv_temperature;
  for (int64_t start = 0; start < args.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, args.vocab - start);
    const float* x = args.student.block(row, start, n, student_buffer);
    const float* t = args.teacher.block(row, start, n, teacher_buffer);
    const float* gid = block_group_ids(args, row, start, n, group_buffer);
    for (int64_t i = 0; i < n; ++i) {
      const int k = static_cast<int>(gid[i]);
      const float b = x[i] * inv_t;
      float a = t[i] * inv_t;
      if (args.teacher_log_weight != nullptr) a += args.teacher_log_weight[start + i];
      // The same online update as the vectorised path, one class at a time.
      const float new_s = b > max_s[k] ? b : max_s[k];
      const float new_t = a > max_t[k] ? a : max_t[k];
      if (new_s != max_s[k] || new_t != max_t[k]) {
        const double rescale_t = std::exp(max_t[k] - new_t);
        const double drift = (max_reference(new_s) - max_reference(max_s[k])) -
                             (max_reference(new_t) - max_reference(max_t[k]));
        gap[k] = (gap[k] + sum_t[k] * drift) * rescale_t;
        sum_s[k] *= std::exp(max_s[k] - new_s);
        sum_t[k] *= rescale_t;
        max_s[k] = new_s;
        max_t[k] = new_t;
      }
      const float shifted_b = b - max_s[k], shifted_a = a - max_t[k];
      const float exp_a = std::exp(shifted_a);
      sum_s[k] += std::exp(shifted_b);
      sum_t[k] += exp_a;
      if (exp_a > 0.0f) gap[k] += exp_a * (shifted_a - shifted_b);
      if (args.ce_target != nullptr) {
        if (x[i] > raw_max) {
          raw_sum *= std::exp(raw_max - x[i]);
          raw_max = x[i];
        }
        raw_sum += std::exp(x[i] - raw_max);
      }
    }
  }
  const int64_t base = row * G;
  for (int k = 0; k < G; ++k) {
    store_group_statistics(out, base + k, max_s[k], static_cast<float>(sum_s[k]), max_t[k],
                           static_cast<float>(sum_t[k]), static_cast<float>(gap[k]));
  }
  if (args.ce_target != nullptr) {
    store_cross_entropy(args, out, row, raw_max + static_cast<float>(std::log(raw_sum)));
  }
}

// ---------------------------------------------------------------------------------------------
// Gradient.

struct GradInputs {
  const float* lse_student;   // (N, G)
  const float* lse_teacher;   // (N, G)
  const float* coef_student;  // (N, G)
  const float* coef_teacher;  // (N, G)
  const float* lse_raw;       // (N,) or nullptr
  const float* grad_ce;       // (N,) or nullptr
  char* grad;                 // (N, V) contiguous, the student's dtype
  at::ScalarType grad_dtype;
  int64_t grad_element_bytes;
  bool stream;  // float32 rows 64-byte aligned and the output large: non-temporal stores
};

inline float finite_or_zero_if_neg_inf(float lse) {
  return lse == -std::numeric_limits<float>::infinity() ? 0.0f : lse;
}

// kStream: the float32 gradient row is 64-byte aligned and written with non-temporal stores.
template <int G, bool kLogWeight, bool kCrossEntropy, bool kStream>
void grad_row_vectorized_impl(const GroupedKLArgs& args, const GradInputs& in, int64_t row) {
  alignas(64) float student_buffer[kBlock];
  alignas(64) float teacher_buffer[kBlock];
  alignas(64) float group_buffer[kBlock];
  alignas(64) float out_buffer[kBlock];
  PaddedChunk tail;
  // Per group: exp(x - lse) must be 0 at x = -inf even when the whole group is -inf (lse -inf),
  // so such an lse is replaced by 0; 1/T is folded into the coefficients.
  float lse_s[G], lse_t[G], coef_s[G], coef_t[G];
  for (int k = 0; k < G; ++k) {
    lse_s[k] = finite_or_zero_if_neg_inf(in.lse_student[row * G + k]);
    lse_t[k] = finite_or_zero_if_neg_inf(in.lse_teacher[row * G + k]);
    coef_s[k] = in.coef_student[row * G + k] * args.inv_temperature;
    coef_t[k] = in.coef_teacher[row * G + k] * args.inv_temperature;
  }
  simd::GroupTable<G> lse_s_table, lse_t_table, coef_s_table, coef_t_table;
  lse_s_table.set(lse_s);
  lse_t_table.set(lse_t);
  coef_s_table.set(coef_s);
  coef_t_table.set(coef_t);
  const Vec inv_temperature = simd::set1(args.inv_temperature);
  float grad_ce = 0.0f;
  Vec grad_ce_vec = simd::zero(), lse_raw_vec = simd::zero();
  int64_t ce_target = -1;
  if constexpr (kCrossEntropy) {
    grad_ce = in.grad_ce[row];
    grad_ce_vec = simd::set1(grad_ce);
    lse_raw_vec = simd::set1(finite_or_zero_if_neg_inf(in.lse_raw[row]));
    ce_target = args.ce_target[row];
  }
  char* grad_row = in.grad + row * args.vocab * in.grad_element_bytes;
  const bool write_in_place = in.grad_dtype == at::kFloat;

  auto chunk = [&](const float* x, const float* t, const float* lw,
                   const float* gid) LTKD_ALWAYS_INLINE_LAMBDA {
    const Vec raw = simd::load(x);
    const Vec b = simd::mul(raw, inv_temperature);
    Vec a = simd::mul(simd::load(t), inv_temperature);
    if constexpr (kLogWeight) a = simd::add(a, simd::load(lw));
    Vec ls, lt, cs, ct;
    if constexpr (G == 1) {
      ls = simd::set1(lse_s[0]);
      lt = simd::set1(lse_t[0]);
      cs = simd::set1(coef_s[0]);
      ct = simd::set1(coef_t[0]);
    } else {
      const simd::GroupLanes<G> lanes(simd::load(gid));
      ls = simd::lookup(lse_s_table, lanes);
      lt = simd::lookup(lse_t_table, lanes);
      cs = simd::lookup(coef_s_table, lanes);
      ct = simd::lookup(coef_t_table, lanes);
    }
    const Vec p_student = simd::exp(simd::sub(b, ls));
    const Vec p_teacher = simd::exp(simd::sub(a, lt));
    Vec grad = simd::sub(simd::mul(cs, p_student), simd::mul(ct, p_teacher));
    if constexpr (kCrossEntropy) {
      grad = simd::fmadd(grad_ce_vec, simd::exp(simd::sub(raw, lse_raw_vec)), grad);
    }
    return grad;
  };

  for (int64_t start = 0; start < args.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, args.vocab - start);
    const float* x = args.student.block(row, start, n, student_buffer);
    const float* t = args.teacher.block(row, start, n, teacher_buffer);
    const float* lw = kLogWeight ? args.teacher_log_weight + start : nullptr;
    const float* gid = G > 1 ? block_group_ids(args, row, start, n, group_buffer) : nullptr;
    float* out = write_in_place ? reinterpret_cast<float*>(grad_row) + start : out_buffer;
    const int64_t full = n / kWidth * kWidth;
    for (int64_t j = 0; j < full; j += kWidth) {
      simd::prefetch(x + j + kPrefetchAhead);
      simd::prefetch(t + j + kPrefetchAhead);
      const Vec grad =
          chunk(x + j, t + j, kLogWeight ? lw + j : nullptr, G > 1 ? gid + j : nullptr);
      if constexpr (kStream) {
        simd::stream_store(out + j, grad);
      } else {
        simd::store(out + j, grad);
      }
    }
    if (full < n) {
      tail.fill(x + full, t + full, kLogWeight ? lw + full : nullptr,
                G > 1 ? gid + full : nullptr, n - full);
      simd::store(tail.out, chunk(tail.student, tail.teacher, tail.log_weight, tail.group_ids));
      std::copy(tail.out, tail.out + (n - full), out + full);
    }
    if (kCrossEntropy && ce_target >= start && ce_target < start + n) {
      out[ce_target - start] -= grad_ce;  // the - [i = t] of d ce / d z_i
    }
    if (!write_in_place) {
      store_from_float(out, in.grad_dtype, grad_row + start * in.grad_element_bytes, n);
    }
  }
}

template <int G, bool kLogWeight, bool kCrossEntropy>
void grad_row_vectorized(const GroupedKLArgs& args, const GradInputs& in, int64_t row) {
  // Streaming is chosen per call; the cross-entropy fix-up re-reads the row, so it never streams.
  if (!kCrossEntropy && in.stream) {
    grad_row_vectorized_impl<G, kLogWeight, kCrossEntropy, true>(args, in, row);
  } else {
    grad_row_vectorized_impl<G, kLogWeight, kCrossEntropy, false>(args, in, row);
  }
}

void grad_row_scalar(const GroupedKLArgs& args, const GradInputs& in, int64_t row) {
  alignas(64) float student_buffer[kBlock];
  alignas(64) float teacher_buffer[kBlock];
  alignas(64) float group_buffer[kBlock];
  alignas(64) float out_buffer[kBlock];
  const int64_t G = args.num_groups;
  const float inv_t = args.inv_temperature;
  const bool has_ce = args.ce_target != nullptr;
  const float grad_ce = has_ce ? in.grad_ce[row] : 0.0f;
  const float lse_raw = has_ce ? finite_or_zero_if_neg_inf(in.lse_raw[row]) : 0.0f;
  const int64_t ce_target = has_ce ? args.ce_target[row] : -1;
  char* grad_row = in.grad + row * args.vocab * in.grad_element_bytes;
  for (int64_t start = 0; start < args.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, args.vocab - start);
    const float* x = args.student.block(row, start, n, student_buffer);
    const float* t = args.teacher.block(row, start, n, teacher_buffer);
    const float* gid = block_group_ids(args, row, start, n, group_buffer);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = row * G + static_cast<int64_t>(gid[i]);
      const float b = x[i] * inv_t;
      float a = t[i] * inv_t;
      if (args.teacher_log_weight != nullptr) a += args.teacher_log_weight[start + i];
      const float p_student = std::exp(b - finite_or_zero_if_neg_inf(in.lse_student[k]));
      const float p_teacher = std::exp(a - finite_or_zero_if_neg_inf(in.lse_teacher[k]));
      float grad = in.coef_student[k] * inv_t * p_student - in.coef_teacher[k] * inv_t * p_teacher;
      if (has_ce) grad += grad_ce * std::exp(x[i] - lse_raw);
      out_buffer[i] = grad;
    }
    if (has_ce && ce_target >= start && ce_target < start + n) {
      out_buffer[ce_target - start] -= grad_ce;
    }
    store_from_float(out_buffer, in.grad_dtype, grad_row + start * in.grad_element_bytes, n);
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch to the row functions.

using StatsRowFn = void (*)(const GroupedKLArgs&, const StatsOutputs&, int64_t);
using GradRowFn = void (*)(const GroupedKLArgs&, const GradInputs&, int64_t);

template <int G>
void pick_for_groups(int num_groups, bool log_weight, bool cross_entropy, StatsRowFn& stats,
                     GradRowFn& grad) {
  if constexpr (G <= simd::kMaxVectorGroups) {
    if (num_groups != G) {
      pick_for_groups<G + 1>(num_groups, log_weight, cross_entropy, stats, grad);
      return;
    }
    if (!log_weight && !cross_entropy) {
      stats = &stats_row_vectorized<G, false, false>;
      grad = &grad_row_vectorized<G, false, false>;
    } else if constexpr (G == 1) {  // BKD: one group, log w, optional cross-entropy
      if (log_weight && cross_entropy) {
        stats = &stats_row_vectorized<1, true, true>;
        grad = &grad_row_vectorized<1, true, true>;
      } else if (log_weight) {
        stats = &stats_row_vectorized<1, true, false>;
        grad = &grad_row_vectorized<1, true, false>;
      } else {
        stats = &stats_row_vectorized<1, false, true>;
        grad = &grad_row_vectorized<1, false, true>;
      }
    }
  }
}

// The vectorised row functions for this configuration, or nullptr (the scalar path).
void pick_row_functions(const GroupedKLArgs& args, StatsRowFn& stats, GradRowFn& grad) {
  stats = nullptr;
  grad = nullptr;
  pick_for_groups<1>(args.num_groups, args.teacher_log_weight != nullptr,
                     args.ce_target != nullptr, stats, grad);
}

// ---------------------------------------------------------------------------------------------
// Argument checks: the functional layer validates user input; these keep a direct call of the
// operator from crashing or reading out of bounds.

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (N, V), got ", x.dim(), " dimensions");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, " must have unit stride along V");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, name, " must have a non-negative row stride");
}

const int64_t* index_vector(const std::optional<at::Tensor>& t, int64_t length, int64_t bound,
                            const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                  t->size(0) == length && t->is_contiguous(),
              name, " must be a contiguous CPU int64 tensor of shape (", length, ",)");
  const int64_t* p = t->data_ptr<int64_t>();
  for (int64_t i = 0; i < length; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, " values must lie in [0, ", bound, "), got ",
                p[i]);
  }
  return p;
}

struct PreparedArgs {
  GroupedKLArgs args;
  at::Tensor group_ids;  // keeps the float copy of `groups` alive
};

PreparedArgs prepare(const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& groups,
                     const std::optional<at::Tensor>& group_target,
                     const std::optional<at::Tensor>& teacher_log_weight,
                     const std::optional<at::Tensor>& ce_target,
                     const std::optional<at::Tensor>& row_valid, int64_t num_groups,
                     double temperature) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student and teacher must have the same shape");
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(vocab >= 1, "the logits need V >= 1 classes");
  TORCH_CHECK(num_groups >= 1 && num_groups < (1 << 24), "num_groups must be in [1, 2^24), got ",
              num_groups);
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
  at::Tensor group_ids;
  if (groups.has_value()) {
    const at::Tensor& g = *groups;
    TORCH_CHECK(g.device().is_cpu() && g.dim() == 1 && g.size(0) == vocab &&
                    at::isIntegralType(g.scalar_type(), /*includeBool=*/false),
                "groups must be a CPU integer tensor of shape (", vocab, ",)");
    const at::Tensor g64 = g.to(at::kLong).contiguous();
    index_vector(g64, vocab, num_groups, "groups");
    // Float ids are exact below 2^24 and compare lane-wise with float logits.
    group_ids = g64.to(at::kFloat);
  } else {
    TORCH_CHECK(group_target.has_value() ? num_groups == 2 : num_groups >= 1,
                "with group_target the grouped KL has 2 groups, got num_groups=", num_groups);
  }
  const float* log_weight = nullptr;
  if (teacher_log_weight.has_value()) {
    const at::Tensor& w = *teacher_log_weight;
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 &&
                    w.size(0) == vocab && w.is_contiguous(),
                "teacher_log_weight must be a contiguous CPU float32 tensor of shape (", vocab,
                ",)");
    log_weight = w.data_ptr<float>();
  }
  const bool* valid = nullptr;
  if (row_valid.has_value()) {
    const at::Tensor& m = *row_valid;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 1 &&
                    m.size(0) == rows && m.is_contiguous(),
                "row_valid must be a contiguous CPU bool tensor of shape (", rows, ",)");
    valid = m.data_ptr<bool>();
  }
  GroupedKLArgs args{RowMatrix(student),
                     RowMatrix(teacher),
                     group_ids.defined() ? group_ids.data_ptr<float>() : nullptr,
                     groups.has_value() ? nullptr
                                        : index_vector(group_target, rows, vocab, "group_target"),
                     log_weight,
                     index_vector(ce_target, rows, vocab, "ce_target"),
                     valid,
                     vocab,
                     static_cast<int>(num_groups),
                     static_cast<float>(1.0 / temperature)};
  return {args, group_ids};
}

// Rows per task: about 64K classes, so that small problems do not pay for threads.
int64_t rows_per_task(int64_t vocab) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
}

// Run row_fn(row) for every row on torch's intra-op threads. Threads take tasks of consecutive
// rows from a shared counter (a thread the OS preempts takes fewer, instead of holding up a
// fixed half of the rows); each row is computed whole by one thread, so the results do not
// depend on the number of threads or on which thread took a task.
template <typename RowFn>
void for_each_row(int64_t rows, int64_t vocab, const RowFn& row_fn) {
  const int64_t task = rows_per_task(vocab);
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, rows, task, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t first = next_row.fetch_add(task);
      if (first >= rows) break;
      const int64_t last = std::min(rows, first + task);
      for (int64_t row = first; row < last; ++row) row_fn(row);
    }
    simd::stream_fence();
  });
}

inline bool row_is_valid(const GroupedKLArgs& args, int64_t row) {
  return args.row_valid == nullptr || args.row_valid[row];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_kl_stats(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& group_target,
    const std::optional<at::Tensor>& teacher_log_weight,
    const std::optional<at::Tensor>& ce_target, const std::optional<at::Tensor>& row_valid,
    int64_t num_groups, double temperature) {
  const PreparedArgs prepared = prepare(student, teacher, groups, group_target, teacher_log_weight,
                                        ce_target, row_valid, num_groups, temperature);
  const GroupedKLArgs& args = prepared.args;
  const int64_t rows = student.size(0);
  const auto float_options = student.options().dtype(at::kFloat);
  at::Tensor lse_student = at::empty({rows, num_groups}, float_options);
  at::Tensor lse_teacher = at::empty({rows, num_groups}, float_options);
  at::Tensor within_kl = at::empty({rows, num_groups}, float_options);
  const int64_t ce_rows = ce_target.has_value() ? rows : 0;
  at::Tensor ce = at::empty({ce_rows}, float_options);
  at::Tensor lse_raw = at::empty({ce_rows}, float_options);
  const StatsOutputs out{lse_student.data_ptr<float>(), lse_teacher.data_ptr<float>(),
                         within_kl.data_ptr<float>(), ce_rows ? ce.data_ptr<float>() : nullptr,
                         ce_rows ? lse_raw.data_ptr<float>() : nullptr};
  StatsRowFn stats_row;
  GradRowFn unused;
  pick_row_functions(args, stats_row, unused);
  for_each_row(rows, args.vocab, [&](int64_t row) {
    thread_local std::vector<float> maxima;
    thread_local std::vector<double> sums;
    if (!row_is_valid(args, row)) {
      // Neutral statistics for a masked row: finite, so nothing downstream turns into NaN.
      std::fill(out.lse_student + row * num_groups, out.lse_student + (row + 1) * num_groups, 0.0f);
      std::fill(out.lse_teacher + row * num_groups, out.lse_teacher + (row + 1) * num_groups, 0.0f);
      std::fill(out.within_kl + row * num_groups, out.within_kl + (row + 1) * num_groups, 0.0f);
      if (ce_rows) {
        out.ce[row] = 0.0f;
        out.lse_raw[row] = 0.0f;
      }
    } else if (stats_row != nullptr) {
      stats_row(args, out, row);
    } else {
      stats_row_scalar(args, out, row, maxima, sums);
    }
  });
  return {lse_student, lse_teacher, within_kl, ce, lse_raw};
}

at::Tensor grouped_kl_grad(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& group_target,
    const std::optional<at::Tensor>& teacher_log_weight,
    const std::optional<at::Tensor>& ce_target, const std::optional<at::Tensor>& row_valid,
    int64_t num_groups, double temperature, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, const at::Tensor& coef_student, const at::Tensor& coef_teacher,
    const at::Tensor& lse_raw, const at::Tensor& grad_ce) {
  const PreparedArgs prepared = prepare(student, teacher, groups, group_target, teacher_log_weight,
                                        ce_target, row_valid, num_groups, temperature);
  const GroupedKLArgs& args = prepared.args;
  const int64_t rows = student.size(0), vocab = student.size(1);
  for (const at::Tensor* stat : {&lse_student, &lse_teacher, &coef_student, &coef_teacher}) {
    TORCH_CHECK(stat->device().is_cpu() && stat->scalar_type() == at::kFloat &&
                    stat->is_contiguous() && stat->dim() == 2 && stat->size(0) == rows &&
                    stat->size(1) == num_groups,
                "the grouped-KL statistics must be contiguous CPU float32 (", rows, ", ",
                num_groups, ") tensors");
  }
  const bool has_ce = ce_target.has_value();
  if (has_ce) {
    for (const at::Tensor* stat : {&lse_raw, &grad_ce}) {
      TORCH_CHECK(stat->device().is_cpu() && stat->scalar_type() == at::kFloat &&
                      stat->is_contiguous() && stat->dim() == 1 && stat->size(0) == rows,
                  "lse_raw and grad_ce must be contiguous CPU float32 (", rows, ",) tensors");
    }
  }
  at::Tensor grad = at::empty({rows, vocab}, student.options());
  advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.nbytes()));
  const GradInputs in{lse_student.data_ptr<float>(),
                      lse_teacher.data_ptr<float>(),
                      coef_student.data_ptr<float>(),
                      coef_teacher.data_ptr<float>(),
                      has_ce ? lse_raw.data_ptr<float>() : nullptr,
                      has_ce ? grad_ce.data_ptr<float>() : nullptr,
                      static_cast<char*>(grad.data_ptr()),
                      grad.scalar_type(),
                      static_cast<int64_t>(grad.element_size()),
                      simd::kHasStreamStore && grad.scalar_type() == at::kFloat &&
                          vocab % simd::kWidth == 0 &&
                          reinterpret_cast<uintptr_t>(grad.data_ptr()) % 64 == 0 &&
                          grad.nbytes() >= kStreamMinBytes};
  StatsRowFn unused;
  GradRowFn grad_row;
  pick_row_functions(args, unused, grad_row);
  for_each_row(rows, vocab, [&](int64_t row) {
    if (!row_is_valid(args, row)) {
      fill_zero(in.grad_dtype, in.grad + row * vocab * in.grad_element_bytes, vocab);
    } else if (grad_row != nullptr) {
      grad_row(args, in, row);
    } else {
      grad_row_scalar(args, in, row);
    }
  });
  return grad;
}

}  // namespace ltkd
