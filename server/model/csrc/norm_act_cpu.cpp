// The decoder layer's small elementwise ops, fused, on CPU: RMSNorm, residual add + RMSNorm (vLLM's
// fused_add_rms_norm), and SiLU(gate) * up. Each replaces several aten calls per use: our RMSNorm in torch
// is 8+ aten calls (fp32 round trip, pow, mean, add, rsqrt, mul, cast, mul; F.rms_norm is composite on CPU in
// torch 2.13, 32 profiler events), the residual add 1 and SiLU-mul 2, and at batch 1 the calls, not the
// arithmetic, are the cost (issue 23, point 4: ~4,200 aten calls per decoded token before this).
//
// Rounding is the torch path's, step by step (server/model/fused_ops.py holds that reference): every
// intermediate that torch stores in the tensors' dtype is rounded to it here too, and fp32 accumulates the
// mean of squares. So outputs equal the reference's except where the sum's rounding (ours: in double,
// torch's: a vectorized fp32 cascade) or exp's last bit moves a result across a rounding boundary of the dtype.
// Plain loops the compiler vectorizes for whatever -march it builds for (AVX2 or AVX-512), no intrinsics.
// ATen headers only, as in the other kernels (compile time).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kInlineElements = 1 << 15;  // below this many elements one thread does it all

int64_t grain(int64_t width) { return std::max<int64_t>(1, kInlineElements / std::max<int64_t>(width, 1)); }

// out = weight * round(x * rsqrt(mean(x^2) + eps)), x one row of `width` in fp32
template <typename scalar_t>
inline void norm_row(const float* x, const scalar_t* weight, scalar_t* out, int64_t width, float eps) {
  // the sum of squares in double: torch sums fp32 in a vectorized cascade, nearly exact; a sequential fp32 sum
  // drifted ~1e-6 relative, which 30 layers grew to 1.8e-4 in the real model's fp32 logits (golden bound 1e-4)
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float mean = static_cast<float>(sum) / static_cast<float>(width);
  const float inv = 1.f / std::sqrt(mean + eps);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float normed = static_cast<float>(static_cast<scalar_t>(x[i] * inv));  // x32.to(dtype)
    out[i] = static_cast<scalar_t>(static_cast<float>(weight[i]) * normed);    // weight * (...)
  }
}

// a += b rounded to the dtype (torch's add); row = the sums in fp32
template <typename scalar_t>
inline void add_row(scalar_t* a, const scalar_t* b, float* row, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const scalar_t sum = static_cast<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
    a[i] = sum;
    row[i] = static_cast<float>(sum);
  }
}

// gate[i] = round(round(silu(gate[i])) * up[i]) for i in [begin, end): F.silu, then the mul
template <typename scalar_t>
inline void silu_mul_range(scalar_t* gate, const scalar_t* up, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float act = static_cast<float>(static_cast<scalar_t>(g / (1.f + std::exp(-g))));
    gate[i] = static_cast<scalar_t>(act * static_cast<float>(up[i]));
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(-1),
              name, ": x [..., E] contiguous and weight [E] expected");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": weight and x must share a dtype");
}

}  // namespace

// x [..., E], weight [E], one dtype -> weight * (x * rsqrt(mean(x^2, -1) + eps)) in x's dtype, normalised in fp32
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_norm(x, weight, "rms_norm");
  auto out = at::empty(x.sizes(), x.options());
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
      std::vector<float> row(width);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* src = xp + r * width;
        for (int64_t i = 0; i < width; ++i) row[i] = static_cast<float>(src[i]);
        norm_row(row.data(), wp, op + r * width, width, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// acc += other (rounded to the dtype, as torch's add), then returns rms_norm(acc): the residual stream updated in
// place and the next block's normalised input. acc, other [..., E] contiguous, weight [E], one dtype.
at::Tensor add_rms_norm_(at::Tensor acc, at::Tensor other, at::Tensor weight, double eps) {
  check_norm(acc, weight, "add_rms_norm_");
  TORCH_CHECK(other.is_contiguous() && other.sizes() == acc.sizes() && other.scalar_type() == acc.scalar_type(),
              "add_rms_norm_: other must be contiguous, of acc's shape and dtype");
  auto out = at::empty(acc.sizes(), acc.options());
  const int64_t width = acc.size(-1), rows = width ? acc.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, acc.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* ap = acc.data_ptr<scalar_t>();
    const scalar_t* bp = other.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
      std::vector<float> row(width);
      for (int64_t r = begin; r < end; ++r) {
        add_row(ap + r * width, bp + r * width, row.data(), width);
        norm_row(row.data(), wp, op + r * width, width, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// gate = silu(gate) * up, in place (each product rounded to the dtype like torch's F.silu, then the mul);
// returns gate. gate, up [..., F] contiguous, one dtype.
at::Tensor silu_mul_(at::Tensor gate, at::Tensor up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
                  gate.scalar_type() == up.scalar_type(),
              "silu_mul_: gate and up must be contiguous, of one shape and dtype");
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_mul_", [&] {
    scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* up_p = up.data_ptr<scalar_t>();
    at::parallel_for(0, n, kInlineElements, [&](int64_t begin, int64_t end) { silu_mul_range(gp, up_p, begin, end); });
  });
  return gate;
}
