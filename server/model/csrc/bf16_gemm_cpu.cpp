// y[M, N] = x[M, K] @ W^T + b for a bf16 weight W [N, K] (row-major, as nn.Linear holds it), fp32 accumulation,
// for the small M of decode (issue 23: single-stream and batched decode on CPU read every weight once per step,
// so at M = 1 the weight's bytes over the memory bandwidth are the bound).
//
// W is read as it is stored (no repacking): each block of kRows weight rows is streamed once along K, and every
// row of x (up to kTileM at a time, the rest in further passes while the block is still in L1) is dotted with
// it. One instruction-set path is compiled in, by the -march the module is built for (server/model/cpu_ext.py):
// - AVX512-BF16 (Zen 4, Xeon with AMX): `vdpbf16ps` on bf16 pairs of x and W; the products of two bf16 are exact
//   in fp32 and the sum is fp32 (denormal products flushed, as the instruction defines);
// - AVX-512F (Xeon without BF16) and AVX2 + FMA (Zen 3): W widened to fp32 by a 16-bit shift, fp32 FMA with x
//   in fp32;
// - scalar: the same sums in plain C++.
// x may be bf16 or fp32 (fp32 x takes the FMA path, with x unrounded); y has x's dtype, the bias (bf16 or fp32)
// is added in fp32 before the one rounding to y's dtype. Rows of the output are split over threads by blocks
// of W rows (at::parallel_for).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kRows = 4;   // weight rows dotted together (one pass over their K)
constexpr int64_t kTileM = 4;  // rows of x per pass: kRows * kTileM accumulators (16 of the 32 zmm)
#if defined(__AVX512BF16__)
constexpr bool kHaveBf16Dot = true;  // bf16 x takes vdpbf16ps
#else
constexpr bool kHaveBf16Dot = false;
#endif
constexpr int64_t kGrainBytes = 1 << 16;  // weight bytes per thread chunk, at least (small matrices: one thread)

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX512F__)
// [sum(a), sum(b), sum(c), sum(d)]: one transposing reduction for 4 accumulators (13 instructions, not 4 x 9)
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto fold = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int MT, int R>
inline void store_sums(const __m512 (&acc)[MT][R], float out[kTileM][kRows]) {
  const __m512 zero = _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, sum4(acc[m][0], R > 1 ? acc[m][R > 1 ? 1 : 0] : zero, R > 2 ? acc[m][R > 2 ? 2 : 0] : zero,
                            R > 3 ? acc[m][R > 3 ? 3 : 0] : zero));
    for (int r = 0; r < R; ++r) out[m][r] = sums[r];
  }
}
#endif

// ---- the dot products of `rows` (<= kRows) weight rows with `mt` (<= kTileM) rows of x: out[m][r] ----------

#if defined(__AVX512BF16__)
// x bf16 [mt, K] (row stride ldx), w bf16 rows at w + r * K
template <int MT, int R>
inline void dot_tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float out[kTileM][kRows]) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {  // the tail, masked: zeros add nothing
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  store_sums<MT, R>(acc, out);
}
#endif

// x fp32 [mt, K] (row stride ldx), w bf16 rows at w + r * K
template <int MT, int R>
inline void dot_tile_f32(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float out[kTileM][kRows]) {
#if defined(__AVX512F__)
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, w + r * K + k);
      wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  store_sums<MT, R>(acc, out);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
      wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
      float sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
      for (int64_t t = k; t < K; ++t) sum += x[m * ldx + t] * bf16_to_float(w[r * K + t]);  // the tail
      out[m][r] = sum;
    }
#else
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t t = 0; t < K; ++t) sum += x[m * ldx + t] * bf16_to_float(w[r * K + t]);
      out[m][r] = sum;
    }
#endif
}

// The compile-time tile shapes (MT, R) for a runtime (mt, rows): one switch, then straight-line code.
template <typename Dot>
inline void dispatch_tile(int64_t mt, int64_t rows, Dot dot) {
  auto with_r = [&](auto mt_c) {
    constexpr int MT = decltype(mt_c)::value;
    switch (rows) {
      case 4: dot(std::integral_constant<int, MT>{}, std::integral_constant<int, 4>{}); break;
      case 3: dot(std::integral_constant<int, MT>{}, std::integral_constant<int, 3>{}); break;
      case 2: dot(std::integral_constant<int, MT>{}, std::integral_constant<int, 2>{}); break;
      default: dot(std::integral_constant<int, MT>{}, std::integral_constant<int, 1>{}); break;
    }
  };
  switch (mt) {
    case 4: with_r(std::integral_constant<int, 4>{}); break;
    case 3: with_r(std::integral_constant<int, 3>{}); break;
    case 2: with_r(std::integral_constant<int, 2>{}); break;
    default: with_r(std::integral_constant<int, 1>{}); break;
  }
}
static_assert(kRows == 4 && kTileM == 4, "dispatch_tile spells out the tile shapes up to 4 x 4");

// y rows [n0, n1) for all M rows of x: xs is the x the dot path reads (bf16 or fp32), y of type out_t
template <typename x_t, typename out_t>
void gemm_rows(const x_t* xs, int64_t M, int64_t K, const uint16_t* w, const float* bias, out_t* y, int64_t N,
               int64_t n0, int64_t n1) {
  float out[kTileM][kRows];
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, n1 - n);
    const uint16_t* wn = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      const int64_t mt = std::min<int64_t>(kTileM, M - m0);
      dispatch_tile(mt, rows, [&](auto mt_c, auto r_c) {
        constexpr int MT = decltype(mt_c)::value, R = decltype(r_c)::value;
        if constexpr (std::is_same_v<x_t, uint16_t>) {
#if defined(__AVX512BF16__)
          dot_tile_bf16<MT, R>(xs + m0 * K, K, wn, K, out);
#else
          TORCH_CHECK(false, "bf16_linear: the bf16 dot-product path is not built for this CPU");
#endif
        } else {
          dot_tile_f32<MT, R>(xs + m0 * K, K, wn, K, out);
        }
      });
      for (int64_t m = 0; m < mt; ++m)
        for (int64_t r = 0; r < rows; ++r) {
          const float v = out[m][r] + (bias ? bias[n + r] : 0.f);
          y[(m0 + m) * N + n + r] = static_cast<out_t>(v);
        }
    }
  }
}

}  // namespace

// x [M, K] bf16 or fp32 contiguous, weight [N, K] bf16 contiguous, bias [N] (bf16 or fp32) or None
// -> y [M, N] in x's dtype, = x @ weight^T + bias with fp32 accumulation.
at::Tensor bf16_linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kBFloat16 &&
                  weight.device().is_cpu(),
              "bf16_linear: weight must be a contiguous bf16 [N, K] CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) == weight.size(1) &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "bf16_linear: x must be a contiguous bf16 or fp32 [M, K] CPU tensor, K = weight.size(1)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bf16_linear: bias must be [N]");
    const at::Tensor b = bias->contiguous();
    bias32.resize(N);
    if (b.scalar_type() == at::kBFloat16) {
      const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
      for (int64_t i = 0; i < N; ++i) bias32[i] = bf16_to_float(bp[i]);
    } else {
      TORCH_CHECK(b.scalar_type() == at::kFloat, "bf16_linear: bias must be bf16 or fp32");
      std::memcpy(bias32.data(), b.data_ptr<float>(), N * sizeof(float));
    }
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* b = bias32.empty() ? nullptr : bias32.data();
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, kRows * K * 2));

  std::vector<float> x32;  // x in fp32, for the FMA paths
  const bool use_dp = kHaveBf16Dot && x.scalar_type() == at::kBFloat16;  // else the FMA path, x in fp32
  if (!use_dp && x.scalar_type() == at::kBFloat16) {
    x32.resize(M * K);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * K; ++i) x32[i] = bf16_to_float(xp[i]);
  }
  const float* xf = x.scalar_type() == at::kFloat ? x.data_ptr<float>() : x32.data();

  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kRows, n1 = std::min(N, end * kRows);
    if (x.scalar_type() == at::kBFloat16) {
      auto* yp = y.data_ptr<at::BFloat16>();
      if (use_dp)
        gemm_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, w, b, yp, N, n0, n1);
      else
        gemm_rows(xf, M, K, w, b, yp, N, n0, n1);
    } else {
      gemm_rows(xf, M, K, w, b, y.data_ptr<float>(), N, n0, n1);
    }
  });
  return y;
}
