// Op 2 of docs/design.md, `finish`: from the (merged) state of every row, in float64 and log
// space, the batch statistic of LTKD's rebalancing, the row losses and their reduction.
//
// Rows are taken in fixed blocks (their size depends on G only): each block's batch partial
// and loss sum are formed in row order, and blocks are merged in block order, so the result
// is the same bits run to run and for any number of threads. Threads only start when the
// (N, G) work is large.
#include "grouped_kl.h"
#include "grouped_kl_math.h"
#include "ltkd_cpu.h"

namespace ltkd {
namespace gkl {
namespace {

// fn(block) for every block, on torch's threads when there is enough work.
template <typename Fn>
void for_each_block(int64_t blocks, int64_t work_per_block, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_block, 1));
  if (blocks <= grain || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < blocks; ++b) fn(b);
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

double row_weight(const FinishInputs& in, int64_t row) {
  return in.sample_weight.present ? in.sample_weight.real(row) : 1.0;
}

// sum_valid w over the rows [first, first + count), in row order.
double block_weight(const FinishInputs& in, int64_t first, int64_t count) {
  double weight = 0.0;
  for (int64_t r = first; r < first + count; ++r) {
    if (in.valid[r]) weight += row_weight(in, r);
  }
  return weight;
}

// The batch partial of the rows of a block (their teacher masses computed): [max_r log p^T_{r,k}
// (G), sum_r exp(log p^T_{r,k} - ref(max)) (G), n_valid, sum_valid w] over its valid rows, in
// row order.
void block_partial(const FinishInputs& in, RowBlock& rb, double* out) {
  const int G = in.G;
  const int64_t first = rb.first, count = rb.count;
  for (int k = 0; k < G; ++k) out[k] = -kInf;
  double rows_valid = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    if (!in.valid[first + i]) continue;
    for (int k = 0; k < G; ++k) out[k] = nan_max(out[k], rb.lp_t[i * G + k]);
    rows_valid += 1.0;
  }
  for (int64_t i = 0; i < count; ++i) {
    const bool valid = in.valid[first + i];
    for (int k = 0; k < G; ++k) {
      rb.work[i * G + k] = valid ? rb.lp_t[i * G + k] - ref(out[k]) : -kInf;
    }
  }
  vector_exp(rb.work, count * G);
  for (int k = 0; k < G; ++k) out[G + k] = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    if (!in.valid[first + i]) continue;
    for (int k = 0; k < G; ++k) out[G + k] += rb.work[i * G + k];
  }
  out[2 * G] = rows_valid;
  out[2 * G + 1] = block_weight(in, first, count);
}

// The batch partial of all rows: per block, then the blocks merged in order.
std::vector<double> own_partial(const FinishInputs& in) {
  const int G = in.G;
  const int64_t width = 2 * G + 2;
  const int64_t rows_in_block = block_rows(G);
  const int64_t blocks = (in.rows + rows_in_block - 1) / rows_in_block;
  std::vector<double> per_block(static_cast<size_t>(blocks * width));
  for_each_block(blocks, rows_in_block * G, [&](int64_t block) {
    const int64_t first = block * rows_in_block;
    const int64_t count = std::min(in.rows, first + rows_in_block) - first;
    RowBlock rb(G, count);
    rb.load(in.state, first, count);
    rb.masses(in.opt, in.group_logmass, /*student=*/false);
    block_partial(in, rb, per_block.data() + block * width);
  });
  std::vector<double> merged(static_cast<size_t>(width));
  for (int k = 0; k < G; ++k) {
    double top = -kInf;
    for (int64_t b = 0; b < blocks; ++b) top = nan_max(top, per_block[b * width + k]);
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      const double t = per_block[b * width + G + k];
      if (t != 0.0) total += t * std::exp(ref(per_block[b * width + k]) - ref(top));
    }
    merged[k] = top;
    merged[G + k] = total;
  }
  double count = 0.0, weight = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    count += per_block[b * width + 2 * G];
    weight += per_block[b * width + 2 * G + 1];
  }
  merged[2 * G] = count;
  merged[2 * G + 1] = weight;
  return merged;
}

// Merge (P, 2G + 2) partials in order: max, then rescaled sums; counts and weights added.
std::vector<double> merge_partials(const View& partials, int G) {
  const int64_t P = partials.size[0];
  std::vector<double> merged(static_cast<size_t>(2 * G + 2), 0.0);
  for (int k = 0; k < G; ++k) {
    double top = -kInf;
    for (int64_t p = 0; p < P; ++p) top = nan_max(top, partials.real(p, k));
    double total = 0.0;
    for (int64_t p = 0; p < P; ++p) {
      const double t = partials.real(p, G + k);
      if (t != 0.0) total += t * std::exp(ref(partials.real(p, k)) - ref(top));
    }
    merged[k] = P == 0 ? -kInf : top;
    merged[G + k] = total;
  }
  for (int64_t p = 0; p < P; ++p) {
    merged[2 * G] += partials.real(p, 2 * G);
    merged[2 * G + 1] += partials.real(p, 2 * G + 1);
  }
  return merged;
}

// log s_k = log mean_{nonempty j} pB_j - log pB_k (-inf for an empty group).
std::vector<double> log_rebalance_scale(const std::vector<double>& partial, int G) {
  const double count = std::max(partial[2 * G], 1.0);
  std::vector<double> log_pb(static_cast<size_t>(G)), out(static_cast<size_t>(G));
  for (int k = 0; k < G; ++k) {
    log_pb[k] = ref(partial[k]) + std::log(partial[G + k]) - std::log(count);
  }
  std::vector<double> masked(static_cast<size_t>(G));
  double nonempty = 0.0;
  for (int k = 0; k < G; ++k) {
    const bool has = log_pb[k] != -kInf;
    masked[k] = has ? log_pb[k] : -kInf;
    nonempty += has ? 1.0 : 0.0;
  }
  const double log_mean = logsumexp(masked.data(), G) - std::log(std::max(nonempty, 1.0));
  for (int k = 0; k < G; ++k) out[k] = log_pb[k] != -kInf ? log_mean - log_pb[k] : -kInf;
  return out;
}

}  // namespace

double local_denominator(const FinishInputs& in) {
  const Options& opt = in.opt;
  if (opt.reduction != kReduceMean) return 1.0;
  if (in.has_num_items) return in.num_items;
  if (opt.num_items > 0.0) return static_cast<float>(opt.num_items);
  const int64_t rows_in_block = block_rows(in.G);
  double total = 0.0;  // the blocks' weights added in order, as own_partial merges them
  for (int64_t first = 0; first < in.rows; first += rows_in_block) {
    total += block_weight(in, first, std::min(rows_in_block, in.rows - first));
  }
  return total;
}

void partial_into(const FinishInputs& in, float* partial) {
  const std::vector<double> own = own_partial(in);
  for (size_t i = 0; i < own.size(); ++i) partial[i] = static_cast<float>(own[i]);
}

void finish_into(const FinishInputs& in, float* loss, float* saved) {
  const Options& opt = in.opt;
  const int G = in.G;
  const bool bucket = opt.topk_rule == kTopkBucket;
  const bool rebalance = opt.rebalance && !bucket;
  const bool mean = opt.reduction == kReduceMean;
  const bool partials_given = in.batch_partials.present;
  // The mean's denominator from every rank's rows (a process group's partials), else from
  // this call's (local_denominator).
  const bool denominator_from_partials = mean && !in.has_num_items && !(opt.num_items > 0.0) &&
                                         partials_given && opt.denominator_from_partials;
  const int64_t rows_in_block = block_rows(G);
  const int64_t blocks = (in.rows + rows_in_block - 1) / rows_in_block;
  // One block (a small call): its masses serve both the batch partial and the row losses.
  std::unique_ptr<RowBlock> single;
  if (blocks == 1) {
    single = std::make_unique<RowBlock>(G, in.rows);
    single->load(in.state, 0, in.rows);
    single->masses(opt, in.group_logmass);
  }
  // This call's own batch partial, where the rebalancing needs it (a denominator alone is the
  // partial's weight sum, formed without the masses below).
  std::vector<double> own, merged;
  if (rebalance && !partials_given) {
    if (single) {
      own.assign(static_cast<size_t>(2 * G + 2), 0.0);
      block_partial(in, *single, own.data());
    } else {
      own = own_partial(in);
    }
  }
  if (partials_given) merged = merge_partials(in.batch_partials, G);
  std::vector<double> log_scale(static_cast<size_t>(G), 0.0);
  if (rebalance) log_scale = log_rebalance_scale(partials_given ? merged : own, G);

  const double denominator =
      denominator_from_partials ? merged[2 * G + 1] : local_denominator(in);

  std::vector<double> block_sums(static_cast<size_t>(blocks), 0.0);
  const bool per_row = opt.reduction == kReduceNone;
  for_each_block(blocks, rows_in_block * G, [&](int64_t block) {
    const int64_t first = block * rows_in_block;
    const int64_t last = std::min(in.rows, first + rows_in_block);
    std::unique_ptr<RowBlock> own_block;
    RowBlock* block_rows_math = single.get();
    if (block_rows_math == nullptr) {
      own_block = std::make_unique<RowBlock>(G, last - first);
      own_block->load(in.state, first, last - first);
      own_block->masses(opt, in.group_logmass);
      block_rows_math = own_block.get();
    }
    RowBlock& rb = *block_rows_math;
    rb.log_ratios();
    if (!bucket && !(G == 1 && !in.group_logmass.present)) rb.rebalanced(opt, log_scale.data());
    double total = 0.0;
    for (int64_t r = first; r < last; ++r) {
      double contribution = 0.0;
      if (in.valid[r]) {
        const double row = rb.row_loss(opt, in.has_target, in.extras, in.group_logmass, r - first);
        contribution = row_weight(in, r) * row;
      }
      if (per_row) {
        loss[r] = static_cast<float>(contribution);
      } else {
        total += contribution;
      }
    }
    block_sums[block] = total;
  });
  if (!per_row) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += block_sums[b];
    if (mean) total = denominator != 0.0 ? total / denominator : 0.0;
    loss[0] = static_cast<float>(total);
  }
  for (int k = 0; k < G; ++k) saved[k] = static_cast<float>(log_scale[k]);
  saved[G] = static_cast<float>(denominator);
}

}  // namespace gkl

namespace {

at::TensorOptions float_options() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> grouped_kl_finish(
    const at::Tensor& state, const at::Tensor& extras, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass,
    const std::optional<at::Tensor>& batch_partials, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt) {
  const gkl::FinishInputs in = gkl::prepare_finish_inputs(
      state, extras, mask, target, sample_weight, group_logmass, batch_partials, num_items, opt);
  at::Tensor loss = opt.reduction == gkl::kReduceNone ? at::empty({in.rows}, float_options())
                                                      : at::empty({}, float_options());
  at::Tensor saved = at::empty({in.G + 1}, float_options());
  gkl::finish_into(in, loss.data_ptr<float>(), saved.data_ptr<float>());
  return {loss, saved};
}

at::Tensor grouped_kl_partial(const at::Tensor& state, const at::Tensor& extras,
                              const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& target,
                              const std::optional<at::Tensor>& sample_weight,
                              const std::optional<at::Tensor>& group_logmass,
                              const gkl::Options& opt) {
  const gkl::FinishInputs in = gkl::prepare_finish_inputs(
      state, extras, mask, target, sample_weight, group_logmass, std::nullopt, std::nullopt, opt);
  at::Tensor partial = at::empty({2 * in.G + 2}, float_options());
  gkl::partial_into(in, partial.data_ptr<float>());
  return partial;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_kl_loss_forward(
    const std::optional<at::Tensor>& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt) {
  auto [state, extras] = grouped_kl_states(student, teacher, topk_indices, topk_logprobs, groups,
                                           target, class_weight, mask, opt);
  auto [loss, saved] = grouped_kl_finish(state, extras, mask, target, sample_weight,
                                         group_logmass, std::nullopt, num_items, opt);
  return {loss, state, extras, saved};
}

}  // namespace ltkd
