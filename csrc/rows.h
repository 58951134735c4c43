// Reading logits rows as float32, writing gradient rows in the logits' dtype, page hints, and
// the row loop on torch's intra-op threads: what every row kernel of the CPU backend shares.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace ltkd {

// Classes per block: a multiple of simd::kWidth and of the 2 x kWidth half-precision vectors.
// A block of float16/bfloat16 logits is converted to float32 in an L1 buffer of this size.
constexpr int64_t kBlock = 1024;
// Prefetch this many floats ahead of the chunk being read.
constexpr int64_t kPrefetchAhead = 256;
// Outputs from this size on are written with non-temporal stores (larger than the caches
// they would otherwise evict).
constexpr size_t kStreamMinBytes = size_t{32} << 20;

// An (N, V) matrix of float32, float16 or bfloat16 logits with unit stride along V and any row
// stride (0 included).
struct RowMatrix {
  const char* data = nullptr;  // first element
  int64_t row_bytes = 0;       // row stride in bytes
  at::ScalarType dtype = at::kFloat;
  int64_t element_bytes = 4;

  RowMatrix() = default;
  explicit RowMatrix(const at::Tensor& t)
      : data(static_cast<const char*>(t.data_ptr())),
        row_bytes(t.dim() == 2 ? t.stride(0) * static_cast<int64_t>(t.element_size()) : 0),
        dtype(t.scalar_type()),
        element_bytes(static_cast<int64_t>(t.element_size())) {}

  const void* at(int64_t row, int64_t col) const {
    return data + row * row_bytes + col * element_bytes;
  }

  // One element as float32.
  float value(int64_t row, int64_t col) const {
    const void* p = at(row, col);
    if (dtype == at::kFloat) return *static_cast<const float*>(p);
    if (dtype == at::kHalf) return static_cast<float>(*static_cast<const at::Half*>(p));
    return static_cast<float>(*static_cast<const at::BFloat16*>(p));
  }

  // Classes [start, start + n) of `row` as float32: in place for float32, else converted into
  // `buffer` (at least n floats).
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

// Write n float32 values to a row of dtype `dtype` (float32, float16 or bfloat16).
inline void store_from_float(const float* src, at::ScalarType dtype, void* dst, int64_t n) {
  if (dtype == at::kHalf) {
    at::vec::convert(src, static_cast<at::Half*>(dst), n);
  } else if (dtype == at::kBFloat16) {
    at::vec::convert(src, static_cast<at::BFloat16*>(dst), n);
  } else {
    std::copy(src, src + n, static_cast<float*>(dst));
  }
}

inline void fill_zero(void* dst, int64_t n, int64_t element_bytes) {
  if (n > 0) std::memset(dst, 0, static_cast<size_t>(n * element_bytes));
}

// No madvise(MADV_HUGEPAGE) on the fresh gradient: with the common THP setting defrag=madvise
// the first touch of an advised region may compact memory synchronously, which stalled a
// 250 MiB gradient for 300+ ms after other large allocations (measured: a backward of 30 ms
// when it did not, 300-420 ms when it did). The 4 KiB first-touch faults are avoided instead by
// reusing freed gradient buffers (gradient_cache.h).

// Rows per task: about 64K classes (`most_classes`), so that a task outweighs taking it
// (per-task set-up included); but a problem that would be one task of at least 8K classes is split into one
// task per thread (a CIFAR-size batch, 128 x 100: its C++ forward + backward measured 39 us on
// one thread, 32 on two). A flat 8K classes per task instead cost 10-17% at N = 512, V = 8142.
inline int64_t rows_per_task(int64_t rows, int64_t vocab, int64_t most_classes = 65536) {
  const int64_t v = std::max<int64_t>(vocab, 1);
  const int64_t most = std::max<int64_t>(1, most_classes / v);
  const int64_t least = std::max<int64_t>(1, 8192 / v);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp((rows + threads - 1) / threads, least, most);
}

// Run task_fn(first, last) on tasks of `task` consecutive rows covering [0, rows). Problems of
// one task run inline on the calling thread (no thread is started); larger ones on torch's
// intra-op threads, which take tasks from a shared counter (a thread the OS preempts takes
// fewer, instead of holding up a fixed half of the rows). Each row is computed whole by one
// thread, so results do not depend on the number of threads or on which thread took a task.
template <typename TaskFn>
void for_each_task_of(int64_t rows, int64_t task, const TaskFn& task_fn) {
  if (rows <= task || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    if (rows > 0) task_fn(int64_t{0}, rows);
    simd::stream_fence();
    return;
  }
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, rows, task, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t first = next_row.fetch_add(task);
      if (first >= rows) break;
      task_fn(first, std::min(rows, first + task));
    }
    simd::stream_fence();
  });
}

// for_each_task_of with rows_per_task(rows, vocab) rows per task.
template <typename TaskFn>
void for_each_task(int64_t rows, int64_t vocab, const TaskFn& task_fn) {
  for_each_task_of(rows, rows_per_task(rows, vocab), task_fn);
}

// Run row_fn(row) for every row, in the tasks of for_each_task.
template <typename RowFn>
void for_each_row(int64_t rows, int64_t vocab, const RowFn& row_fn) {
  for_each_task(rows, vocab, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) row_fn(row);
  });
}

}  // namespace ltkd
