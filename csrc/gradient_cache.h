// The CPU backend's cache of gradient buffers.
//
// Why: the (N, V) gradient is a fresh tensor every backward. Above glibc's mmap threshold each
// allocation is a new mapping, so the kernel's first write to every 4 KiB page faults and the
// OS zeroes the page: for a 250 MiB float32 gradient (N = 2048, V = 32000) that costs more than
// the gradient kernel itself (measured on the 2-core machine of benchmarks/results/cpu: ~80 ms
// of backward against ~30 ms on mapped memory). A training loop frees the gradient of step k
// (the model's backward consumes it) before step k + 1 asks for one of the same size, so
// keeping the freed buffer mapped and handing it out again removes the faults.
//
// What it does: gradients of at least kMinCachedBytes come from this allocator. When the last
// tensor (or view) of such a buffer dies, its storage's deleter returns the buffer here instead
// of to the OS; a later request of the same byte size takes it back. At most `limit` buffers
// are kept (default 2: two losses on the same logits hold two gradients at once) and at most
// `max_bytes` (default 1 GiB: a buffer held idle between steps adds to the peak of whatever
// runs then, the model's forward; larger gradients go back to the OS); the oldest free buffer
// goes back to the OS beyond either. A buffer is only ever handed out when no tensor
// refers to it (its storage was destroyed), so no two live tensors share memory. The contents of
// a reused buffer are stale: the gradient kernel writes every element.
//
// Memory held while idle: at most `limit` free buffers and `max_bytes`, each buffer the size
// of a gradient the process already held at that moment. gradient_cache_release()
// (ltkd_kernels.cpu.empty_cache()) frees them; the environment variable
// LTKD_KERNELS_CPU_GRAD_CACHE=0 (read once) disables the cache.
// Allocations and frees are reported to torch.profiler's memory profiling like the default CPU
// allocator's, so tools that measure a call's tensor memory see the gradient as before.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ltkd {

// Requests below this go to at::empty (glibc serves them from its heap without faults).
constexpr int64_t kMinCachedBytes = int64_t{1} << 18;

// An uninitialised contiguous (rows, cols) tensor with `options` (CPU), from the cache when
// large enough.
at::Tensor empty_gradient(int64_t rows, int64_t cols, const at::TensorOptions& options);

struct GradientCacheInfo {
  int64_t free_buffers;   // buffers held for reuse
  int64_t free_bytes;     // their bytes
  int64_t live_bytes;     // bytes of buffers in tensors now
  int64_t hits, misses;   // requests served from the cache / by a new buffer, since start
  int64_t limit;          // most free buffers kept
  int64_t max_bytes;      // most free bytes kept
};

GradientCacheInfo gradient_cache_info();

// Return every free buffer to the OS.
void gradient_cache_release();

// Keep at most `buffers` free buffers (0: none, the cache is off) of at most `max_bytes` in
// all; frees the excess now.
void gradient_cache_set_limit(int64_t buffers, int64_t max_bytes);

}  // namespace ltkd
