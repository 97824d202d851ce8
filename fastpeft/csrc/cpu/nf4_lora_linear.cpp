// Fused NF4 LoRA linear (QLoRA), CPU: the ops fastpeft::nf4_lora_linear and
// nf4_lora_linear_backward (argument checks, the choice of path, the threading); the NF4
// decoder is in nf4_lora_linear_kernels.h.
//
//   x (T, K)  qweight q (N, K / 2) uint8  absmax (ceil(N * K / blocksize),) fp32
//   bias b (N,)  lora_A A (R, K)  lora_B B (N, R)  scaling s
//   W = the NF4 dequantisation of (q, absmax) (kernels header), never materialised in full
//
// This is lora_linear with W in place of the float weight; its LoRA branch is the module
// shared with lora_linear and int8_lora_linear (lora_branch.h), so dropout masks are
// bit-identical between the ops:
//   y  = b + s * xa @ B^T + x @ W^T,   xa = xd @ A^T
//   dx = c * m ⊙ (s * (dy @ B) @ A) + dy @ W,  dA, dB as lora_branch.h derives them
// W gets no gradient (frozen); d bias = Σ_t dy is taken by the autograd
// (csrc/linear_autograd.cpp).
//
// The base products have two paths, by the number of rows T:
// * T <= kDecodeMaxRows (forward; kBf16DecodeMaxRows for bf16 x with the bf16 dots),
//   kDxDecodeMaxRows (dx): the decode paths, where the codes are streamed once, half a
//   byte per weight. Forward: threads take fixed runs of the output rows n. On AVX-512
//   with rows that start on a block (chunked()), each row of W is decoded in registers,
//   64 bytes a step, and dotted with up to 8 rows of x a pass (chunk_dots; for bf16 x of
//   2 rows or more on a CPU with AVX512_BF16, W rounded to bf16 and multiplied by
//   vdpbf16ps: chunk_dots_bf16), over panels of columns whose part of x stays in L1.
//   Otherwise, for up to kFusedRows rows of x, each row of W is decoded in registers and
//   dotted with them (row_dots); past that, it is decoded once into an L1 buffer and
//   dotted with every row of x, 8 at a time (block_dots). Backward dx: threads take
//   fixed runs of the columns k; the run's parts of 4 rows n at a time are decoded and
//   added, times dy[t, n], onto fp32 accumulators of dx[:, run] (one load and store of
//   them per 4 rows: axpy4).
// * bf16 dy of kDxDecodeMaxRows + 1 to kBf16DxMaxRows rows on a CPU with AVX512_BF16,
//   rows of whole blocks (dx): decode_dx_bf16, W decoded into panels of bf16 pairs of
//   rows and multiplied with dy by vdpbf16ps, accumulators in registers.
// * larger T: compute-bound: ATen's GEMM on tiles of W decoded into a per-thread buffer
//   (dequant_gemm.h, shared with int8_lora_linear).
// The pieces are fixed by the shapes and every element's reduction runs on one thread in
// a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/checks.h"
#include "cpu/cpu_path.h"
#include "cpu/dequant_gemm.h"
#include "cpu/lora_branch.h"
#include "cpu/nf4_lora_linear_kernels.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastpeft::cpu::nf4_lora_linear {
namespace {

// Rows of x up to which the decode paths run; past them the tiles + GEMM win (decoding
// a tile costs 1/T of its GEMM). Measured on an AVX-512 / AMX Xeon, 2 threads, 4096 x
// 4096: the forward's crossover is at 5 to 8 rows in fp32 and about 10 in bf16 (against
// oneDNN's bf16 GEMM), dx's at about 3 (its decode adds T rows of products per decoded
// row onto accumulators that do not stay in registers); `python benchmarks/rows_sweep.py
// --op nf4 [--dtype bf16]` times both sides of each.
constexpr int64_t kDecodeMaxRows = 8;
constexpr int64_t kDxDecodeMaxRows = 3;
// The forward's for bf16 x where it takes AVX512_BF16's dot products (bf16_dots), in
// passes of 8 rows: on a Zen 4 VM (4096 x 4096, 2 threads, rows_sweep as above, this
// kernel against the tiles of the tree before it) T = 16 took 3.4-4.3 ms against 4.4 ms.
// On a CPU with AMX the tiles' GEMM is faster (not measured with this kernel).
constexpr int64_t kBf16DecodeMaxRows = 16;
// Rows of x the chunked decode forward (AVX-512) dots with each row of W in one pass.
constexpr int64_t kChunkGroup = 8;
// Rows of x up to which the decode forward decodes W in registers, per row group.
constexpr int64_t kFusedRows = 4;
// Runs of rows of W the decode forward reads side by side in each task (see
// for_rows_interleaved). On a Zen 4 VM (T = 1, 4096 x 4096, 2 threads, each call after an
// F.linear that evicts the codes, 2, 4 and 8 streams interleaved in one process, 60 runs)
// 2 streams took 3-9% less time than 8 in each of 14 A/B runs, fp32 and bf16, codes in
// huge pages or not; 1 stream was level with 2. The AVX2 kernels (FASTPEFT_CPU_ISA=avx2 on
// the same VM, 40 runs) too: T = 1 1.22-1.24 ms against 1.24-1.25, T = 4 2.03-2.04
// against 2.16-2.22, T = 8 4.27-4.35 against 4.43-4.49.
constexpr int64_t kStreams = 2;
// The chunked decode forward (AVX-512) asks for the codes of its stream's row this many
// rows ahead, into L2, a line per 64-byte step of the row it decodes, spread out: a burst
// of a whole row per row (prefetch_codes) overflowed L1 beside x. On a Zen 4 VM (T = 1,
// 4096 x 4096, fp32, 2 threads, timed from a cold cache as the harness times, in an ad hoc
// loop not kept) it took the forward from about 0.25 to about 0.2 of the fp32 F.linear;
// 1, 2 or 4 streams and 1 to 8 rows ahead were within that VM's +-20% scatter.
constexpr int64_t kChunkPrefetchRows = 2;
// The bytes of x (the rows of one pass) the chunked decode forward keeps per panel of
// columns: 16 KiB, half an L1. At T = 4 x's 4096 fp32 columns are 64 KiB, which, read
// from L2 for every row of W, made T = 4 cost 4x T = 1 (`python benchmarks/rows_sweep.py
// --op nf4 --rows 1 4` at 670b3ea: 0.52 and 1.92 ms; Zen 4 VM, 4096 x 4096, 2 threads).
constexpr int64_t kPanelBytes = 16384;
// Columns of dx a backward decode task owns: its fp32 accumulators are T x 1024 floats
// (12 KiB at T = 3), its slices of 4 rows of W 16 KiB.
constexpr int64_t kDxColumns = 1024;
// Rows of bf16 dy up to which dx takes AVX512_BF16's dot products on decoded panels of W
// (decode_dx_bf16), from kDxDecodeMaxRows + 1 on, on a CPU without AMX. On a Zen 4 VM
// (2 threads, the op's backward with and without this kernel alternated in one process,
// each call from a cold cache, two runs) at 4096 x 4096 it took 1.9-2.0, 3.2-3.4, 7.7-7.9,
// 13.9-14.0 ms at T = 4, 16, 64, 128 against 5.0-5.2, 7.5-7.7, 12.8-12.9, 18.0-18.4 ms
// for the fp32 tiles (T < 32) and oneDNN's bf16 tiles (T >= 32); at 128 rows also ahead
// at 2048 x 2048 (4.3 against 4.8 ms) and 1024 x 1024 (1.7 against 2.0), at 256 even or
// behind (7.7 against 7.4 ms at 2048), at 512 behind (52 against 50 ms at 4096); at 1 to 3
// rows decode_dx was as fast. With AMX, whose bf16 GEMM this was not measured against, it
// stops where the bf16 tiles start (dequant_gemm::kLowpDxMinRows).
constexpr int64_t kBf16DxMaxRows = 128;
// decode_dx_bf16's task: one 64-byte step of the rows' codes, 128 columns of dx (fp32
// accumulators of T x 512 bytes) under panels of bf16_dx::kPanelPairs pairs of rows of W
// (16 KiB). Same runs as above, 4096 x 4096: one step a task took T = 16 in 3.2-3.4 ms,
// against 4.1-4.3 for 4 steps and 5.2-5.4 for 2 (with 8 pairs a panel).
constexpr int64_t kBf16DxSteps = 1;

// The quantised weight, checked: N, K and the block geometry.
struct Nf4Weight {
  const uint8_t* q;
  const float* absmax;
  int64_t N, K;
  int block_shift;  // log2 of the bytes a block spans (blocksize / 2)
  CpuIsa isa;
  DecodeRun decode;

  // W[n, k0 : k0 + kt] (k0, kt even) into out (kt floats)
  void row(int64_t n, int64_t k0, int64_t kt, float* out) const {
    const int64_t b0 = (n * K + k0) / 2;
    decode(q, absmax, block_shift, b0, b0 + kt / 2, out);
  }

  // A tile for dequant_gemm: rows n0 .. n0 + nt, columns k0 .. k0 + kt, as out_t (the
  // fp32 products rounded once, as bitsandbytes' dequantize_4bit to that dtype).
  template <typename out_t>
  void operator()(out_t* out, int64_t n0, int64_t nt, int64_t k0, int64_t kt) const {
    if constexpr (std::is_same_v<out_t, float>) {
      for (int64_t r = 0; r < nt; ++r) row(n0 + r, k0, kt, out + r * kt);
    } else {
      std::vector<float> tmp(static_cast<size_t>(kt));
      for (int64_t r = 0; r < nt; ++r) {
        row(n0 + r, k0, kt, tmp.data());
        round_into(tmp.data(), kt, out + r * kt);
      }
    }
  }
};

Nf4Weight checked_weight(const char* op, const at::Tensor& qweight, const at::Tensor& absmax,
                         int64_t blocksize, int64_t K) {
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == at::kByte, op,
              ": qweight must have dtype torch.uint8, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.device().is_cpu(), op, ": qweight must be a CPU tensor, got ",
              qweight.device());
  TORCH_CHECK(qweight.is_contiguous(), op, ": qweight must be contiguous");
  TORCH_CHECK(2 * qweight.size(1) == K, op, ": qweight must have shape (out, ", K / 2,
              ") (two codes per byte of the ", K, " in_features of x), got ", qweight.sizes());
  TORCH_CHECK(blocksize >= 2 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two up to 4096, got ", blocksize);
  const int64_t N = qweight.size(0);
  const int64_t blocks = div_up(N * K, blocksize);
  TORCH_CHECK(absmax.dim() == 1 && absmax.size(0) == blocks, op, ": absmax must have shape (",
              blocks, ",) (one per block of ", blocksize, " of the ", N, " x ", K,
              " weight), got ", absmax.sizes());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must have dtype torch.float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(absmax.device().is_cpu(), op, ": absmax must be a CPU tensor, got ",
              absmax.device());
  TORCH_CHECK(absmax.is_contiguous(), op, ": absmax must be contiguous");
  const CpuIsa isa = cpu_isa();
  int block_shift = 0;
  while ((int64_t{2} << block_shift) < blocksize) ++block_shift;
  return {qweight.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), N, K,
          block_shift, isa, decoder(isa)};
}

// Whether the decode forward takes the chunked kernel: AVX-512, rows of whole blocks of
// 8 weights or more (a lane's 4 bytes in one block, a 64-byte step's 16 scales in one
// load: blocksize 2 and 4, which the op takes but the modules do not, go the other
// kernels' way), float accumulation (not fp64). It runs every row count of the decode
// path, 8 rows of x a pass (`python benchmarks/rows_sweep.py --op nf4 --rows 1 3 4 8`,
// 4096 x 4096, fp32, 2 threads, Zen 4 VM, forward against the row_dots / block_dots it
// replaces: T = 1 0.51 against 0.66-0.72 ms, T = 4 1.2 against 2.2-2.6 ms, T = 8 2.7-4.4
// against 4.1-4.9 ms; past 8 rows the tiles + GEMM stayed ahead: T = 16 6.5-7.9 ms,
// T = 17 6.3 ms).
bool chunked(const Nf4Weight& w, at::ScalarType dtype) {
#ifdef FASTPEFT_NF4_X86
  return dtype != at::kDouble && w.isa == CpuIsa::kAvx512 && w.block_shift >= 2 &&
         (w.K / 2) % (int64_t{1} << w.block_shift) == 0;
#else
  (void)w, (void)dtype;
  return false;
#endif
}

// Whether the decode forward of T rows takes the chunked kernel with AVX512_BF16's dot
// products: bf16 x of at least 2 rows, a CPU that has them (and FASTPEFT_CPU_ISA not
// forcing them off), rows of whole blocks. At one row the fp32 kernel on x widened is
// faster: rounding W to bf16 needs its products with the scales (8 multiplies a step), and
// there is one row to share them; at two they are even, from three on the dots win.
// `python benchmarks/rows_sweep.py --op nf4 --dtype bf16 --rows 1 2 3 4`, without and with
// FASTPEFT_CPU_ISA=avx512 (no dots), Zen 4 VM, 4096 x 4096, 2 threads, forward ms: T = 2
// 0.68-0.73 against 0.64-0.78, T = 3 0.85-0.86 against 1.04-1.18, T = 4 0.92-0.97
// against 1.43-1.48; T = 1, with the dots allowed at one row (an edit not kept),
// 0.62-0.79 in five runs against 0.46-0.58 (one run 0.84).
bool bf16_dots(const Nf4Weight& w, at::ScalarType dtype, int64_t T) {
#ifdef FASTPEFT_NF4_BF16
  return T >= 2 && dtype == at::kBFloat16 && chunked(w, dtype) && cpu_bf16_dots();
#else
  (void)w, (void)dtype, (void)T;
  return false;
#endif
}

// Whether dx of T rows of dy takes the bf16 dot products (decode_dx_bf16): bf16 dy, rows of
// whole blocks, a CPU that has the dots (FASTPEFT_CPU_ISA not forcing them off), the
// rows between decode_dx's and kBf16DxMaxRows (or kLowpDxMinRows with AMX).
[[maybe_unused]] bool bf16_dx(const Nf4Weight& w, at::ScalarType dtype, int64_t T) {
#ifdef FASTPEFT_NF4_BF16
  const int64_t max_rows =
      cpu_has_amx_bf16() ? dequant_gemm::kLowpDxMinRows - 1 : kBf16DxMaxRows;
  return T > kDxDecodeMaxRows && T <= max_rows && dtype == at::kBFloat16 &&
         chunked(w, dtype) && cpu_bf16_dots();
#else
  (void)w, (void)dtype, (void)T;
  return false;
#endif
}

// Whether the forward of T rows takes the decode path.
bool decode_rows(const Nf4Weight& w, at::ScalarType dtype, int64_t T) {
  return T <= kDecodeMaxRows || (T <= kBf16DecodeMaxRows && bf16_dots(w, dtype, T));
}

// x (T, K) as acc_t (fp32, or fp64 for fp64), contiguous.
at::Tensor acc_copy(const at::Tensor& x) {
  return x.to(dequant_gemm::acc_type(x)).contiguous();
}

// Asks for the codes of row n of W ahead of their use (its scales, an eighth of the
// bytes, were not worth it).
inline void prefetch_codes(const Nf4Weight& w, int64_t n) {
  const int64_t half = w.K / 2;
  const char* q = reinterpret_cast<const char*>(w.q + n * half);
  for (int64_t b = 0; b < half; b += 64) __builtin_prefetch(q + b);
}

// f(n) for the rows [begin, end) of W, kStreams runs of them side by side (rows i,
// i + per, i + 2 per, ...), each asking for its next row's codes ahead (prefetch_codes):
// several reads from memory in flight, where one sequential stream a thread left the
// decode waiting on memory (T = 1, 4096 x 4096, weight not in cache, AMX Xeon VM:
// 0.53-0.58x the fp32 F.linear's time, against 0.77-0.84x for one stream, 0.63-0.80x for
// 8 streams without the prefetch and 0.75-0.83x for one stream with it; 2 streams were not
// measured there).
template <bool kPrefetch = true, typename F>
void for_rows_interleaved(const Nf4Weight& w, int64_t begin, int64_t end, F&& f) {
  const int64_t per = div_up(end - begin, kStreams);
  for (int64_t i = 0; i < per; ++i)
    for (int64_t n = begin + i; n < end; n += per) {
      if (kPrefetch && n + 1 < end) prefetch_codes(w, n + 1);  // this stream's next row
      f(n);
    }
}

#ifdef FASTPEFT_NF4_X86
// The chunked decode forward (rows of W that start on a block): y (T, N) += x @ W^T, with
// x already rearranged into the chunked order in groups of kChunkGroup rows (xp:
// chunk_columns; fp32, or bf16 bits for the bf16 dots), a group of rows of x a pass,
// over panels of the columns whose part of x stays in L1 beside the codes (kPanelBytes).
// dots(rows, q, nb, absmax, blocks, block_shift, lane_blocks, xp, out, next) is the
// kernel (chunk_dots, chunk_dots_bf16_rows).
template <typename xp_t, typename scalar_t, typename Dots>
void chunked_forward(const xp_t* xp, int64_t T, const Nf4Weight& w, scalar_t* ys,
                     Dots&& dots) {
  const int64_t K = w.K, N = w.N, half = K / 2;
  const int64_t Kp = div_up(K, 128) * 128, row_blocks = half >> w.block_shift;
  const int64_t align = std::max<int64_t>(64, int64_t{1} << w.block_shift);
  // ~64K weights a task (32 KiB of codes)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  int32_t lane_blocks[16];
  for (int i = 0; i < 16; ++i) lane_blocks[i] = (4 * i) >> w.block_shift;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(static_cast<size_t>((end - begin) * T), 0.0f);
    float out[kChunkGroup];
    for (int64_t t0 = 0; t0 < T; t0 += kChunkGroup) {  // a group of rows of x a pass
      const int rows = static_cast<int>(std::min<int64_t>(kChunkGroup, T - t0));
      const int64_t per_byte = 2 * rows * static_cast<int64_t>(sizeof(xp_t));  // x's bytes
      const int64_t panel = std::max(align, kPanelBytes / per_byte / align * align);
      for (int64_t j0 = 0; j0 < half; j0 += panel) {  // bytes [j0, j0 + panel) of a row
        const int64_t nb = std::min(panel, half - j0), b0 = j0 >> w.block_shift;
        for_rows_interleaved<false>(w, begin, end, [&](int64_t n) {
          const uint8_t* next =
              n + kChunkPrefetchRows < end ? w.q + (n + kChunkPrefetchRows) * half + j0 : nullptr;
          dots(rows, w.q + n * half + j0, nb, w.absmax + n * row_blocks + b0, row_blocks - b0,
               w.block_shift, lane_blocks, xp + t0 * Kp + (j0 / 64) * rows * 128, out, next);
          for (int r = 0; r < rows; ++r) sums[(n - begin) * T + t0 + r] += out[r];
        });
      }
    }
    for (int64_t n = begin; n < end; ++n)
      for (int64_t r = 0; r < T; ++r) {
        scalar_t& o = ys[r * N + n];
        o = static_cast<scalar_t>(static_cast<float>(o) + sums[(n - begin) * T + r]);
      }
  });
}
#endif

// Decode path forward: y (T, N) += x @ W^T, y holding b + s * xa @ B^T. Up to kFusedRows
// rows, x is split into its even and odd columns once (row_dots' layout) and each row of
// W decoded in registers; past them each row of W is decoded once into a buffer
// (block_dots).
void decode_forward(const at::Tensor& x, const Nf4Weight& w, at::Tensor& y) {
  const int64_t T = x.size(0), K = w.K, N = w.N, half = K / 2;
#ifdef FASTPEFT_NF4_BF16
  if (bf16_dots(w, x.scalar_type(), T)) {  // x as it is, in bf16 pairs
    std::vector<uint16_t> xp(static_cast<size_t>(T * div_up(K, 128) * 128));
    chunk_columns(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), T, K,
                  kChunkGroup, xp.data());
    chunked_forward(xp.data(), T, w, y.mutable_data_ptr<at::BFloat16>(),
                    [](int rows, auto&&... args) { chunk_dots_bf16_rows(rows, args...); });
    return;
  }
#endif
  const at::Tensor xc = acc_copy(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "nf4_decode", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* xs = xc.const_data_ptr<acc_t>();
    scalar_t* ys = y.mutable_data_ptr<scalar_t>();
    // ~64K weights a task (32 KiB of codes)
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
#ifdef FASTPEFT_NF4_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      if (chunked(w, x.scalar_type())) {
        std::vector<float> xp(static_cast<size_t>(T * div_up(K, 128) * 128));
        chunk_columns(xs, T, K, kChunkGroup, xp.data());
        chunked_forward(xp.data(), T, w, ys, [](int rows, auto&&... args) {
          chunk_dots(rows, args...);
        });
        return;
      }
    }
#endif
    if (T > kFusedRows) {
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> wrow(static_cast<size_t>(K));
        acc_t dots[8];
        for_rows_interleaved(w, begin, end, [&](int64_t n) {
          w.row(n, 0, K, wrow.data());
          for (int64_t t0 = 0; t0 < T; t0 += 8) {
            const int rows = static_cast<int>(std::min<int64_t>(8, T - t0));
            block_dots<acc_t>(w.isa, rows, wrow.data(), K, xs + t0 * K, K, dots);
            for (int r = 0; r < rows; ++r) {
              scalar_t& out = ys[(t0 + r) * N + n];
              out = static_cast<scalar_t>(static_cast<acc_t>(out) + dots[r]);
            }
          }
        });
      });
      return;
    }
    std::vector<acc_t> split(static_cast<size_t>(2 * T * half));  // (T, half) even, then odd
    acc_t* xe = split.data();
    acc_t* xo = split.data() + T * half;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < half; ++j) {
        xe[t * half + j] = xs[t * K + 2 * j];
        xo[t * half + j] = xs[t * K + 2 * j + 1];
      }
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      acc_t dots[4];
      for_rows_interleaved(w, begin, end, [&](int64_t n) {
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
          const int rows = static_cast<int>(std::min<int64_t>(4, T - t0));
          row_dots<acc_t>(w.isa, rows, w.q, w.absmax, w.block_shift, n * half, half,
                          xe + t0 * half, xo + t0 * half, half, dots);
          for (int r = 0; r < rows; ++r) {
            scalar_t& out = ys[(t0 + r) * N + n];
            out = static_cast<scalar_t>(static_cast<acc_t>(out) + dots[r]);
          }
        }
      });
    });
  });
}

// Decode path backward: dx (T, K) += dy (T, N) @ W, dx holding the LoRA term.
void decode_dx(const at::Tensor& dy, const Nf4Weight& w, at::Tensor& dx) {
  const int64_t T = dy.size(0), K = w.K, N = w.N;
  const at::Tensor dyc = acc_copy(dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "nf4_dx", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* dys = dyc.const_data_ptr<acc_t>();
    scalar_t* dxs = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, div_up(K, kDxColumns), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> part(static_cast<size_t>(4 * kDxColumns));
      std::vector<acc_t> acc(static_cast<size_t>(T * kDxColumns));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k0 = task * kDxColumns, kt = std::min(kDxColumns, K - k0);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        int64_t n = 0;
        for (; n + 4 <= N; n += 4) {
          for (int i = 0; i < 4; ++i) w.row(n + i, k0, kt, part.data() + i * kt);
          for (int64_t t = 0; t < T; ++t) {
            const acc_t a[4] = {dys[t * N + n], dys[t * N + n + 1], dys[t * N + n + 2],
                                dys[t * N + n + 3]};
            axpy4(a, part.data(), kt, kt, acc.data() + t * kt);
          }
        }
        for (; n < N; ++n) {
          w.row(n, k0, kt, part.data());
          for (int64_t t = 0; t < T; ++t) axpy(dys[t * N + n], part.data(), kt, acc.data() + t * kt);
        }
        for (int64_t t = 0; t < T; ++t) {
          scalar_t* o = dxs + t * K + k0;
          const acc_t* a = acc.data() + t * kt;
          for (int64_t c = 0; c < kt; ++c) o[c] = static_cast<scalar_t>(static_cast<acc_t>(o[c]) + a[c]);
        }
      }
    });
  });
}

#ifdef FASTPEFT_NF4_BF16
// dx (T, K) += dy (T, N) @ W for bf16 dy on a CPU with AVX512_BF16, rows of whole blocks
// (bf16_dx.h): threads take runs of kBf16DxSteps 64-byte steps of the rows' codes (128
// columns of dx each); the rows of W are decoded a pair at a time into panels of bf16
// pairs (decode_pair_bf16), whose columns are in the chunked order, put back in dx's at
// the end.
void decode_dx_bf16(const at::Tensor& dy, const Nf4Weight& w, at::Tensor& dx) {
  const int64_t T = dy.size(0), K = w.K, N = w.N, half = K / 2;
  const int64_t row_blocks = half >> w.block_shift, row_steps = div_up(half, 64);
  int32_t lane_blocks[16];
  for (int i = 0; i < 16; ++i) lane_blocks[i] = (4 * i) >> w.block_shift;
  auto* dxs = dx.mutable_data_ptr<at::BFloat16>();
  const auto steps_of = [&](int64_t task) {
    return std::min(kBf16DxSteps, row_steps - task * kBf16DxSteps);
  };
  bf16_dx::add_dx_bf16(
      T, N, bf16_dx::dy_pairs(dy, nullptr), div_up(row_steps, kBf16DxSteps), 8 * kBf16DxSteps,
      [&](int64_t task) { return 8 * steps_of(task); },
      [&](int64_t task, int64_t n, uint16_t* out) {
        const bool second = n + 1 < N;
        decode_pair_bf16(w.q + n * half, second ? w.q + (n + 1) * half : nullptr, half,
                         task * kBf16DxSteps * 64, steps_of(task), w.absmax + n * row_blocks,
                         w.absmax + (second ? n + 1 : n) * row_blocks, row_blocks,
                         w.block_shift, lane_blocks, out);
      },
      [&](int64_t task, const float* acc, int64_t lda) {  // the chunked order to dx's
        const int64_t c0 = task * kBf16DxSteps * 128;
        for (int64_t t = 0; t < T; ++t) {
          at::BFloat16* o = dxs + t * K + c0;
          const float* a = acc + t * lda;
          for (int64_t s = 0; s < steps_of(task); ++s)
            for (int k = 0; k < 8; ++k)
              for (int i = 0; i < 16; ++i) {
                const int64_t c = 128 * s + chunk_column(k, i);
                if (c0 + c < K)
                  o[c] = static_cast<at::BFloat16>(static_cast<float>(o[c]) +
                                                   a[128 * s + 16 * k + i]);
              }
        }
      });
}
#endif

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, int64_t blocksize) {
  constexpr const char* op = "fastpeft::nf4_lora_linear";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  const Nf4Weight w = checked_weight(op, qweight, absmax, blocksize, x.size(1));
  lora_branch::check_branch(op, x, lora_A, lora_B, w.N, "qweight");
  const at::Tensor b = lora_branch::checked_bias(op, bias, w.N, x);
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  auto [y, xa] = lora_branch::forward(x, b, lora_A, lora_B, scaling, dropout_p, seed_v);
  if (x.size(0) == 0 || w.N == 0 || w.K == 0) return {y, xa};
  if (decode_rows(w, x.scalar_type(), x.size(0))) {
    decode_forward(x, w, y);
  } else {
    dequant_gemm::add_base(x, w.N, w, y);  // onto y = b + s * xa @ B^T
  }
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& absmax, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    int64_t blocksize, bool compute_dx) {
  constexpr const char* op = "fastpeft::nf4_lora_linear_backward";
  check_dtype(op, x);
  check_matrix(op, x, "x", x);
  const Nf4Weight w = checked_weight(op, qweight, absmax, blocksize, x.size(1));
  lora_branch::check_branch(op, x, lora_A, lora_B, w.N, "qweight");
  lora_branch::check_grads(op, grad_y, x, xa, lora_A, w.N, "qweight");
  const uint64_t seed_v = lora_branch::read_seed(op, dropout_p, seed);

  auto [dx, dA, dB] = lora_branch::backward(grad_y, x, lora_A, lora_B, xa, scaling, dropout_p,
                                            seed_v, compute_dx);
  if (compute_dx && x.size(0) > 0 && w.N > 0 && w.K > 0) {  // onto the LoRA term
#ifdef FASTPEFT_NF4_BF16
    if (bf16_dx(w, dx.scalar_type(), x.size(0))) {
      decode_dx_bf16(grad_y, w, dx);
      return {dx, dA, dB};
    }
#endif
    if (x.size(0) <= kDxDecodeMaxRows) {
      decode_dx(grad_y, w, dx);
    } else {
      dequant_gemm::add_base_dx(grad_y, w.K, w, dx);
    }
  }
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("nf4_lora_linear", &forward);
  m.impl("nf4_lora_linear_backward", &backward);
}

}  // namespace fastpeft::cpu::nf4_lora_linear
