// The Python module of the CPU kernels (server/model/cpu_ext.py builds it).
// pybind11 with torch's Tensor casters, not the whole <torch/extension.h>: 15 s to compile instead of 37 s here.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

void add_lora_rows_(at::Tensor y, at::Tensor x, at::Tensor lora_a, at::Tensor lora_b,
                    at::Tensor slot_of_row, at::Tensor slot_rank, int64_t rank);
at::Tensor decode_attention_(at::Tensor q, at::Tensor k_new, at::Tensor v_new, at::Tensor cos,
                                at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache,
                                at::Tensor positions, at::Tensor block_tables, int64_t window);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(at::Tensor acc, at::Tensor other, at::Tensor weight, double eps);
at::Tensor silu_mul_(at::Tensor gate, at::Tensor up);
// qgemm_cpu.cpp
std::tuple<at::Tensor, at::Tensor> qgemm_pack(at::Tensor codes, at::Tensor scales, at::Tensor offsets, int64_t bits);
at::Tensor qgemm_unpack(at::Tensor packed, at::Tensor params, int64_t n, int64_t k, int64_t bits);
at::Tensor qgemm(at::Tensor x, at::Tensor packed, at::Tensor params, int64_t n, int64_t bits);
// bf16_gemm_cpu.cpp (issue 23: bf16 GEMV for decode)
at::Tensor bf16_linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_rows_", &add_lora_rows_, "per-row LoRA update of y in place (lora_cpu.cpp)");
  m.def("decode_attention_", &decode_attention_, "decode attention fused with rope and the KV write (decode_attention_cpu.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm, normalised in fp32 (norm_act_cpu.cpp)");
  m.def("add_rms_norm_", &add_rms_norm_, "acc += other in place, then RMSNorm of acc (norm_act_cpu.cpp)");
  m.def("silu_mul_", &silu_mul_, "gate = silu(gate) * up in place (norm_act_cpu.cpp)");
  // qgemm_cpu.cpp
  m.def("qgemm_pack", &qgemm_pack, "repack 4/8-bit codes in blocks of 32 for qgemm (qgemm_cpu.cpp)");
  m.def("qgemm_unpack", &qgemm_unpack, "the fp32 weights qgemm multiplies by (qgemm_cpu.cpp)");
  m.def("qgemm", &qgemm, "x @ W^T for block-quantized W, int8-quantized x (qgemm_cpu.cpp)");
  m.def("bf16_linear", &bf16_linear, "x @ W^T + b for a bf16 W [N, K], fp32 accumulation, small M (bf16_gemm_cpu.cpp)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
}
