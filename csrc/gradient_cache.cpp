// The cache of gradient buffers (what and why: gradient_cache.h).
#include "gradient_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>

namespace ltkd {
namespace {

constexpr size_t kAlignment = 64;
constexpr int64_t kDefaultLimit = 2;
constexpr int64_t kDefaultMaxBytes = int64_t{1} << 30;

struct Buffer {
  void* data;
  size_t bytes;
};

int64_t limit_from_environment() {
  const char* text = std::getenv("LTKD_KERNELS_CPU_GRAD_CACHE");
  if (text == nullptr || *text == '\0') return kDefaultLimit;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  return (*end == '\0' && value >= 0) ? static_cast<int64_t>(value) : kDefaultLimit;
}

class GradientCache final : public c10::Allocator {
 public:
  GradientCache() : limit_(limit_from_environment()), max_bytes_(kDefaultMaxBytes) {}

  c10::DataPtr allocate(size_t bytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (bytes == 0) return {nullptr, nullptr, nullptr, cpu};
    Buffer* buffer = take(bytes);
    if (buffer == nullptr) {
      void* data = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
      if (data == nullptr) throw std::bad_alloc();
      buffer = new Buffer{data, bytes};
    }
    report(buffer->data, static_cast<int64_t>(bytes));
    return {buffer->data, buffer, &GradientCache::give_back_context, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  GradientCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(free_.size()), static_cast<int64_t>(free_bytes_),
            static_cast<int64_t>(live_bytes_), hits_, misses_, limit_, max_bytes_};
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void set_limit(int64_t buffers, int64_t max_bytes) {
    std::deque<Buffer*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = buffers < 0 ? 0 : buffers;
      max_bytes_ = max_bytes < 0 ? 0 : max_bytes;
      evict_over_limit(evicted);
    }
    release(evicted);
  }

  void release_free() {
    std::deque<Buffer*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(free_);
      free_bytes_ = 0;
    }
    release(evicted);
  }

 private:
  // The most recently freed buffer of exactly `bytes`, or nullptr.
  Buffer* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if ((*it)->bytes != bytes) continue;
      Buffer* buffer = *it;
      free_.erase(std::next(it).base());
      free_bytes_ -= bytes;
      live_bytes_ += bytes;
      ++hits_;
      return buffer;
    }
    live_bytes_ += bytes;
    ++misses_;
    return nullptr;
  }

  static void give_back_context(void* context) { cache().give_back(static_cast<Buffer*>(context)); }

  void give_back(Buffer* buffer) {
    std::deque<Buffer*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ -= buffer->bytes;
      if (static_cast<int64_t>(buffer->bytes) >= kMinCachedBytes && limit_ > 0 &&
          static_cast<int64_t>(buffer->bytes) <= max_bytes_) {
        free_.push_back(buffer);
        free_bytes_ += buffer->bytes;
        evict_over_limit(evicted);
      } else {
        evicted.push_back(buffer);
      }
    }
    report(buffer->data, -static_cast<int64_t>(buffer->bytes));
    release(evicted);
  }

  void evict_over_limit(std::deque<Buffer*>& evicted) {  // mutex_ held
    while (static_cast<int64_t>(free_.size()) > limit_ ||
           static_cast<int64_t>(free_bytes_) > max_bytes_) {
      evicted.push_back(free_.front());
      free_bytes_ -= free_.front()->bytes;
      free_.pop_front();
    }
  }

  static void release(std::deque<Buffer*>& buffers) {
    for (Buffer* buffer : buffers) {
      std::free(buffer->data);
      delete buffer;
    }
    buffers.clear();
  }

  void report(void* data, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t live, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      reserved = live_bytes_ + free_bytes_;
    }
    c10::reportMemoryUsageToProfiler(data, delta, live, reserved, c10::Device(c10::DeviceType::CPU));
  }

 public:
  // Never destroyed: a storage of this allocator may die after static destructors ran.
  static GradientCache& cache() {
    static GradientCache* instance = new GradientCache();
    return *instance;
  }

 private:
  std::mutex mutex_;
  std::deque<Buffer*> free_;  // oldest first
  size_t free_bytes_ = 0;
  size_t live_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t limit_;
  int64_t max_bytes_;
};

}  // namespace

at::Tensor empty_gradient(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  GradientCache& cache = GradientCache::cache();
  if (bytes < kMinCachedBytes || cache.limit() == 0) return at::empty({rows, cols}, options);
  return at::Tensor(at::detail::empty_generic({rows, cols}, &cache,
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
}

GradientCacheInfo gradient_cache_info() { return GradientCache::cache().info(); }

void gradient_cache_release() { GradientCache::cache().release_free(); }

void gradient_cache_set_limit(int64_t buffers, int64_t max_bytes) {
  GradientCache::cache().set_limit(buffers, max_bytes);
}

}  // namespace ltkd
