// The grouped-KL operators of docs/design.md on the CPU: shared definitions.
//
//   states  (grouped_kl_states.cpp): one read of each logits row -> per row and group the state
//           [m^S, s^S, m^T, s^T, g] (N, 5, G) and the cross-entropy extras (N, 4);
//   finish  (grouped_kl_finish.cpp): the (N, G) arithmetic in log space (float64) -> the loss,
//           `saved` (G + 1) or a batch partial (2G + 2);
//   grad    (grouped_kl_grad.cpp): one more read of each row and one write of the gradient.
//
// Arguments are checked and converted once per call in grouped_kl_args.cpp (no ATen compute
// op: small inputs of any dtype are read through `View`, per-class tables are built in plain
// loops into buffers). Per-row math shared by finish and grad is in grouped_kl_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "rows.h"

namespace ltkd {
namespace gkl {

// The constants of ltkd_kernels/ops/config.py.
constexpr int kGroupOne = 0, kGroupClass = 1, kGroupTarget = 2;
constexpr int kTeacherDense = -1, kTopkRenormalize = 0, kTopkRestrict = 1, kTopkBucket = 2;
constexpr int kReduceNone = 0, kReduceSum = 1, kReduceMean = 2;
constexpr int kSlots = 5, kExtras = 4;
constexpr int64_t kMaxGroups = 1024;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();

// GroupedKLConfig, field for field (the bindings read the NamedTuple in this order).
struct Options {
  int64_t num_groups = 1;
  double temperature = 1.0;
  double alpha = 1.0;
  double beta = 1.0;
  bool rebalance = false;
  bool within_teacher = false;
  double ce_weight = 0.0;
  int64_t reduction = kReduceMean;
  int64_t group_rule = kGroupOne;
  int64_t topk_rule = kTeacherDense;
  int64_t vocab_offset = 0;
  int64_t vocab_total = 0;
  int64_t ignore_index = -100;
  double num_items = 0.0;
  bool denominator_from_partials = false;

  bool with_ce() const { return ce_weight != 0.0; }
};

// A read-only view of a small tensor (up to 3 dimensions) of any dtype, element by element.
struct View {
  const char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t stride[3] = {0, 0, 0};  // in bytes
  int64_t size[3] = {0, 0, 0};
  int dim = 0;
  bool present = false;

  View() = default;
  explicit View(const at::Tensor& t) : data(static_cast<const char*>(t.data_ptr())),
                                       dtype(t.scalar_type()), dim(static_cast<int>(t.dim())),
                                       present(true) {
    const int64_t element = static_cast<int64_t>(t.element_size());
    for (int d = 0; d < dim && d < 3; ++d) {
      stride[d] = t.stride(d) * element;
      size[d] = t.size(d);
    }
  }

  const char* at(int64_t i, int64_t j = 0, int64_t k = 0) const {
    return data + i * stride[0] + j * stride[1] + k * stride[2];
  }
  double real(int64_t i, int64_t j = 0, int64_t k = 0) const { return real_at(at(i, j, k)); }
  int64_t index(int64_t i, int64_t j = 0) const { return index_at(at(i, j)); }

  double real_at(const char* p) const {
    switch (dtype) {
      case at::kFloat: return *reinterpret_cast<const float*>(p);
      case at::kDouble: return *reinterpret_cast<const double*>(p);
      case at::kHalf: return static_cast<float>(*reinterpret_cast<const at::Half*>(p));
      case at::kBFloat16: return static_cast<float>(*reinterpret_cast<const at::BFloat16*>(p));
      default: return static_cast<double>(index_at(p));
    }
  }
  int64_t index_at(const char* p) const {
    switch (dtype) {
      case at::kLong: return *reinterpret_cast<const int64_t*>(p);
      case at::kInt: return *reinterpret_cast<const int32_t*>(p);
      case at::kShort: return *reinterpret_cast<const int16_t*>(p);
      case at::kChar: return *reinterpret_cast<const int8_t*>(p);
      case at::kByte: return *reinterpret_cast<const uint8_t*>(p);
      case at::kBool: return *reinterpret_cast<const bool*>(p) ? 1 : 0;
      case at::kUInt16: return *reinterpret_cast<const uint16_t*>(p);
      case at::kUInt32: return *reinterpret_cast<const uint32_t*>(p);
      case at::kUInt64: return static_cast<int64_t>(*reinterpret_cast<const uint64_t*>(p));
      default: return static_cast<int64_t>(real_at(p));
    }
  }
};

// Everything the row kernels of `states` and `grad` read, checked and converted.
struct RowInputs {
  Options opt;
  int64_t rows = 0;
  int64_t vocab = 0;      // V of the logits (or of groups / class_weight without logits)
  int64_t index_bound = 0;  // top-k indices must lie in [-1, index_bound)
  int G = 1;
  float inv_t = 1.0f;
  double inv_t_double = 1.0;
  bool has_student = false, has_teacher = false, has_topk = false;
  RowMatrix student, teacher;
  View topk_indices, topk_logprobs;
  int64_t topk = 0;  // K
  std::vector<float> group_id_buffer;  // CLASS: groups as float ids, (V,)
  std::vector<float> log_weight_buffer;  // log class_weight, (V,)
  const float* group_ids = nullptr;
  const float* log_weight = nullptr;
  View target;
  bool has_target = false;
  std::vector<uint8_t> valid;  // (N,) row validity

  // The target's local class (target - vocab_offset); may lie outside [0, V).
  int64_t local_target(int64_t row) const { return target.index(row) - opt.vocab_offset; }
  bool target_found(int64_t row) const {
    const int64_t t = local_target(row);
    return t >= 0 && t < vocab;
  }
  // Group of a class under the CLASS / ONE rules (TARGET is handled by the kernels).
  int class_group(int64_t col) const {
    return group_ids == nullptr ? 0 : static_cast<int>(group_ids[col]);
  }
};

RowInputs prepare_row_inputs(const std::optional<at::Tensor>& student,
                             const std::optional<at::Tensor>& teacher,
                             const std::optional<at::Tensor>& topk_indices,
                             const std::optional<at::Tensor>& topk_logprobs,
                             const std::optional<at::Tensor>& groups,
                             const std::optional<at::Tensor>& target,
                             const std::optional<at::Tensor>& class_weight,
                             const std::optional<at::Tensor>& mask, const Options& opt,
                             bool for_grad);

// The finish's inputs, checked.
struct FinishInputs {
  Options opt;
  int64_t rows = 0;
  int G = 1;
  View state, extras, sample_weight, group_logmass, batch_partials;
  bool has_target = false;
  std::vector<uint8_t> valid;
  bool has_num_items = false;
  double num_items = 0.0;
};

FinishInputs prepare_finish_inputs(const at::Tensor& state, const at::Tensor& extras,
                                   const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& sample_weight,
                                   const std::optional<at::Tensor>& group_logmass,
                                   const std::optional<at::Tensor>& batch_partials,
                                   const std::optional<at::Tensor>& num_items, const Options& opt);

// Row validity: (mask != 0) and (target != ignore_index), each factor where given.
std::vector<uint8_t> row_validity(int64_t rows, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& target, int64_t ignore_index);

// Top-k indices of one row: each in [-1, bound) and no class twice. `seen`: a bitmap of
// (bound + 63) / 64 words, all zero (sized on first use; left all zero).
bool topk_row_ok(const View& indices, int64_t row, int64_t k, int64_t bound,
                 std::vector<uint64_t>& seen);

// Kernels (the entry points of ltkd_cpu.h call these).
void states_into(const RowInputs& in, float* state, float* extras);
void finish_into(const FinishInputs& in, float* loss, float* saved);
void partial_into(const FinishInputs& in, float* partial);

// The reduction's denominator from this call's rows alone (no process group's partials): 1
// but for the mean, where it is num_items when given, else sum_{valid r} w_r (w =
// sample_weight or 1) summed in the order of the batch partial (blocks of block_rows(G) rows,
// then the blocks in order). The finish and the fused forward + gradient both take it.
double local_denominator(const FinishInputs& in);

// The exps of a row's states walk, kept for the gradient (the fused forward + gradient of
// grouped_kl_grad.cpp). Per chunk c of kWidth classes (classes [c kWidth, (c + 1) kWidth),
// the last chunk padded), in s, t and (with the cross-entropy) x:
//   e^S = exp(b - m^S_e), e^T = exp(a - m^T_e), e^X = exp(x - m^X_e)
// at the running maxima of the chunk's epoch e: epoch e covers the chunks from epochs[e].chunk
// to the next epoch's (a maximum moved between them). kNoMax (-FLT_MAX) is a maximum before
// any finite value. `overflow`: more epochs than kMaxEpochs (the row is then not usable).
struct ExpCapture {
  static constexpr int kMaxEpochs = 32;
  struct Epoch {
    int64_t chunk;
    float m_s, m_t, m_x;
  };
  float *s = nullptr, *t = nullptr, *x = nullptr;  // ceil(V / kWidth) kWidth floats each
  const float* gradient_row = nullptr;  // where the row's gradient goes (prefetched), or null
  int64_t chunks = 0;                              // chunks written
  Epoch epochs[kMaxEpochs];
  int epoch_count = 0;
  bool overflow = false;

  void add_epoch(int64_t chunk, float m_s, float m_t, float m_x) {
    if (epoch_count > 0 && epochs[epoch_count - 1].chunk == chunk) {
      epochs[epoch_count - 1] = Epoch{chunk, m_s, m_t, m_x};
    } else if (epoch_count < kMaxEpochs) {
      epochs[epoch_count++] = Epoch{chunk, m_s, m_t, m_x};
    } else {
      overflow = true;
    }
  }
};

// Whether captured_states_row serves these inputs: both models dense, on the vectorised
// kernels, with the one-group rule (KD, BKD) or the TARGET rule without rebalancing (DKD: the
// capture is group 1's, every class but the target).
bool captures_exps(const RowInputs& in);

// states_into's row `row` (its state and extras rows), its exps captured (an invalid row: zeros,
// nothing captured). Only where captures_exps(in).
void captured_states_row(const RowInputs& in, int64_t row, float* state_row, float* extras_row,
                         ExpCapture& capture);

// The per-call switch to the scalar (float64) kernels, for testing them against the
// vectorised ones.
bool force_scalar();
void set_force_scalar(bool on);

}  // namespace gkl
}  // namespace ltkd
