// Per-row LoRA on CPU: y[n] += B[s] (A[s] x[n]) with s = slot_of_row[n], reading each
// row's factors straight from the slot tensors (no gathered copies). Rows run in
// parallel; slot 0 (the identity) is skipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>

template <typename scalar_t>
static void lora_rows(const scalar_t* x, const scalar_t* a, const scalar_t* b, const int64_t* slot, float* y,
                      int64_t rows, int64_t in, int64_t out, int64_t max_rank, int64_t rank) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(rank);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t s = slot[n];
      if (s == 0) continue;
      const scalar_t* xn = x + n * in;
      for (int64_t k = 0; k < rank; ++k) {
        const scalar_t* ak = a + (s * max_rank + k) * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += static_cast<float>(ak[i]) * static_cast<float>(xn[i]);
        h[k] = acc;
      }
      float* yn = y + n * out;
      const scalar_t* bs = b + s * out * max_rank;
      for (int64_t o = 0; o < out; ++o) {
        const scalar_t* bo = bs + o * max_rank;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < rank; ++k) acc += static_cast<float>(bo[k]) * h[k];
        yn[o] = acc;
      }
    }
  });
}

// x [N, I], lora_a [S, Rmax, I], lora_b [S, O, Rmax], slot_of_row [N] -> delta [N, O] (float32)
torch::Tensor lora_delta_rows(torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor slot_of_row,
                              int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3, "lora_delta_rows: bad ranks");
  TORCH_CHECK(x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous(), "contiguous inputs needed");
  TORCH_CHECK(x.scalar_type() == lora_a.scalar_type() && x.scalar_type() == lora_b.scalar_type(), "dtype mismatch");
  auto slots = slot_of_row.to(torch::kLong).contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = lora_b.size(1), max_rank = lora_a.size(1);
  TORCH_CHECK(rank <= max_rank && lora_a.size(2) == in && lora_b.size(2) == max_rank, "shape mismatch");
  auto y = torch::zeros({rows, out}, x.options().dtype(torch::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_delta_rows", [&] {
    lora_rows<scalar_t>(x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(), lora_b.data_ptr<scalar_t>(),
                        slots.data_ptr<int64_t>(), y.data_ptr<float>(), rows, in, out, max_rank, rank);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lora_delta_rows", &lora_delta_rows); }
