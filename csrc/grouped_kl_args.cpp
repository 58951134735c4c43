// Argument checks and preparation of the grouped-KL operators.
//
// The functional layer validates user input; these checks keep a direct call from crashing or
// reading out of bounds. Bad indices raise ValueError (TORCH_CHECK_VALUE) naming the argument:
// a group id outside [0, G) ("groups"), a valid row's target outside [0, V_total) that is not
// ignore_index when the target is used ("target"), a top-k index outside [-1, V) or repeated
// in a row ("topk_indices", checked per row by the kernels). Per-class tables (float group ids,
// log class weights) are built here in plain loops: no ATen compute op runs in a call.
#include "grouped_kl.h"

#include <atomic>
#include <cmath>

namespace ltkd {
namespace gkl {
namespace {

std::atomic<bool> g_force_scalar{false};

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

void check_logits(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D (N, V), got ", x.dim(), " dimensions");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                    " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x.size(0) == 0 || x.size(1) <= 1 || x.stride(1) == 1, name,
                    " must have unit stride along V");
  TORCH_CHECK_VALUE(x.size(0) <= 1 || x.stride(0) >= 0, name,
                    " must have a non-negative row stride");
}

void check_vector(const at::Tensor& t, int64_t length, const char* name, bool floating) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, name, " must have shape (", length,
                    ",), got ", t.sizes());
  if (floating) {
    TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), name, " must be a float tensor, got ",
                      t.scalar_type());
  } else {
    TORCH_CHECK_VALUE(is_index_dtype(t.scalar_type()) || t.scalar_type() == at::kBool, name,
                      " must be an integer tensor, got ", t.scalar_type());
  }
}

}  // namespace

bool force_scalar() { return g_force_scalar.load(std::memory_order_relaxed); }
void set_force_scalar(bool on) { g_force_scalar.store(on); }

std::vector<uint8_t> row_validity(int64_t rows, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& target, int64_t ignore_index) {
  std::vector<uint8_t> valid(static_cast<size_t>(rows), 1);
  if (mask.has_value()) {
    check_vector(*mask, rows, "mask", false);
    const View m(*mask);
    for (int64_t r = 0; r < rows; ++r) valid[r] = m.index(r) != 0;
  }
  if (target.has_value()) {
    check_vector(*target, rows, "target", false);
    TORCH_CHECK_VALUE(target->scalar_type() != at::kBool, "target must be an integer tensor");
    const View t(*target);
    for (int64_t r = 0; r < rows; ++r) {
      if (t.index(r) == ignore_index) valid[r] = 0;
    }
  }
  return valid;
}

bool topk_row_ok(const View& indices, int64_t row, int64_t k, int64_t bound,
                 std::vector<uint64_t>& seen) {
  // A bitmap of the classes seen, all zero between rows: O(k), where sorting a copy of the
  // indices cost ~1 us a row at k = 64 (in the forward and again in the backward).
  const size_t words = static_cast<size_t>((bound + 63) / 64);
  if (seen.size() < words) seen.assign(words, 0);
  bool ok = true;
  int64_t j = 0;
  for (; j < k; ++j) {
    const int64_t idx = indices.index(row, j);
    if (idx < -1 || idx >= bound) {
      ok = false;
      break;
    }
    if (idx < 0) continue;
    uint64_t& word = seen[static_cast<size_t>(idx >> 6)];
    const uint64_t bit = uint64_t{1} << (idx & 63);
    if (word & bit) {
      ok = false;
      break;
    }
    word |= bit;
  }
  // Every bit set belongs to this row's entries before j: zero their words.
  for (int64_t i = 0; i < j; ++i) {
    const int64_t idx = indices.index(row, i);
    if (idx >= 0) seen[static_cast<size_t>(idx >> 6)] = 0;
  }
  return ok;
}

RowInputs prepare_row_inputs(const std::optional<at::Tensor>& student,
                             const std::optional<at::Tensor>& teacher,
                             const std::optional<at::Tensor>& topk_indices,
                             const std::optional<at::Tensor>& topk_logprobs,
                             const std::optional<at::Tensor>& groups,
                             const std::optional<at::Tensor>& target,
                             const std::optional<at::Tensor>& class_weight,
                             const std::optional<at::Tensor>& mask, const Options& opt,
                             bool for_grad) {
  RowInputs in;
  in.opt = opt;
  TORCH_CHECK_VALUE(opt.num_groups >= 1 && opt.num_groups <= kMaxGroups,
                    "num_groups must be in [1, ", kMaxGroups, "], got ", opt.num_groups);
  TORCH_CHECK_VALUE(opt.temperature > 0.0 && std::isfinite(opt.temperature),
                    "temperature must be a positive number, got ", opt.temperature);
  TORCH_CHECK_VALUE(opt.group_rule >= kGroupOne && opt.group_rule <= kGroupTarget,
                    "unknown group rule ", opt.group_rule);
  TORCH_CHECK_VALUE(opt.topk_rule >= kTeacherDense && opt.topk_rule <= kTopkBucket,
                    "unknown top-k rule ", opt.topk_rule);
  TORCH_CHECK_VALUE(opt.group_rule != kGroupTarget || opt.num_groups >= 2,
                    "the TARGET group rule needs num_groups >= 2, got ", opt.num_groups);
  TORCH_CHECK_VALUE(opt.topk_rule != kTopkBucket || opt.num_groups == 2,
                    "the BUCKET top-k rule has num_groups == 2, got ", opt.num_groups);
  in.G = static_cast<int>(opt.num_groups);
  in.inv_t_double = 1.0 / opt.temperature;
  in.inv_t = static_cast<float>(in.inv_t_double);
  const bool dense = opt.topk_rule == kTeacherDense;

  in.has_student = student.has_value();
  in.has_teacher = dense && teacher.has_value();
  in.has_topk = !dense;
  if (for_grad) TORCH_CHECK_VALUE(in.has_student, "the gradient needs the student logits");
  if (in.has_student) check_logits(*student, "student");
  if (in.has_teacher) check_logits(*teacher, "teacher");
  if (in.has_student && in.has_teacher) {
    TORCH_CHECK_VALUE(student->sizes() == teacher->sizes(),
                      "student and teacher must have the same shape, got ", student->sizes(),
                      " and ", teacher->sizes());
  }
  if (for_grad && dense) {
    TORCH_CHECK_VALUE(in.has_teacher, "the gradient needs the teacher logits (or a top-k teacher)");
  }
  if (in.has_topk) {
    TORCH_CHECK_VALUE(topk_indices.has_value() && topk_logprobs.has_value(),
                      "a top-k rule needs topk_indices and topk_logprobs");
    check_cpu(*topk_indices, "topk_indices");
    check_cpu(*topk_logprobs, "topk_logprobs");
    TORCH_CHECK_VALUE(topk_indices->dim() == 2 && topk_logprobs->sizes() == topk_indices->sizes(),
                      "topk_indices and topk_logprobs must be (N, K) tensors of one shape, got ",
                      topk_indices->sizes(), " and ", topk_logprobs->sizes());
    TORCH_CHECK_VALUE(is_index_dtype(topk_indices->scalar_type()),
                      "topk_indices must be an integer tensor, got ", topk_indices->scalar_type());
    TORCH_CHECK_VALUE(is_float_dtype(topk_logprobs->scalar_type()),
                      "topk_logprobs must be a float tensor, got ", topk_logprobs->scalar_type());
    in.topk_indices = View(*topk_indices);
    in.topk_logprobs = View(*topk_logprobs);
    in.topk = topk_indices->size(1);
  }
  TORCH_CHECK_VALUE(in.has_student || in.has_teacher || in.has_topk,
                    "states needs the student, the teacher or a top-k teacher");
  TORCH_CHECK_VALUE(!opt.with_ce() || !target.has_value() || in.has_student,
                    "the cross-entropy (ce_weight != 0) needs the student logits");

  if (in.has_student) {
    in.rows = student->size(0);
    in.vocab = student->size(1);
  } else if (in.has_teacher) {
    in.rows = teacher->size(0);
    in.vocab = teacher->size(1);
  } else {
    in.rows = topk_indices->size(0);
    if (groups.has_value()) {
      in.vocab = groups->dim() == 1 ? groups->size(0) : 0;
    } else if (class_weight.has_value()) {
      in.vocab = class_weight->dim() == 1 ? class_weight->size(0) : 0;
    } else {
      in.vocab = opt.vocab_total > 0 ? opt.vocab_total : std::numeric_limits<int64_t>::max();
    }
  }
  in.index_bound = in.vocab;
  if (in.has_topk) {
    TORCH_CHECK_VALUE(in.topk_indices.size[0] == in.rows, "topk_indices must have ", in.rows,
                      " rows, got ", in.topk_indices.size[0]);
  }
  if (in.has_student) in.student = RowMatrix(*student);
  if (in.has_teacher) in.teacher = RowMatrix(*teacher);
  const bool bounded_vocab = in.vocab != std::numeric_limits<int64_t>::max();

  if (opt.group_rule == kGroupClass) {
    TORCH_CHECK_VALUE(groups.has_value(), "the CLASS group rule needs groups");
    check_vector(*groups, in.vocab, "groups", false);
    const View g(*groups);
    in.group_id_buffer.resize(static_cast<size_t>(in.vocab));
    for (int64_t i = 0; i < in.vocab; ++i) {
      const int64_t id = g.index(i);
      TORCH_CHECK_VALUE(id >= 0 && id < opt.num_groups, "groups values must lie in [0, ",
                        opt.num_groups, "), got ", id, " at class ", i);
      // Float ids are exact below 2^24 and compare lane-wise with float logits.
      in.group_id_buffer[static_cast<size_t>(i)] = static_cast<float>(id);
    }
    in.group_ids = in.group_id_buffer.data();
  }
  if (class_weight.has_value()) {
    TORCH_CHECK_VALUE(bounded_vocab, "class_weight needs the vocabulary size");
    check_vector(*class_weight, in.vocab, "class_weight", true);
    const View w(*class_weight);
    in.log_weight_buffer.resize(static_cast<size_t>(in.vocab));
    for (int64_t i = 0; i < in.vocab; ++i) {
      in.log_weight_buffer[static_cast<size_t>(i)] = std::log(static_cast<float>(w.real(i)));
    }
    in.log_weight = in.log_weight_buffer.data();
  }

  in.valid = row_validity(in.rows, mask, target, opt.ignore_index);
  TORCH_CHECK_VALUE(opt.group_rule != kGroupTarget || target.has_value(),
                    "the TARGET group rule needs target");
  if (target.has_value()) {
    in.target = View(*target);
    in.has_target = true;
    // A valid row's target: a class of this call's V (shifted by vocab_offset), or of the whole
    // vocabulary [0, vocab_total) when this call is one shard of it.
    const int64_t local_vocab = bounded_vocab ? in.vocab : std::numeric_limits<int64_t>::max();
    for (int64_t r = 0; r < in.rows; ++r) {
      if (!in.valid[r]) continue;
      const int64_t t = in.target.index(r);
      if (opt.vocab_total > 0) {
        TORCH_CHECK_VALUE(t >= 0 && t < opt.vocab_total, "target values must lie in [0, ",
                          opt.vocab_total, ") or equal ignore_index (", opt.ignore_index,
                          "), got ", t, " in row ", r);
      } else {
        const int64_t local = t - opt.vocab_offset;
        TORCH_CHECK_VALUE(local >= 0 && local < local_vocab, "target values must lie in [",
                          opt.vocab_offset, ", ", opt.vocab_offset + in.vocab,
                          ") or equal ignore_index (", opt.ignore_index, "), got ", t,
                          " in row ", r);
      }
    }
  }
  return in;
}

FinishInputs prepare_finish_inputs(const at::Tensor& state, const at::Tensor& extras,
                                   const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& sample_weight,
                                   const std::optional<at::Tensor>& group_logmass,
                                   const std::optional<at::Tensor>& batch_partials,
                                   const std::optional<at::Tensor>& num_items, const Options& opt) {
  FinishInputs in;
  in.opt = opt;
  TORCH_CHECK_VALUE(opt.num_groups >= 1 && opt.num_groups <= kMaxGroups,
                    "num_groups must be in [1, ", kMaxGroups, "], got ", opt.num_groups);
  TORCH_CHECK_VALUE(opt.topk_rule != kTopkBucket || opt.num_groups == 2,
                    "the BUCKET top-k rule has num_groups == 2, got ", opt.num_groups);
  TORCH_CHECK_VALUE(opt.reduction >= kReduceNone && opt.reduction <= kReduceMean,
                    "unknown reduction ", opt.reduction);
  in.G = static_cast<int>(opt.num_groups);
  check_cpu(state, "state");
  TORCH_CHECK_VALUE(state.dim() == 3 && state.size(1) == kSlots && state.size(2) == in.G,
                    "state must have shape (N, 5, ", in.G, "), got ", state.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(state.scalar_type()), "state must be a float tensor");
  in.rows = state.size(0);
  check_cpu(extras, "extras");
  TORCH_CHECK_VALUE(extras.dim() == 2 && extras.size(0) == in.rows && extras.size(1) == kExtras,
                    "extras must have shape (", in.rows, ", 4), got ", extras.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(extras.scalar_type()), "extras must be a float tensor");
  in.state = View(state);
  in.extras = View(extras);
  in.valid = row_validity(in.rows, mask, target, opt.ignore_index);
  in.has_target = target.has_value();
  if (sample_weight.has_value()) {
    check_vector(*sample_weight, in.rows, "sample_weight", true);
    in.sample_weight = View(*sample_weight);
  }
  if (group_logmass.has_value()) {
    check_cpu(*group_logmass, "group_logmass");
    TORCH_CHECK_VALUE(group_logmass->dim() == 2 && group_logmass->size(0) == in.rows &&
                          group_logmass->size(1) == in.G,
                      "group_logmass must have shape (", in.rows, ", ", in.G, "), got ",
                      group_logmass->sizes());
    TORCH_CHECK_VALUE(is_float_dtype(group_logmass->scalar_type()),
                      "group_logmass must be a float tensor");
    in.group_logmass = View(*group_logmass);
  }
  if (batch_partials.has_value()) {
    check_cpu(*batch_partials, "batch_partials");
    TORCH_CHECK_VALUE(batch_partials->dim() == 2 && batch_partials->size(1) == 2 * in.G + 2,
                      "batch_partials must have shape (P, ", 2 * in.G + 2, "), got ",
                      batch_partials->sizes());
    TORCH_CHECK_VALUE(is_float_dtype(batch_partials->scalar_type()),
                      "batch_partials must be a float tensor");
    in.batch_partials = View(*batch_partials);
  }
  if (num_items.has_value()) {
    check_cpu(*num_items, "num_items");
    TORCH_CHECK_VALUE(num_items->numel() == 1, "num_items must hold one value, got shape ",
                      num_items->sizes());
    const at::Tensor& n = *num_items;
    View v;
    v.data = static_cast<const char*>(n.data_ptr());
    v.dtype = n.scalar_type();
    v.present = true;
    // As torch: the value in the state's dtype (float32).
    in.num_items = static_cast<float>(v.real_at(v.data));
    in.has_num_items = true;
  }
  return in;
}

}  // namespace gkl
}  // namespace ltkd
