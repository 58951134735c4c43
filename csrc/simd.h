// A few SIMD primitives the CPU kernels are written against, in two implementations chosen when
// the extension is compiled:
//
//   CPU_CAPABILITY_AVX512: raw AVX-512 intrinsics, 16 float lanes, masks in mask registers
//     (masked adds, one-instruction table lookups, exp with vscalefps);
//   otherwise: ATen's portable at::vec::Vectorized<float> (AVX2, NEON, or plain arrays), masks as
//     all-ones lanes.
//
// The loader (ltkd_kernels/cpu/__init__.py) defines CPU_CAPABILITY_AVX512 / CPU_CAPABILITY_AVX2
// from torch's own CPU capability check, with the matching -m flags. No -ffast-math (the kernels
// rely on IEEE inf and NaN) and -ffp-contract=off (only the explicit fmadd calls fuse).
//
// Group lookups: a chunk of W classes carries float group ids in [0, G), G <= kMaxVectorGroups.
// GroupLanes<G> holds what a chunk needs to select per-group values (lookup) and to add into
// per-group lane accumulators (masked_add); GroupTable<G> holds G per-group scalars in the form
// lookup wants.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// Forced inlining of the per-chunk code, so that a row's accumulators stay in registers (an
// out-of-line call taking their address would keep them in memory).
#if defined(__GNUC__) || defined(__clang__)
#define LTKD_ALWAYS_INLINE inline __attribute__((always_inline))
#define LTKD_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#elif defined(_MSC_VER)
#define LTKD_ALWAYS_INLINE __forceinline
#define LTKD_ALWAYS_INLINE_LAMBDA
#else
#define LTKD_ALWAYS_INLINE inline
#define LTKD_ALWAYS_INLINE_LAMBDA
#endif

namespace ltkd {
namespace simd {

// Groups handled by the vectorised grouped-KL kernels; more groups take the scalar path.
constexpr int kMaxVectorGroups = 8;

constexpr float kLog2e = 1.44269504088896341f;
// ln 2 in two parts (Cody-Waite): n * kLn2Hi is exact for |n| < 2^9.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// exp(x) for x below this is 0 in float (even as a denormal): it bounds the reduction's n.
constexpr float kExpLow = -110.0f;
constexpr float kExpHigh = 89.0f;  // exp(89) overflows float: +inf
// e^r = 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3) on |r| <= ln2 / 2: a relative-error minimax fit,
// max relative error 1.1e-7 exactly, 2e-7 (under 2 ulp) evaluated in float32. A degree-7 series
// (Cephes, SLEEF u10) gains under 1 ulp for two more FMAs per element.
constexpr float kExpC2 = 0.499992311000824f;
constexpr float kExpC3 = 0.16667114198207855f;
constexpr float kExpC4 = 0.04189011827111244f;
constexpr float kExpC5 = 0.00831252709031105f;

// Software prefetch of a line about to be streamed (hardware prefetchers alone leave a core
// waiting on memory between the exps).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// The same for a line about to be written (fetched for ownership).
inline void prefetch_for_write(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1, 3);
#else
  (void)p;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)

constexpr int kWidth = 16;
using Vec = __m512;
using Mask = __mmask16;

inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// Lanes [0, n) from p (n < kWidth), the others `fill`; nothing past p + n is read.
inline Vec load_partial(const float* p, int64_t n, float fill) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
}
// Non-temporal store of a 64-byte aligned vector: a large output written once skips the
// read-for-ownership of its lines. stream_fence() orders these stores before the caller's
// later ones (call it before handing the output to another thread).
constexpr bool kHasStreamStore = true;
inline void stream_store(float* p, Vec v) { _mm512_stream_ps(p, v); }
inline void stream_fence() { _mm_sfence(); }
inline Vec set1(float x) { return _mm512_set1_ps(x); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline Vec fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c
inline Mask greater(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline Mask less(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Mask equal(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline Mask either(Mask a, Mask b) { return static_cast<Mask>(a | b); }
inline Vec abs(Vec a) { return _mm512_abs_ps(a); }
inline bool any(Mask m) { return m != 0; }
inline Vec select(Mask m, Vec if_true, Vec if_false) {
  return _mm512_mask_blend_ps(m, if_false, if_true);
}
inline Vec masked_add(Vec acc, Mask m, Vec x) { return _mm512_mask_add_ps(acc, m, acc, x); }
// max(x, acc) lane-wise, a NaN in x ignored (vmaxps returns its second operand on NaN).
inline Vec max_ignore_nan(Vec x, Vec acc) { return _mm512_max_ps(x, acc); }
inline Vec masked_max_ignore_nan(Vec acc, Mask m, Vec x) {
  return _mm512_mask_max_ps(acc, m, x, acc);
}
// The largest lane (no NaN lanes).
inline float reduce_max(Vec v) { return _mm512_reduce_max_ps(v); }

// exp of an argument already clamped below (at kExpLow): the polynomial and the scaling.
inline Vec exp_clamped(Vec xc) {
  Vec n = _mm512_roundscale_ps(mul(xc, set1(kLog2e)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm512_fnmadd_ps(n, set1(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
  Vec q = fmadd(set1(kExpC5), r, set1(kExpC4));
  q = fmadd(q, r, set1(kExpC3));
  q = fmadd(q, r, set1(kExpC2));
  const Vec p = fmadd(q, mul(r, r), add(r, set1(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// exp with under 2 ulp error (see kExpC2..5): x = n ln2 + r, |r| <= ln2 / 2,
// exp(x) = 2^n e^r. -inf -> 0, NaN -> NaN, overflow -> inf; vscalefps applies 2^n exactly
// (denormal results included), so no range case needs a select.
inline Vec exp(Vec x) {
  // max/min return their second operand when one is NaN: x is second, so NaN passes through.
  return exp_clamped(_mm512_min_ps(set1(kExpHigh), _mm512_max_ps(set1(kExpLow), x)));
}

// exp for the kernels' arguments x - max (<= 0 for finite values): the same without the upper
// clamp (one instruction less). Any finite x still gives exp(x) (overflow to inf by vscalefps);
// only x = +inf gives NaN instead of inf, where the kernels' results are NaN by definition.
inline Vec exp_kernel(Vec x) {
  return exp_clamped(_mm512_max_ps(set1(kExpLow), x));  // NaN passes through
}

// Sum of the lanes in a fixed order (deterministic).
inline float reduce_add(Vec v) {
  alignas(64) float lanes[kWidth];
  store(lanes, v);
  float total = 0.0f;
  for (int i = 0; i < kWidth; ++i) total += lanes[i];
  return total;
}

template <int G>
struct GroupTable {
  Vec values;  // lane k holds group k's value (k < G)
  // Built in registers, lane by lane: a vector load of values just written one by one would
  // wait for those stores (no store-to-load forwarding), tens of cycles per table.
  void set(const float* per_group, int count = G) {
    Vec v = _mm512_setzero_ps();
    for (int k = 0; k < G && k < count; ++k) {
      v = _mm512_mask_broadcastss_ps(v, static_cast<__mmask16>(1u << k),
                                     _mm_set_ss(per_group[k]));
    }
    values = v;
  }
};

template <int G>
struct GroupLanes {
  __m512i ids;
  Mask in_group[G];
  explicit GroupLanes(Vec float_ids) {
    ids = _mm512_cvttps_epi32(float_ids);
    for (int k = 0; k < G; ++k) in_group[k] = _mm512_cmpeq_epi32_mask(ids, _mm512_set1_epi32(k));
  }
};

template <int G>
inline Vec lookup(const GroupTable<G>& table, const GroupLanes<G>& lanes) {
  return _mm512_permutexvar_ps(lanes.ids, table.values);
}

#else  // portable at::vec path

using Vec = at::vec::Vectorized<float>;
using Mask = Vec;  // all-ones lanes where true
constexpr int kWidth = Vec::size();

inline Vec load(const float* p) { return Vec::loadu(p); }
inline void store(float* p, Vec v) { v.store(p); }
inline Vec load_partial(const float* p, int64_t n, float fill) {
  alignas(64) float lanes[kWidth];
  for (int64_t i = 0; i < kWidth; ++i) lanes[i] = i < n ? p[i] : fill;
  return Vec::loadu(lanes);
}
constexpr bool kHasStreamStore = false;
inline void stream_store(float* p, Vec v) { v.store(p); }
inline void stream_fence() {}
inline Vec set1(float x) { return Vec(x); }
inline Vec zero() { return Vec(0.0f); }
inline Vec add(Vec a, Vec b) { return a + b; }
inline Vec sub(Vec a, Vec b) { return a - b; }
inline Vec mul(Vec a, Vec b) { return a * b; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return at::vec::fmadd(a, b, c); }
inline Vec fmsub(Vec a, Vec b, Vec c) { return at::vec::fmadd(a, b, Vec(0.0f) - c); }
inline Mask greater(Vec a, Vec b) { return a > b; }
inline Mask less(Vec a, Vec b) { return a < b; }
inline Mask equal(Vec a, Vec b) { return a == b; }
inline Mask either(Mask a, Mask b) { return a | b; }
inline Vec abs(Vec a) { return a.abs(); }
// zero_mask() sets a bit per zero lane; a true lane (all ones, a NaN pattern) is not zero.
inline bool any(Mask m) { return m.zero_mask() != (1 << kWidth) - 1; }
inline Vec select(Mask m, Vec if_true, Vec if_false) { return Vec::blendv(if_false, if_true, m); }
inline Vec masked_add(Vec acc, Mask m, Vec x) { return acc + (x & m); }
// max(x, acc) lane-wise, a NaN in x ignored.
inline Vec max_ignore_nan(Vec x, Vec acc) { return Vec::blendv(acc, x, x > acc); }
inline Vec masked_max_ignore_nan(Vec acc, Mask m, Vec x) {
  return Vec::blendv(acc, x, (x > acc) & m);
}
inline float reduce_max(Vec v) {
  float lanes[kWidth];
  v.store(lanes);
  float top = lanes[0];
  for (int i = 1; i < kWidth; ++i) top = lanes[i] > top ? lanes[i] : top;
  return top;
}

// The same exp as the AVX-512 path; 2^n is built in the exponent field, so x is clamped to
// the normal range and the ends are selected afterwards.
inline Vec exp(Vec x) {
  const Vec low(-87.33654f), high(88.0f);
  Vec xc = at::vec::minimum(at::vec::maximum(x, low), high);  // NaN-propagating
  Vec n = (xc * Vec(kLog2e)).round();
  Vec r = at::vec::fmadd(n, Vec(-kLn2Hi), xc);
  r = at::vec::fmadd(n, Vec(-kLn2Lo), r);
  Vec q = at::vec::fmadd(Vec(kExpC5), r, Vec(kExpC4));
  q = at::vec::fmadd(q, r, Vec(kExpC3));
  q = at::vec::fmadd(q, r, Vec(kExpC2));
  const Vec p = at::vec::fmadd(q, r * r, r + Vec(1.0f));
  auto exponent = at::vec::convert_to_int_of_same_size(n) + at::vec::Vectorized<int32_t>(127);
  Vec scale = at::vec::cast<float>(exponent << at::vec::Vectorized<int32_t>(23));
  Vec result = p * scale;
  result = Vec::blendv(result, Vec(0.0f), x < low);
  return Vec::blendv(result, Vec(std::numeric_limits<float>::infinity()), x > high);
}

inline Vec exp_kernel(Vec x) { return exp(x); }

inline float reduce_add(Vec v) {
  float lanes[kWidth];
  v.store(lanes);
  float total = 0.0f;
  for (int i = 0; i < kWidth; ++i) total += lanes[i];
  return total;
}

template <int G>
struct GroupTable {
  Vec values[G];  // group k's value in every lane
  void set(const float* per_group, int count = G) {
    for (int k = 0; k < G; ++k) values[k] = Vec(k < count ? per_group[k] : 0.0f);
  }
};

template <int G>
struct GroupLanes {
  Mask in_group[G];
  explicit GroupLanes(Vec float_ids) {
    for (int k = 0; k < G; ++k) in_group[k] = float_ids == Vec(static_cast<float>(k));
  }
};

template <int G>
inline Vec lookup(const GroupTable<G>& table, const GroupLanes<G>& lanes) {
  Vec out = table.values[0];
  for (int k = 1; k < G; ++k) out = Vec::blendv(out, table.values[k], lanes.in_group[k]);
  return out;
}

#endif

// Sum of the lanes in float64, in a fixed order (deterministic): a fixed tree of float64 adds.
inline double reduce_add_double(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d high = _mm512_cvtps_pd(
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
#else
  alignas(64) float lanes[kWidth];
  store(lanes, v);
  double total = 0.0;
  for (int i = 0; i < kWidth; ++i) total += static_cast<double>(lanes[i]);
  return total;
#endif
}

inline Vec neg_inf() { return set1(-std::numeric_limits<float>::infinity()); }

}  // namespace simd
}  // namespace ltkd
