// Portable SIMD building blocks for the CPU kernels.
//
// * FASTPEFT_MULTIVERSION: GCC function multi-versioning. The .so is compiled for the
//   baseline ISA (so it loads on any x86-64), and each hot function gets a second clone
//   built for x86-64-v3 (AVX2 + FMA + F16C) that an ifunc picks at load time.
// * FASTPEFT_INLINE: helpers called from a multi-versioned function must be inlined
//   into it, otherwise they would run in the baseline ISA.
// * VecT<T>: a 32-byte GCC/clang vector (8 floats or 4 doubles). The micro-kernels are
//   written with these so that register blocking is explicit; each clone lowers them
//   to its ISA (one ymm register with AVX2, two xmm registers with SSE2, NEON on Arm).
// * acc_of<scalar_t> / to_acc: the accumulation type of every kernel (fp32 for fp32 /
//   fp16 / bf16 tensors, fp64 for fp64) and the conversion into it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) || defined(__clang__)
#define FASTPEFT_INLINE inline __attribute__((always_inline))
#else
#define FASTPEFT_INLINE inline
#endif

// target_clones("arch=x86-64-v3") needs GCC >= 12; clang and older compilers build the
// baseline version only (still vectorised, just narrower).
#if defined(FASTPEFT_X86_MULTIVERSION) && defined(__x86_64__) && defined(__GNUC__) && \
    !defined(__clang__) && __GNUC__ >= 12
#define FASTPEFT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTPEFT_MULTIVERSION
#endif

// Hand-written AVX2 paths (Philox) are compiled with a target attribute and chosen at
// run time, so they need only an x86-64 GCC/clang.
#if defined(FASTPEFT_X86_MULTIVERSION) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__))
#define FASTPEFT_HAVE_AVX2_PATH 1
#endif

namespace fastpeft::cpu {

#if defined(__GNUC__) || defined(__clang__)
// Vector arguments only cross always-inlined calls, so the psABI note about passing
// them without AVX does not apply (it is reported where the helpers are used, hence no pop).
#pragma GCC diagnostic ignored "-Wpsabi"

// GCC 12's AVX-512 headers give unmasked intrinsics (vpermps, vpsrld, the reductions'
// shuffles, ...) an uninitialised vector as the unused pass-through operand and then warn,
// falsely, that it may be used uninitialised, once per inlined call (GCC bug 105593,
// fixed in GCC 13). The AVX-512 kernels sit between these two macros.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#define FASTPEFT_AVX512_WARNINGS_OFF                          \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define FASTPEFT_AVX512_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define FASTPEFT_AVX512_WARNINGS_OFF
#define FASTPEFT_AVX512_WARNINGS_ON
#endif

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename T>
struct VecT;
template <>
struct VecT<float> {
  using type = f32x8;
  static constexpr int lanes = 8;
};
template <>
struct VecT<double> {
  using type = f64x4;
  static constexpr int lanes = 4;
};

// Unaligned load / store / broadcast; memcpy compiles to a single vmovups.
template <typename T, typename V = typename VecT<T>::type>
FASTPEFT_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename T, typename V = typename VecT<T>::type>
FASTPEFT_INLINE void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
// Broadcast as an explicit lane-0 shuffle: GCC's SLP pass turns an all-equal initialiser
// (or s + V{}) inside unrolled loops into chains of vinsertps instead of vbroadcastss.
template <typename T, typename V = typename VecT<T>::type>
FASTPEFT_INLINE V vbroadcast(T s) {
  const V v = {s};
#if defined(__clang__) || __GNUC__ >= 12
  if constexpr (VecT<T>::lanes == 8)
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  else
    return __builtin_shufflevector(v, v, 0, 0, 0, 0);
#else  // GCC < 12: same shuffle, older spelling (an all-zero index vector)
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I IV __attribute__((vector_size(32)));
  return __builtin_shuffle(v, IV{});
#endif
}

#else
#error "fastpeft's CPU kernels need GCC or clang vector extensions"
#endif

// Sum of the lanes of v, in lane order.
template <typename acc_t, typename V = typename VecT<acc_t>::type>
FASTPEFT_INLINE acc_t hsum(V v) {
  constexpr int L = VecT<acc_t>::lanes;
  acc_t lanes[L];
  vstore(lanes, v);
  acc_t s = 0;
  for (int l = 0; l < L; ++l) s += lanes[l];
  return s;
}

// The accumulation type of a tensor dtype: double for double, float for float / half /
// bfloat16.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

FASTPEFT_INLINE float to_acc(float v) { return v; }
FASTPEFT_INLINE double to_acc(double v) { return v; }
FASTPEFT_INLINE float to_acc(c10::Half v) { return static_cast<float>(v); }
FASTPEFT_INLINE float to_acc(c10::BFloat16 v) {  // a shift, written out so it vectorises
  const uint32_t bits = uint32_t{v.x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t div_up(int64_t v, int64_t m) { return (v + m - 1) / m; }

// f(std::integral_constant<int, R>{}) with R = rows for 1 <= rows <= Max (Max past it):
// the row-count templates of the dot kernels, chosen at run time.
template <int Max, typename F>
FASTPEFT_INLINE void with_rows(int rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

}  // namespace fastpeft::cpu
