// The base GEMMs of the quantised-weight ops (int8_lora_linear, nf4_lora_linear) at
// compute-bound sizes: ATen's GEMM on tiles of the weight dequantised into a per-thread
// buffer, accumulating onto the LoRA part already in y / dx (beta = 1). The ops differ
// only in how a tile is decoded, which they pass as `decode`:
//
//   decode(out_t* out, int64_t n0, int64_t nt, int64_t k0, int64_t kt)
//     writes W[n0 : n0 + nt, k0 : k0 + kt] row-major (nt, kt) into out, as out_t
//     (float / double, or x's bf16 / fp16 on the 16-bit path below)
//
// * fp32 / fp64 (and fp16 / bf16 where oneDNN has no GEMM of that dtype): tiles of
//   kFwdTileN x kFwdTileK (forward) / kBwdTileN x kBwdTileK (dx), 512 KiB of fp32, half of
//   L2, leaving room for the GEMM's packed panels of x / dy; 16-bit operands are converted
//   to fp32 once and the result rounded once at the end.
// * the kAten path (cpu_path.h) with a 16-bit dtype oneDNN runs natively (lowp_gemm; for
//   dx from kLowpDxMinRows rows of dy):
//   tiles that span the whole reduction (K forward, N for dx), ~2 MiB of bf16 / fp16, in
//   x's dtype; each GEMM call re-packs its operands (oneDNN's brgemm layout), which larger
//   tiles amortise, and spanning the reduction lets oneDNN add onto y / dx with one
//   rounding (fp32 accumulation; AVX512-BF16, AMX).
// Threads take disjoint tiles of the output columns, and each tile's GEMM runs
// single-threaded on its thread (parallel_for_aten), so an output element is computed the
// same way whatever the thread count. A tile is decoded once per use: 1/T of the GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_path.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::dequant_gemm {

constexpr int64_t kFwdTileN = 256, kFwdTileK = 512;  // forward: y[:, n-tile] +=
constexpr int64_t kBwdTileN = 512, kBwdTileK = 256;  // backward: dx[:, k-tile] +=
constexpr int64_t kLowpTileBytes = int64_t{2} << 20;
// Rows of dy from which dx takes the 16-bit tiles: below, oneDNN's bf16 GEMM of a few
// rows against (N, 256) tiles lost to the fp32 tiles (measured with int8 and NF4 weights,
// 4096 x 4096, bf16, AMX Xeon: at 17 rows 5.2 / 4.6 ms against 8.0 / 6.7; even at 32;
// `python benchmarks/rows_sweep.py --op int8|nf4 --dtype bf16 --rows 17 32 64`).
constexpr int64_t kLowpDxMinRows = 32;

// The accumulation dtype of x's dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The GEMMs in x's own 16-bit dtype (oneDNN: AVX512-BF16, AMX), not in fp32: on the kAten
// path (cpu_path.h) for the dtypes whose GEMMs oneDNN runs natively.
inline bool lowp_gemm(const at::Tensor& x) {
  return cpu_path(x.scalar_type()) == CpuPath::kAten && aten_lowp_gemm(x.scalar_type());
}

// Width of a 16-bit tile spanning `span` elements of the reduction: a multiple of 16, at
// most `total`.
inline int64_t lowp_tile(int64_t span, int64_t total) {
  const int64_t width =
      std::max<int64_t>(16, kLowpTileBytes / (2 * std::max<int64_t>(span, 1)));
  return std::min(total, width / 16 * 16);
}

// y (T, N) += x (T, K) @ W^T, y in x's dtype (holding the LoRA part).
template <typename Decode>
void add_base(const at::Tensor& x, int64_t N, const Decode& decode, at::Tensor& y) {
  const int64_t T = x.size(0), K = x.size(1);
  if (T == 0 || N == 0 || K == 0) return;
  if (lowp_gemm(x)) {  // tiles (nt, K) of W in x's dtype: y[:, tile] += x @ tile^T
    const at::Tensor xc = x.contiguous();
    const int64_t tile_n = lowp_tile(K, N);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "dequant_linear_lowp", [&] {
      parallel_for_aten(div_up(N, tile_n), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buf(static_cast<size_t>(tile_n * K));
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t n0 = tile * tile_n, nt = std::min(tile_n, N - n0);
          decode(buf.data(), n0, nt, int64_t{0}, K);
          const at::Tensor w = at::from_blob(buf.data(), {nt, K}, xc.options());
          y.narrow(1, n0, nt).addmm_(xc, w.t());
        }
      });
    });
    return;
  }
  const at::Tensor xc = x.to(acc_type(x)).contiguous();  // no copy for fp32 / fp64
  at::Tensor yc = y.scalar_type() == acc_type(x) ? y : y.to(acc_type(x));
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "dequant_linear", [&] {
    parallel_for_aten(div_up(N, kFwdTileN), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(static_cast<size_t>(kFwdTileN * kFwdTileK));
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * kFwdTileN, nt = std::min(kFwdTileN, N - n0);
        at::Tensor y_tile = yc.narrow(1, n0, nt);  // (T, nt), row stride N: GEMM's ldc
        for (int64_t k0 = 0; k0 < K; k0 += kFwdTileK) {
          const int64_t kt = std::min(kFwdTileK, K - k0);
          decode(buf.data(), n0, nt, k0, kt);
          const at::Tensor w = at::from_blob(buf.data(), {nt, kt}, xc.options());
          y_tile.addmm_(xc.narrow(1, k0, kt), w.t());
        }
      }
    });
  });
  if (!yc.is_same(y)) y.copy_(yc);
}

// dx (T, K) += dy (T, N) @ W, dx in dy's dtype (holding the LoRA term).
template <typename Decode>
void add_base_dx(const at::Tensor& dy, int64_t K, const Decode& decode, at::Tensor& dx) {
  const int64_t T = dy.size(0), N = dy.size(1);
  if (T == 0 || N == 0 || K == 0) return;
  // tiles (N, kt) of W in dy's dtype: dx[:, tile] += dy @ tile
  if (lowp_gemm(dy) && T >= kLowpDxMinRows) {
    const at::Tensor dyc = dy.contiguous();
    const int64_t tile_k = lowp_tile(N, K);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dy.scalar_type(), "dequant_dx_lowp", [&] {
      parallel_for_aten(div_up(K, tile_k), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buf(static_cast<size_t>(N * tile_k));
        for (int64_t tile = begin; tile < end; ++tile) {
          const int64_t k0 = tile * tile_k, kt = std::min(tile_k, K - k0);
          decode(buf.data(), int64_t{0}, N, k0, kt);
          const at::Tensor w = at::from_blob(buf.data(), {N, kt}, dyc.options());
          dx.narrow(1, k0, kt).addmm_(dyc, w);
        }
      });
    });
    return;
  }
  const auto acc = acc_type(dy);
  const at::Tensor dyc = dy.to(acc).contiguous();
  at::Tensor dxc = dx.scalar_type() == acc ? dx : dx.to(acc);
  AT_DISPATCH_FLOATING_TYPES(dyc.scalar_type(), "dequant_dx", [&] {
    parallel_for_aten(div_up(K, kBwdTileK), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(static_cast<size_t>(kBwdTileN * kBwdTileK));
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t k0 = tile * kBwdTileK, kt = std::min(kBwdTileK, K - k0);
        at::Tensor dx_tile = dxc.narrow(1, k0, kt);  // (T, kt), row stride K
        for (int64_t n0 = 0; n0 < N; n0 += kBwdTileN) {
          const int64_t nt = std::min(kBwdTileN, N - n0);
          decode(buf.data(), n0, nt, k0, kt);
          const at::Tensor w = at::from_blob(buf.data(), {nt, kt}, dyc.options());
          dx_tile.addmm_(dyc.narrow(1, n0, nt), w);
        }
      }
    });
  });
  if (!dxc.is_same(dx)) dx.copy_(dxc);
}

}  // namespace fastpeft::cpu::dequant_gemm
