// Which implementation a CPU op runs, chosen at run time from what the CPU has.
//
// Two ways to compute the same formulas:
// * kFused: fastpeft's own register-blocked kernels (lora_branch_kernels.h, ...), one pass
//   over x per direction with the dropout mask and the rank-R products fused. Written on
//   32-byte vectors and built for AVX2 + FMA (simd.h): the fastest way on AVX2-only CPUs
//   (AMD Zen 3, ...), where ATen's GEMMs have no wider units to use either.
// * kAten: the products as ATen GEMMs (oneDNN / MKL), fused around with small kernels of
//   ours (the dropout mask, the scaling). oneDNN runs its GEMMs on every unit the CPU has:
//   AVX-512, AVX512-BF16 (vdpbf16ps), AMX tiles for bf16 / fp16 / int8, where the fused
//   kernels stay 8-wide; the price is an extra pass over x (and dx) for dropout.
//
// Auto, measured with fastpeft-bench and FASTPEFT_CPU_PATH set either way: kAten for the
// 16-bit dtypes whose GEMMs oneDNN runs natively (aten_lowp_gemm: bf16, fp16 with
// AVX512-FP16) on CPUs with AVX-512F; kFused for everything else, fp32 included. In fp32
// the fused kernels were as fast or faster on both AVX-512 CPUs measured, an AMD Zen 4
// and an Intel Xeon with AMX (lora_linear T=128 1024x1024: forward 6-12% faster,
// forward+backward 3-15%; up to 2048x2048x2048 on par or faster), while in bf16 oneDNN's
// AVX512-BF16 / AMX units keep kAten on par or ahead. FASTPEFT_CPU_PATH=fused|aten (read at every call, so a test
// can switch it in one process) forces either; both compute the same formulas on every
// CPU, and python -m fastpeft.info prints the choice.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <optional>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace fastpeft::cpu {

enum class CpuPath { kFused, kAten };

inline bool cpu_has_avx512f() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// Whether kAten runs GEMMs of this 16-bit dtype as they are (at::addmm with bf16 / fp16
// operands, fp32 accumulation in oneDNN) rather than converting the operands to fp32: bf16
// always (oneDNN has bf16 kernels for every AVX-512 CPU, with AVX512-BF16 / AMX where
// present); fp16 where the CPU has AVX512-FP16, which ATen needs to hand fp16 GEMMs to
// oneDNN (without it they run ATen's generic fallback kernel, slower than fp32 MKL).
inline bool aten_lowp_gemm(c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::BFloat16) return true;
  if (dtype != c10::ScalarType::Half) return false;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  static const bool has_fp16 = __builtin_cpu_supports("avx512fp16");  // (GCC 12 knows it)
  return has_fp16;
#else
  return false;
#endif
}

// FASTPEFT_CPU_PATH when it forces a path (fused, aten), else nullopt (unset, empty or
// auto).
inline std::optional<CpuPath> forced_cpu_path() {
  const char* forced = std::getenv("FASTPEFT_CPU_PATH");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0)
    return std::nullopt;
  if (std::strcmp(forced, "fused") == 0) return CpuPath::kFused;
  if (std::strcmp(forced, "aten") == 0) return CpuPath::kAten;
  TORCH_CHECK(false, "FASTPEFT_CPU_PATH must be auto, fused or aten, got '", forced, "'");
}

// The path in force for tensors of `dtype`: FASTPEFT_CPU_PATH if it forces one, else kAten
// for a 16-bit dtype aten_lowp_gemm takes on a CPU with AVX-512F, else kFused. (The LoRA
// branch's forward takes its few-rows kernels up to a few rows unless kAten is forced:
// lora_branch::forward.)
inline CpuPath cpu_path(c10::ScalarType dtype) {
  if (const auto forced = forced_cpu_path()) return *forced;
  return cpu_has_avx512f() && aten_lowp_gemm(dtype) ? CpuPath::kAten : CpuPath::kFused;
}

// The vector ISA of the kernels written with intrinsics for more than one ISA (today
// nf4_lora_linear's NF4 decoder; the AVX512_BF16 dots of the NF4 and int8 ops follow
// cpu_bf16_dots, and int8's AVX2 GEMV runs unless generic is forced): the widest the CPU has, or FASTPEFT_CPU_ISA=avx512bf16 |
// avx512 | avx2 | generic (read at every call, so a test can run each one the CPU can in
// one process; forcing one the CPU lacks is refused). avx512bf16 is kAvx512 with the
// AVX512_BF16 dot products (cpu_bf16_dots); avx512 is kAvx512 without them.
enum class CpuIsa { kGeneric, kAvx2, kAvx512 };

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512bw() {  // with VL (every AVX-512 CPU with BW has it)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
  static const bool has = cpu_has_avx512bw() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Whether the CPU has AMX's bf16 tile multiplies (CPUID leaf 7: EDX bit 22), which oneDNN's
// bf16 GEMMs use: a hint for the choice between them and fastpeft's AVX512_BF16 kernels.
inline bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) != 0 && ((d >> 22) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

inline CpuIsa cpu_isa() {
  const CpuIsa best = cpu_has_avx512bw() ? CpuIsa::kAvx512
                      : cpu_has_avx2_fma() ? CpuIsa::kAvx2
                                           : CpuIsa::kGeneric;
  const char* forced = std::getenv("FASTPEFT_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) return best;
  if (std::strcmp(forced, "generic") == 0) return CpuIsa::kGeneric;
  if (std::strcmp(forced, "avx2") == 0) {
    TORCH_CHECK(cpu_has_avx2_fma(), "FASTPEFT_CPU_ISA=avx2, but this CPU lacks AVX2 + FMA");
    return CpuIsa::kAvx2;
  }
  if (std::strcmp(forced, "avx512") == 0) {
    TORCH_CHECK(cpu_has_avx512bw(), "FASTPEFT_CPU_ISA=avx512, but this CPU lacks AVX-512 BW + VL");
    return CpuIsa::kAvx512;
  }
  if (std::strcmp(forced, "avx512bf16") == 0) {
    TORCH_CHECK(cpu_has_avx512bf16(),
                "FASTPEFT_CPU_ISA=avx512bf16, but this CPU lacks AVX-512 BW + VL + BF16");
    return CpuIsa::kAvx512;
  }
  TORCH_CHECK(false, "FASTPEFT_CPU_ISA must be auto, avx512bf16, avx512, avx2 or generic, got '",
              forced, "'");
}

// Whether the kernels may use AVX512_BF16's dot products (vdpbf16ps) for bf16 inputs: the
// CPU has them and FASTPEFT_CPU_ISA is unset, auto or avx512bf16.
inline bool cpu_bf16_dots() {
  if (!cpu_has_avx512bf16()) return false;
  const char* forced = std::getenv("FASTPEFT_CPU_ISA");
  return forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0 ||
         std::strcmp(forced, "avx512bf16") == 0;
}

}  // namespace fastpeft::cpu
