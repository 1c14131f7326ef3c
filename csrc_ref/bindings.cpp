// The one Python module of the C++ test oracles (csrc_ref/*.cpp are compiled into a single
// extension by tests/cpp_reference.py, so exactly one file may define PYBIND11_MODULE).

#include <torch/extension.h>

#include <string>
#include <tuple>

// csrc_ref/routing_ref.cpp
std::tuple<torch::Tensor, torch::Tensor> softmax_topk_ref(
    torch::Tensor logits, int64_t k, bool renormalize, std::string score_func,
    c10::optional<torch::Tensor> bias, int64_t num_groups, int64_t topk_groups,
    std::string group_score, double scale);
torch::Tensor softmax_topk_backward_ref(torch::Tensor grad_weights, torch::Tensor logits,
                                        torch::Tensor ids, bool renormalize,
                                        std::string score_func, double scale);

// csrc_ref/experts_ref.cpp
torch::Tensor grouped_mm_ref(torch::Tensor a, torch::Tensor b, torch::Tensor offsets);
torch::Tensor fused_experts_ref(torch::Tensor hidden, torch::Tensor gate_up_proj, torch::Tensor down_proj,
                                torch::Tensor weights, torch::Tensor ids, std::string activation,
                                c10::optional<torch::Tensor> gate_up_bias, c10::optional<torch::Tensor> down_bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Independent C++ references of moe_kernels' ops (test oracles only).";
  m.def("softmax_topk_ref", &softmax_topk_ref,
        "Gate scores + top-k selection; returns weights (T, k) float64 and ids (T, k) int32.",
        py::arg("logits"), py::arg("k"), py::arg("renormalize"), py::arg("score_func"),
        py::arg("bias"), py::arg("num_groups"), py::arg("topk_groups"), py::arg("group_score"),
        py::arg("scale"));
  m.def("softmax_topk_backward_ref", &softmax_topk_backward_ref,
        "Gradient of softmax_topk_ref's weights w.r.t. logits; returns (T, E) float64.",
        py::arg("grad_weights"), py::arg("logits"), py::arg("ids"), py::arg("renormalize"),
        py::arg("score_func"), py::arg("scale"));
  m.def("grouped_mm_ref", &grouped_mm_ref,
        "Grouped matmul (torch._grouped_mm convention); returns (M, N) float64, zero past offsets[-1].",
        py::arg("a"), py::arg("b"), py::arg("offsets"));
  m.def("fused_experts_ref", &fused_experts_ref,
        "Fused MoE experts (gate_up (E, 2I, H), down (E, H, I)); returns (T, H) float64. "
        "Biases: None or an empty tensor for none.",
        py::arg("hidden"), py::arg("gate_up_proj"), py::arg("down_proj"), py::arg("weights"), py::arg("ids"),
        py::arg("activation"), py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none());
}
