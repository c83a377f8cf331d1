// Decode attention on CPU over the paged KV cache, fused with rope and the KV write: every batch row
// feeds one new token. For row b with position p = positions[b]: rotate its q and new k (HF's
// rotate_half convention: x * cos + rotate_half(x) * sin, with cos/sin of the row's rope position),
// store the rotated k and v at cache position p, then attend its query heads over cache positions
// lo..p (lo = p - window + 1 with a sliding window, else 0). Position j of row b lives in block
// tables[b, j / bs] at offset j % bs of the pool [blocks, Hkv, bs, D]. One task per (row, KV head)
// reads that head's K and V once, for all the query heads that share it (GQA), so the cache is
// streamed exactly once per step.
//
// Why (measured on a 2-core Xeon, fp32, B=32, H=Hkv=12, D=64, S=1024, L<=80, cold cache):
// index_copy_ of K and V plus SDPA with a bool mask took 1.5 ms per layer; this takes 0.74 ms,
// and 0.68 ms with the software prefetch below (0.80 / 0.70 / 0.68 / 0.74 ms at 0 / 4 / 8 / 16
// rows ahead): a head's rows span pages, and the hardware prefetcher stops at a page's end. With
// blocks, the prefetch looks ahead through the block table (the next block is anywhere in the pool).
// Rope here instead of in torch saves the 10 small ops per layer it took (mul, neg, cat, add on q
// and k: ~0.15 ms per layer at batch 32).
// ATen headers only, not <torch/extension.h>: this file then compiles in 10-14 s instead of
// ~36 s (measured on Zen 4, under load), which the -march test builds (tests/test_cpu_kinds.py) pay twice.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

constexpr int64_t kAhead = 8;  // rows prefetched ahead of the one being read

template <typename scalar_t>
static inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

// out[d] = x[d] * cos[d] + rotate_half(x)[d] * sin[d], rotate_half(x) = (-x[D/2:], x[:D/2]), in fp32
template <typename scalar_t>
static inline void rotate(const scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float rot = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
    out[d] = static_cast<float>(x[d]) * static_cast<float>(cos[d]) + rot * static_cast<float>(sin[d]);
  }
}

template <typename scalar_t>
static void decode_rows(const scalar_t* q, const scalar_t* k_new, const scalar_t* v_new, const scalar_t* cos,
                        const scalar_t* sin, scalar_t* k_cache, scalar_t* v_cache, scalar_t* out,
                        const int64_t* positions, const int64_t* tables, int64_t table_width, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t bs, int64_t dim, int64_t window, float scale) {
  const int64_t group = heads / kv_heads;
  int64_t shift = 0;
  while ((int64_t{1} << shift) < bs) ++shift;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(group * dim), qf(group * dim), kf(dim), inv_sum(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, hk = task % kv_heads, p = positions[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0, len = p + 1 - lo;
      const int64_t* table = tables + b * table_width;
      // the D-vector of cache position j of this row and head (bs a power of two: a shift and a mask)
      auto at = [&](scalar_t* pool, int64_t j) {
        return pool + ((table[j >> shift] * kv_heads + hk) * bs + (j & (bs - 1))) * dim;
      };
      const scalar_t* cb = cos + b * dim;
      const scalar_t* sb = sin + b * dim;
      rotate(k_new + task * dim, cb, sb, dim, kf.data());
      scalar_t* kp = at(k_cache, p);
      for (int64_t d = 0; d < dim; ++d) kp[d] = static_cast<scalar_t>(kf[d]);  // rounded like torch's
      std::copy_n(v_new + task * dim, dim, at(v_cache, p));
      for (int64_t g = 0; g < group; ++g) {
        float* qg = qf.data() + g * dim;
        rotate(q + (b * heads + hk * group + g) * dim, cb, sb, dim, qg);
        for (int64_t d = 0; d < dim; ++d) qg[d] = static_cast<float>(static_cast<scalar_t>(qg[d])) * scale;
      }
      scores.resize(group * len);
      for (int64_t j = 0; j < len; ++j) {  // scores[g, j] = q_g . k_(lo+j)
        const scalar_t* kj = at(k_cache, lo + j);
        if (j + kAhead < len) prefetch_row(at(k_cache, lo + j + kAhead), dim);
        if (j < kAhead) prefetch_row(at(v_cache, lo + j), dim);  // V's first rows, for the pass after this one
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * static_cast<float>(kj[d]);
          scores[g * len + j] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax numerators in place, 1 / their sum aside
        float* sg = scores.data() + g * len;
        const float top = *std::max_element(sg, sg + len);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) sum += (sg[j] = std::exp(sg[j] - top));
        inv_sum[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < len; ++j) {  // acc[g] = sum_j w[g, j] v_(lo+j)
        const scalar_t* vj = at(v_cache, lo + j);
        if (j + kAhead < len) prefetch_row(at(v_cache, lo + j + kAhead), dim);
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + j];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += w * static_cast<float>(vj[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * heads + hk * group + g) * dim + d] = static_cast<scalar_t>(acc[g * dim + d] * inv_sum[g]);
    }
  });
}

// q [B, H, D], k_new, v_new [B, Hkv, D] (before rope); cos, sin [B, D]; k_cache, v_cache [blocks, Hkv, bs, D]
// (one layer, contiguous); all one dtype; positions [B]; block_tables [B, M] -> out [B, H, D]. window 0 =
// no sliding window.
at::Tensor decode_attention_(at::Tensor q, at::Tensor k_new, at::Tensor v_new, at::Tensor cos,
                                at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                                at::Tensor positions, at::Tensor block_tables, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "decode_attention_: bad ranks");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention_: the cache must be contiguous");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k_new.scalar_type() == dtype && v_new.scalar_type() == dtype && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "decode_attention_: dtype mismatch");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), bs = k_cache.size(2), num_blocks = k_cache.size(0);
  // No aten call where nothing needs converting: at batch 1 these checks ran ~14 aten calls per layer (the
  // conversions, min/max and their .item()), ~420 of the ~4,200 per decoded token; plain loops check the bounds.
  auto long_contiguous = [](const at::Tensor& t) {
    return t.scalar_type() == at::kLong && t.is_contiguous() ? t : t.to(at::kLong).contiguous();
  };
  const auto pos = long_contiguous(positions);
  const auto tables = long_contiguous(block_tables);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(3) == dim && v_cache.sizes() == k_cache.sizes() &&
                  k_new.size(0) == batch && k_new.size(1) == kv_heads && k_new.size(2) == dim &&
                  v_new.sizes() == k_new.sizes() && pos.numel() == batch && dim % 2 == 0 &&
                  cos.dim() == 2 && cos.size(0) == batch && cos.size(1) == dim && sin.sizes() == cos.sizes() &&
                  tables.dim() == 2 && tables.size(0) == batch && bs > 0 && (bs & (bs - 1)) == 0,
              "decode_attention_: shape mismatch");
  const int64_t width = tables.size(1);
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(pos_p, pos_p + batch, [&](int64_t p) { return p >= 0 && p < width * bs; }),
              "decode_attention_: position outside the block table");
  const int64_t* tables_p = tables.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(tables_p, tables_p + batch * width, [&](int64_t id) { return id >= 0 && id < num_blocks; }),
              "decode_attention_: block id outside the pool");
  for (at::Tensor* t : {&q, &k_new, &v_new, &cos, &sin})
    if (!t->is_contiguous()) *t = t->contiguous();
  auto out = at::empty({batch, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "decode_attention_", [&] {
    decode_rows<scalar_t>(q.data_ptr<scalar_t>(), k_new.data_ptr<scalar_t>(), v_new.data_ptr<scalar_t>(),
                          cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                          v_cache.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                          pos_p, tables_p, width, batch, heads, kv_heads, bs,
                          dim, window,
                          1.f / std::sqrt(static_cast<float>(dim)));
  });
  return out;
}
