// Per-row LoRA on CPU, in place: y[n] += (A[s] x[n]) B[s] with s = slot_of_row[n],
// reading each row's factors straight from the slot tensors (no gathered copies).
// Rows run in parallel; slot 0 (the identity) and slots with no LoRA in this layer
// (slot_rank 0) are skipped, and each row reads only its own slot's rank. A is [S, Rmax, I] and B is
// [S, Rmax, O], so the shrink is `rank` contiguous dot products and the expand is
// `rank` contiguous axpys: both vectorize without horizontal sums. The delta is
// accumulated in fp32 and added to y with one rounding.
// ATen headers only, not <torch/extension.h>: this file then compiles in 10-14 s instead of
// ~36 s (measured on Zen 4, under load), which the -march test builds (tests/test_cpu_kinds.py) pay twice.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

template <typename scalar_t>
static void lora_rows(scalar_t* y, const scalar_t* x, const scalar_t* a, const scalar_t* b, const int64_t* slot,
                      const int64_t* slot_rank, int64_t rows, int64_t in, int64_t out, int64_t max_rank,
                      int64_t rank) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), h(rank), delta(out);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t s = slot[n];
      const int64_t r = std::min(rank, slot_rank[s]);
      if (s == 0 || r <= 0) continue;
      for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(x[n * in + i]);
      for (int64_t k = 0; k < r; ++k) {  // shrink: h = A[s, :r] x
        const scalar_t* ak = a + (s * max_rank + k) * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += static_cast<float>(ak[i]) * xf[i];
        h[k] = acc;
      }
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t k = 0; k < r; ++k) {  // expand: delta = h B[s, :r]
        const scalar_t* bk = b + (s * max_rank + k) * out;
        const float hk = h[k];
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) delta[o] += hk * static_cast<float>(bk[o]);
      }
      scalar_t* yn = y + n * out;
      for (int64_t o = 0; o < out; ++o) yn[o] = static_cast<scalar_t>(static_cast<float>(yn[o]) + delta[o]);
    }
  });
}

// bf16, vectorized by hand. 32 rows of 32 distinct rank-16 LoRAs on SmolLM2's q, k, v, o read 118 MB of factors
// per decode step (as many bytes as its whole Q4_1 base): the generic loop above ran at 11-15 GB/s there, bound by
// its element-wise bf16 -> fp32 conversions (fp32 factors ran at 22 GB/s), where the machine reads 33-37 GB/s
// (Zen 4, 2 threads). Here a bf16 -> fp32 load is one widening move and a shift; the shrink runs 4 ranks per pass
// over x, the expand keeps 4 vectors of the delta in registers across the ranks and rounds y + delta to bf16 once,
// to nearest even (NaN -> 0x7FC0, as c10::BFloat16). Same fp32 accumulation as above, in another order.
#if defined(__AVX512F__) || defined(__AVX2__)
namespace simd {
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the factor stream
#if defined(__AVX512F__)
constexpr int64_t W = 16;
using vec = __m512;
static inline vec zero() { return _mm512_setzero_ps(); }
static inline vec set1(float v) { return _mm512_set1_ps(v); }
static inline vec loadf(const float* p) { return _mm512_loadu_ps(p); }
static inline void storef(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec load_bf16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void store_bf16(c10::BFloat16* p, vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#else
constexpr int64_t W = 8;
using vec = __m256;
static inline vec zero() { return _mm256_setzero_ps(); }
static inline vec set1(float v) { return _mm256_set1_ps(v); }
static inline vec loadf(const float* p) { return _mm256_loadu_ps(p); }
static inline void storef(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline float sum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec load_bf16(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline void store_bf16(c10::BFloat16* p, vec v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  r = _mm256_srli_epi32(r, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#endif
}  // namespace simd

template <>
void lora_rows<c10::BFloat16>(c10::BFloat16* y, const c10::BFloat16* x, const c10::BFloat16* a,
                              const c10::BFloat16* b, const int64_t* slot, const int64_t* slot_rank, int64_t rows,
                              int64_t in, int64_t out, int64_t max_rank, int64_t rank) {
  using namespace simd;
  const int64_t in_vec = in - in % W, out_w = out - out % W;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), h(rank), delta(out);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t s = slot[n];
      const int64_t r = std::min(rank, slot_rank[s]);
      if (s == 0 || r <= 0) continue;
      const c10::BFloat16* xn = x + n * in;
      for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(xn[i]);
      const c10::BFloat16* as = a + s * max_rank * in;
      // one sequential pass over the slot's A rows, then over its B rows: the hardware prefetcher follows a single
      // stream (4 interleaved rows, or B read by column blocks, stalled on loads at 7 GB/s per core)
      for (int64_t k = 0; k < r; ++k) {  // shrink: h[k] = A[s, k] x
        const c10::BFloat16* ak = as + k * in;
        vec s0 = zero(), s1 = zero();
        int64_t i = 0;
        for (; i + 2 * W <= in_vec; i += 2 * W) {
          _mm_prefetch(reinterpret_cast<const char*>(ak + i) + kPrefetch, _MM_HINT_T0);
          s0 = fma(load_bf16(ak + i), loadf(xf.data() + i), s0);
          s1 = fma(load_bf16(ak + i + W), loadf(xf.data() + i + W), s1);
        }
        if (i < in_vec) s0 = fma(load_bf16(ak + i), loadf(xf.data() + i), s0);
        float tail = 0.f;
        for (i = in_vec; i < in; ++i) tail += static_cast<float>(ak[i]) * xf[i];
        h[k] = sum(add(s0, s1)) + tail;
      }
      const c10::BFloat16* bs = b + s * max_rank * out;
      c10::BFloat16* yn = y + n * out;
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t k = 0; k < r; ++k) {  // expand: delta += h[k] B[s, k]
        const c10::BFloat16* bk = bs + k * out;
        const vec hk = set1(h[k]);
        int64_t o = 0;
        for (; o < out_w; o += W) {
          if (o % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(bk + o) + kPrefetch, _MM_HINT_T0);
          storef(delta.data() + o, fma(hk, load_bf16(bk + o), loadf(delta.data() + o)));
        }
        for (; o < out; ++o) delta[o] += h[k] * static_cast<float>(bk[o]);
      }
      int64_t o = 0;
      for (; o < out_w; o += W) store_bf16(yn + o, add(load_bf16(yn + o), loadf(delta.data() + o)));
      for (; o < out; ++o) yn[o] = static_cast<c10::BFloat16>(static_cast<float>(yn[o]) + delta[o]);
    }
  });
}
#endif

// y [N, O] (updated in place), x [N, I], lora_a [S, Rmax, I], lora_b [S, Rmax, O], slot_of_row [N],
// slot_rank [S]; rank caps every row's rank
void add_lora_rows_(at::Tensor y, at::Tensor x, at::Tensor lora_a, at::Tensor lora_b,
                    at::Tensor slot_of_row, at::Tensor slot_rank, int64_t rank) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3, "add_lora_rows_: bad ranks");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous(),
              "add_lora_rows_: contiguous inputs needed");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(y.scalar_type() == dtype && lora_a.scalar_type() == dtype && lora_b.scalar_type() == dtype,
              "add_lora_rows_: dtype mismatch");
  auto slots = slot_of_row.to(at::kLong).contiguous();
  auto ranks = slot_rank.to(at::kLong).contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = lora_b.size(2), max_rank = lora_a.size(1);
  TORCH_CHECK(rank <= max_rank && lora_a.size(2) == in && lora_b.size(1) == max_rank && y.size(0) == rows &&
                  y.size(1) == out && slots.size(0) == rows &&
                  ranks.size(0) == lora_a.size(0),
              "add_lora_rows_: shape mismatch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "add_lora_rows_", [&] {
    lora_rows<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(),
                        lora_b.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), ranks.data_ptr<int64_t>(), rows, in,
                        out, max_rank, rank);
  });
}
