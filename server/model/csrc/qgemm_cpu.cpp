// Block-quantized GEMV/GEMM on CPU: y[M, N] = x[M, K] @ W^T, W held in blocks of 32 along K (llama.cpp's scheme).
//
// Weights (server/model/block_quant.py builds them; `qgemm_pack` repacks once at load):
//   bits 4: unsigned codes q in [0, 15], per block a scale d and an offset m: w = q * d + m
//           (GGUF Q4_0: m = -8 d; Q4_1: m from the file; int4-wo: min/max groups, m = min);
//   bits 8: signed codes q in [-128, 127], per block a scale d: w = q * d (GGUF Q8_0; int8-wo in blocks of 32).
// Activations are quantized per row per block of 32 to int8 (d_x = max|x| / 127, q_x = round(x / d_x), and the
// block's sum of q_x for the Q4 offset term), as llama.cpp's Q8_1 / Q8_0 activations. Per block and row the dot
// product is then integer: sum(q * q_x) * d * d_x (+ m * d_x * sum(q_x)), accumulated in fp32.
//
// Packed layout: rows in tiles of 16 (the last tile padded with zero rows), per tile and block of 32:
//   bits 4: 4 chunks of 64 bytes; chunk c, byte 4r + j: low nibble = q[row r][4c + j], high = q[r][16 + 4c + j];
//   bits 8: 8 chunks of 64 bytes; chunk g, byte 4r + j = q[r][4g + j] + 128 (as an unsigned byte);
//   params (fp32) [tiles, blocks, 2, 16]: d of the 16 rows, then m (0 for bits 8).
// So one 64-byte chunk holds 4 consecutive k of 16 rows: a VNNI dpbusd of it against the 4 activation bytes
// broadcast to every lane gives each of the 16 rows' partial dot products in its own int32 lane, with no
// horizontal sums (llama.cpp's repacked q4_0_16x8 idea). AVX2 handles a chunk as two halves of 8 rows.
//
// Dot products, chosen at compile time (the module is built with -march=native; tests/test_cpu_kinds.py forces
// x86-64-v3 and -v4 builds): _mm512_dpbusd_epi32 (AVX512-VNNI + BW), _mm256_dpbusd_avx_epi32 (AVX-VNNI),
// _mm256_maddubs_epi16 + _mm256_madd_epi16 (AVX2; the 8-bit codes go through the sign trick so that the int16
// pair sums cannot saturate), and a scalar loop. All give the same integers, so the same results up to fp32
// summation order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;   // weights per block along K
constexpr int64_t kTile = 16;    // rows per packed tile
constexpr int64_t kMr = 4;       // activation rows per register block
constexpr int64_t kMBlock = 64;  // activation rows kept hot in cache while a thread walks its tiles

int64_t block_bytes(int64_t bits) { return bits == 4 ? kTile * kBlock / 2 : kTile * kBlock; }

// The activations of one call, quantized: q [M, K] int8, d [M, K/32] fp32, s [M, K/32] int32 (sum of the q).
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};

template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t M, int64_t K, QActs& a) {
  const int64_t nb = K / kBlock;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.s.resize(M * nb);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t* xb = x + m * K + b * kBlock;
        float amax = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) {
          buf[j] = static_cast<float>(xb[j]);
          amax = std::max(amax, std::fabs(buf[j]));
        }
        const float d = amax / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        int8_t* qb = a.q.data() + m * K + b * kBlock;
        int32_t sum = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(buf[j] * id));  // |v| <= 127
          qb[j] = static_cast<int8_t>(v);
          sum += v;
        }
        a.d[m * nb + b] = d;
        a.s[m * nb + b] = sum;
      }
    }
  });
}

// acc[r] (r < 16 rows of one tile) for MR activation rows, over all blocks of K: the core loop.
// wt: the tile's packed codes, pt: its params, xq/xd/xs: the first of the MR rows.
template <int BITS, int MR>
inline void tile_rows(const uint8_t* wt, const float* pt, const int8_t* xq, const float* xd, const int32_t* xs,
                      int64_t K, float out[][kTile]) {
  const int64_t nb = K / kBlock;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wt + b * block_bytes(BITS);
    __m512i w[8];
    if (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * c);
        w[c] = _mm512_and_si512(v, low);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int g = 0; g < 8; ++g) w[g] = _mm512_loadu_si512(wb + 64 * g);
    }
    const __m512 d = _mm512_loadu_ps(pt + b * 2 * kTile);
    const __m512 m = _mm512_loadu_ps(pt + b * 2 * kTile + kTile);
    for (int i = 0; i < MR; ++i) {
      const int8_t* xb = xq + i * K + b * kBlock;
      int32_t x4[8];
      std::memcpy(x4, xb, sizeof(x4));
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int g = 0; g < 8; g += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(x4[g]));
        s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(x4[g + 1]));
      }
      __m512i s = _mm512_add_epi32(s0, s1);
      const float dx = xd[i * nb + b];
      if (BITS == 8) {  // codes are stored + 128: take 128 * sum(q_x) back off, exactly, in int32
        s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * xs[i * nb + b]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[i]);
      } else {
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[i]);
        acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(dx * static_cast<float>(xs[i * nb + b])), acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out[i], acc[i]);
#elif defined(__AVX2__)
  for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7: the h-th 32 bytes of each 64-byte chunk
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
#if !defined(__AVXVNNI__)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = wt + b * block_bytes(BITS) + 32 * h;
      __m256i w[8];
      if (BITS == 4) {
        for (int c = 0; c < 4; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * c));
          w[c] = _mm256_and_si256(v, low);
          w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      } else {
        for (int g = 0; g < 8; ++g) w[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * g));
      }
#if !defined(__AVXVNNI__)
      if (BITS == 8) {  // back to signed codes for the sign trick: |q| (<= 128) * sign-moved q_x (<= 127)
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
        for (int g = 0; g < 8; ++g) w[g] = _mm256_xor_si256(w[g], flip);
      }
#endif
      const __m256 d = _mm256_loadu_ps(pt + b * 2 * kTile + 8 * h);
      const __m256 m = _mm256_loadu_ps(pt + b * 2 * kTile + kTile + 8 * h);
      for (int i = 0; i < MR; ++i) {
        const int8_t* xb = xq + i * K + b * kBlock;
        int32_t x4[8];
        std::memcpy(x4, xb, sizeof(x4));
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
          const __m256i xa = _mm256_set1_epi32(x4[g]), xb2 = _mm256_set1_epi32(x4[g + 1]);
#if defined(__AVXVNNI__)
          s0 = _mm256_dpbusd_avx_epi32(s0, w[g], xa);
          s1 = _mm256_dpbusd_avx_epi32(s1, w[g + 1], xb2);
#else
          if (BITS == 4) {  // codes <= 15: the int16 pair sums stay far below saturation
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(w[g], xa), ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(w[g + 1], xb2), ones));
          } else {
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(w[g], w[g]), _mm256_sign_epi8(xa, w[g])), ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(w[g + 1], w[g + 1]), _mm256_sign_epi8(xb2, w[g + 1])), ones));
          }
#endif
        }
        __m256i s = _mm256_add_epi32(s0, s1);
        const float dx = xd[i * nb + b];
        if (BITS == 8) {
#if defined(__AVXVNNI__)
          s = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * xs[i * nb + b]));
#endif
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[i]);
        } else {
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[i]);
          acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(dx * static_cast<float>(xs[i * nb + b])), acc[i]);
        }
      }
    }
    for (int i = 0; i < MR; ++i) _mm256_storeu_ps(out[i] + 8 * h, acc[i]);
  }
#else
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kTile; ++r) out[i][r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wt + b * block_bytes(BITS);
    const float* d = pt + b * 2 * kTile;
    const float* m = d + kTile;
    for (int i = 0; i < MR; ++i) {
      const int8_t* xb = xq + i * K + b * kBlock;
      const float dx = xd[i * nb + b];
      const int32_t sx = xs[i * nb + b];
      for (int r = 0; r < kTile; ++r) {
        int32_t s = 0;
        for (int j = 0; j < kBlock; ++j) {
          const int g = j / 4, jj = j % 4;
          int32_t q;
          if (BITS == 4) {
            const uint8_t byte = wb[64 * (g % 4) + 4 * r + jj];
            q = g < 4 ? (byte & 0x0F) : (byte >> 4);
          } else {
            q = static_cast<int32_t>(wb[64 * g + 4 * r + jj]) - 128;
          }
          s += q * static_cast<int32_t>(xb[j]);
        }
        out[i][r] += static_cast<float>(s) * (d[r] * dx);
        if (BITS == 4) out[i][r] += m[r] * (dx * static_cast<float>(sx));
      }
    }
  }
#endif
}

template <typename scalar_t>
inline void store_row(scalar_t* y, const float* v, int64_t count) {
  for (int64_t r = 0; r < count; ++r) y[r] = static_cast<scalar_t>(v[r]);
}

template <int BITS, typename scalar_t>
void gemm(const QActs& a, const uint8_t* packed, const float* params, int64_t M, int64_t N, int64_t K,
          scalar_t* y) {
  const int64_t nb = K / kBlock;
  const int64_t tiles = (N + kTile - 1) / kTile;
  // a chunk of tiles per task: enough work that the thread pool's overhead stays small at M = 1
  // but never fewer tasks than threads: a decode GEMV of the default model (N = 576..1536, M = 1) was one task, so
  // one core streamed its weights from memory while the other idled
  const int64_t per_thread = (tiles + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1, std::min(per_thread, 8192 / std::max<int64_t>(1, M * nb)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    float out[kMr][kTile];
    for (int64_t mb = 0; mb < M; mb += kMBlock) {
      const int64_t me = std::min(M, mb + kMBlock);
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* wt = packed + t * nb * block_bytes(BITS);
        const float* pt = params + t * nb * 2 * kTile;
        const int64_t rows = std::min(kTile, N - t * kTile);
        int64_t m = mb;
        for (; m + kMr <= me; m += kMr) {
          tile_rows<BITS, kMr>(wt, pt, a.q.data() + m * K, a.d.data() + m * nb, a.s.data() + m * nb, K, out);
          for (int i = 0; i < kMr; ++i) store_row(y + (m + i) * N + t * kTile, out[i], rows);
        }
        for (; m < me; ++m) {
          tile_rows<BITS, 1>(wt, pt, a.q.data() + m * K, a.d.data() + m * nb, a.s.data() + m * nb, K, out);
          store_row(y + m * N + t * kTile, out[0], rows);
        }
      }
    }
  });
}

void check_packed(const at::Tensor& packed, const at::Tensor& params, int64_t n, int64_t k, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qgemm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(k > 0 && k % kBlock == 0, "qgemm: K must be a positive multiple of 32, got ", k);
  const int64_t tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == tiles * (k / kBlock) * block_bytes(bits),
              "qgemm: packed codes do not fit N=", n, " K=", k, " bits=", bits);
  TORCH_CHECK(params.device().is_cpu() && params.scalar_type() == at::kFloat && params.is_contiguous() &&
                  params.numel() == tiles * (k / kBlock) * 2 * kTile,
              "qgemm: params do not fit N=", n, " K=", k);
}

}  // namespace

// codes [N, K] (int32: [0, 15] for bits 4, [-128, 127] for bits 8), scales / offsets [N, K/32] fp32 ->
// (packed uint8 [tiles * K/32 * block bytes], params fp32 [tiles, K/32, 2, 16]); offsets are ignored for bits 8.
std::tuple<at::Tensor, at::Tensor> qgemm_pack(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt, "qgemm_pack: codes must be int32 [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1), nb = k / kBlock;
  TORCH_CHECK(bits == 4 || bits == 8, "qgemm_pack: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(k > 0 && k % kBlock == 0, "qgemm_pack: K must be a positive multiple of 32, got ", k);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat &&
                  scales.sizes() == offsets.sizes() && scales.dim() == 2 && scales.size(0) == n && scales.size(1) == nb,
              "qgemm_pack: scales and offsets must be fp32 [N, K/32]");
  codes = codes.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t bb = block_bytes(bits);
  at::Tensor packed = at::zeros({tiles * nb * bb}, at::TensorOptions().dtype(at::kByte));
  at::Tensor params = at::zeros({tiles, nb, 2, kTile}, at::TensorOptions().dtype(at::kFloat));
  const int32_t* c = codes.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  const float* of = offsets.data_ptr<float>();
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* pr = params.data_ptr<float>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / kTile, r = row % kTile;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* wb = p + (t * nb + b) * bb;
      pr[((t * nb + b) * 2 + 0) * kTile + r] = sc[row * nb + b];
      pr[((t * nb + b) * 2 + 1) * kTile + r] = bits == 4 ? of[row * nb + b] : 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int32_t q = c[row * k + b * kBlock + j];
        const int64_t g = j / 4, jj = j % 4;
        if (bits == 4) {
          TORCH_CHECK(q >= 0 && q <= 15, "qgemm_pack: a 4-bit code is ", q);
          uint8_t& byte = wb[64 * (g % 4) + 4 * r + jj];
          byte |= g < 4 ? static_cast<uint8_t>(q) : static_cast<uint8_t>(q << 4);
        } else {
          TORCH_CHECK(q >= -128 && q <= 127, "qgemm_pack: an 8-bit code is ", q);
          wb[64 * g + 4 * r + jj] = static_cast<uint8_t>(q + 128);
        }
      }
    }
  }
  // padding rows keep code 0 (bits 8: stored 0 = q -128) with d = m = 0: their outputs are 0 and never stored
  return {packed, params};
}

// The exact weights W [N, K] fp32 that qgemm multiplies by: q * d + m (bits 4), q * d (bits 8).
at::Tensor qgemm_unpack(at::Tensor packed, at::Tensor params, int64_t n, int64_t k, int64_t bits) {
  check_packed(packed, params, n, k, bits);
  const int64_t nb = k / kBlock, bb = block_bytes(bits);
  at::Tensor w = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* pr = params.data_ptr<float>();
  float* out = w.data_ptr<float>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / kTile, r = row % kTile;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = p + (t * nb + b) * bb;
      const float d = pr[((t * nb + b) * 2 + 0) * kTile + r], m = pr[((t * nb + b) * 2 + 1) * kTile + r];
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t g = j / 4, jj = j % 4;
        float v;
        if (bits == 4) {
          const uint8_t byte = wb[64 * (g % 4) + 4 * r + jj];
          v = static_cast<float>(g < 4 ? (byte & 0x0F) : (byte >> 4)) * d + m;
        } else {
          v = static_cast<float>(static_cast<int32_t>(wb[64 * g + 4 * r + jj]) - 128) * d;
        }
        out[row * k + b * kBlock + j] = v;
      }
    }
  }
  return w;
}

// y [M, N] = x [M, K] @ W^T in x's dtype (fp32 or bf16), x's rows quantized to int8 per block of 32.
at::Tensor qgemm(at::Tensor x, at::Tensor packed, at::Tensor params, int64_t n, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "qgemm: x must be a CPU [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qgemm: x must be fp32 or bf16, got ",
              x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(packed, params, n, K, bits);
  x = x.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  QActs a;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* pr = params.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    quantize_rows(x.data_ptr<float>(), M, K, a);
    if (bits == 4) gemm<4>(a, p, pr, M, n, K, y.data_ptr<float>());
    else gemm<8>(a, p, pr, M, n, K, y.data_ptr<float>());
  } else {
    quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, a);
    if (bits == 4) gemm<4>(a, p, pr, M, n, K, y.data_ptr<c10::BFloat16>());
    else gemm<8>(a, p, pr, M, n, K, y.data_ptr<c10::BFloat16>());
  }
  return y;
}
