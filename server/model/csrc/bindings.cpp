// The Python module of the CPU kernels (server/model/cpu_ext.py builds it).
#include <torch/extension.h>

void add_lora_rows_(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b,
                    torch::Tensor slot_of_row, torch::Tensor slot_rank, int64_t rank);
torch::Tensor decode_attention_(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new, torch::Tensor cos,
                                torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor positions, torch::Tensor block_tables, int64_t window);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_rows_", &add_lora_rows_, "per-row LoRA update of y in place (lora_cpu.cpp)");
  m.def("decode_attention_", &decode_attention_, "decode attention fused with rope and the KV write (decode_attention_cpu.cpp)");
}
