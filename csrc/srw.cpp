// C++ CPU kernel of SRW (sample-wise re-weighting), O(B P D), deterministic.
//
// Per image b of features f (B, P, D) and an optional (B, P) mask of the patches to use:
//
//   fh_i = f_i / max(||f_i||, eps)
//   m = mean over unmasked i of fh_i
//   avesim_i = fh_i . m                       (= mean_j fh_i . fh_j, never the P x P matrix)
//   w = softmax over unmasked i of (-avesim_i / tau); masked patches get 0,
//       an image with every patch masked gets all zeros.
//
// Two passes over the features: (1) norms and per-chunk partial sums of fh, (2) the dots with
// the image's mean. Patches are split into fixed chunks of kPatchChunk, the unit of parallel
// work; partial sums are combined in chunk order, so results do not depend on the thread count.
// Accumulation in float32 within a patch and a chunk; the long sums over chunks (the mean) and
// over patches (the softmax's denominator) in float64, so that a batch of a million rows keeps
// float32 accuracy.
#include "ltkd_cpu.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ltkd {
namespace {

using simd::kWidth;
using simd::Vec;

constexpr int64_t kPatchChunk = 64;

struct FeatureRows {
  const char* data;
  int64_t image_bytes, patch_bytes;  // strides of dimensions 0 and 1, in bytes
  int64_t dim;
  at::ScalarType dtype;

  // Patch (b, i) as float32: in place for float32, else converted into `buffer` (dim floats).
  const float* patch(int64_t b, int64_t i, float* buffer) const {
    const char* p = data + b * image_bytes + i * patch_bytes;
    if (dtype == at::kFloat) return reinterpret_cast<const float*>(p);
    if (dtype == at::kHalf) {
      convert(reinterpret_cast<const at::Half*>(p), buffer);
    } else {
      convert(reinterpret_cast<const at::BFloat16*>(p), buffer);
    }
    return buffer;
  }

  template <typename scalar_t>
  void convert(const scalar_t* src, float* dst) const {
    using FVec = at::vec::Vectorized<float>;
    int64_t d = 0;
    for (; d + FVec::size() <= dim; d += FVec::size()) {
      FVec v;
      at::vec::load_to_float(src + d, v);
      v.store(dst + d);
    }
    for (; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
  }
};

// sum_d x_d y_d, lane partial sums added in a fixed order.
float dot(const float* x, const float* y, int64_t n) {
  Vec acc = simd::zero();
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) acc = simd::fmadd(simd::load(x + d), simd::load(y + d), acc);
  float total = simd::reduce_add(acc);
  for (; d < n; ++d) total += x[d] * y[d];
  return total;
}

// acc += scale * x
void add_scaled(float* acc, const float* x, float scale, int64_t n) {
  const Vec s = simd::set1(scale);
  int64_t d = 0;
  for (; d + kWidth <= n; d += kWidth) {
    simd::store(acc + d, simd::fmadd(s, simd::load(x + d), simd::load(acc + d)));
  }
  for (; d < n; ++d) acc[d] += scale * x[d];
}

}  // namespace

at::Tensor srw_weights(const at::Tensor& features, const std::optional<at::Tensor>& mask,
                       double tau, double eps) {
  TORCH_CHECK(features.device().is_cpu(), "features must be a CPU tensor, got ", features.device());
  TORCH_CHECK(features.dim() == 3, "features must have shape (B, P, D), got ", features.dim(),
              " dimensions");
  const auto dtype = features.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "features must be float32, float16 or bfloat16, got ", dtype);
  const int64_t images = features.size(0), patches = features.size(1), dim = features.size(2);
  TORCH_CHECK(dim <= 1 || features.stride(2) == 1, "features must have unit stride along D");
  TORCH_CHECK(tau > 0.0, "tau must be > 0, got ", tau);
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  const bool* use = nullptr;
  at::Tensor mask_contiguous;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == images && mask->size(1) == patches,
                "mask must be a CPU bool tensor of shape (", images, ", ", patches, ")");
    mask_contiguous = mask->contiguous();
    use = mask_contiguous.data_ptr<bool>();
  }
  at::Tensor weights = at::zeros({images, patches}, features.options().dtype(at::kFloat));
  if (images == 0 || patches == 0) return weights;

  const int64_t element = static_cast<int64_t>(features.element_size());
  const FeatureRows rows{static_cast<const char*>(features.data_ptr()),
                         features.stride(0) * element, features.stride(1) * element, dim, dtype};
  const int64_t chunks = (patches + kPatchChunk - 1) / kPatchChunk;
  const int64_t tasks = images * chunks;
  const float inv_tau = static_cast<float>(1.0 / tau);
  const float eps_f = static_cast<float>(eps);
  float* out = weights.data_ptr<float>();  // holds 1/max(||f_i||, eps), then -avesim_i / tau

  // Pass 1: inverse norms, per-chunk sums of fh and counts of used patches.
  std::vector<float> chunk_sums(static_cast<size_t>(tasks * dim), 0.0f);
  std::vector<int64_t> chunk_counts(static_cast<size_t>(tasks), 0);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(kPatchChunk * dim, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(dim));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, first = (task % chunks) * kPatchChunk;
      const int64_t last = std::min(patches, first + kPatchChunk);
      float* sum = chunk_sums.data() + task * dim;
      for (int64_t i = first; i < last; ++i) {
        if (use != nullptr && !use[b * patches + i]) continue;
        const float* f = rows.patch(b, i, buffer.data());
        const float inv_norm = 1.0f / std::max(std::sqrt(dot(f, f, dim)), eps_f);
        out[b * patches + i] = inv_norm;
        add_scaled(sum, f, inv_norm, dim);
        ++chunk_counts[task];
      }
    }
  });

  // Per image: m = (sum of the chunk sums, in chunk order, in float64) / count.
  std::vector<float> means(static_cast<size_t>(images * dim), 0.0f);
  std::vector<int64_t> counts(static_cast<size_t>(images), 0);
  at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total(static_cast<size_t>(dim));
    for (int64_t b = begin; b < end; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* partial = chunk_sums.data() + (b * chunks + c) * dim;
        for (int64_t d = 0; d < dim; ++d) total[d] += partial[d];
        counts[b] += chunk_counts[b * chunks + c];
      }
      const double inv_count = counts[b] > 0 ? 1.0 / static_cast<double>(counts[b]) : 0.0;
      float* mean = means.data() + b * dim;
      for (int64_t d = 0; d < dim; ++d) mean[d] = static_cast<float>(total[d] * inv_count);
    }
  });

  // Pass 2: logits -avesim_i / tau = -(f_i . m) / max(||f_i||, eps) / tau.
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(dim));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, first = (task % chunks) * kPatchChunk;
      const int64_t last = std::min(patches, first + kPatchChunk);
      for (int64_t i = first; i < last; ++i) {
        if (use != nullptr && !use[b * patches + i]) continue;
        const float* f = rows.patch(b, i, buffer.data());
        const float avesim = dot(f, means.data() + b * dim, dim) * out[b * patches + i];
        out[b * patches + i] = -avesim * inv_tau;
      }
    }
  });

  // Softmax over each image's used patches; unused ones stay 0.
  at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (counts[b] == 0) continue;
      float* logits = out + b * patches;
      const bool* used = use == nullptr ? nullptr : use + b * patches;
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < patches; ++i) {
        if (used == nullptr || used[i]) max = std::max(max, logits[i]);
      }
      double total = 0.0;
      for (int64_t i = 0; i < patches; ++i) {
        if (used == nullptr || used[i]) {
          logits[i] = std::exp(logits[i] - max);
          total += logits[i];
        }
      }
      const double inv_total = 1.0 / total;
      for (int64_t i = 0; i < patches; ++i) {
        if (used == nullptr || used[i]) logits[i] = static_cast<float>(logits[i] * inv_total);
      }
    }
  });
  return weights;
}

}  // namespace ltkd
