// Independent C++ reference ("oracle") of moe_kernels' grouped expert GEMM and fused MoE experts.
//
// Test-only: it is built on demand by tests/cpp_reference.py and is not part of the wheel.
// Plain scalar loops in double precision, on purpose using no torch ops, so that it shares no
// kernels (matmul, gather, index_add, activations) with the PyTorch reference it is checked
// against (moe_kernels/reference/experts.py). Torch is only used to receive and return tensors.
//
// Semantics:
//   grouped_mm:    out[r] = a[r] @ b[g] for offsets[g-1] <= r < offsets[g] (offsets[-1] = 0),
//                  rows at or past offsets[G-1] are zero.
//   fused_experts: out[t] = sum_j w[t,j] * (down[e] @ act(gate_up[e] @ x[t] + b1[e]) + b2[e]),
//                  e = ids[t,j], slots with e = -1 skipped; gate_up (E, 2I, H), down (E, H, I).
//   act:           silu / gelu / gelu_tanh: f(h[i]) * h[I + i] (gate half, then up half);
//                  gpt_oss: g = min(h[2i], 7), u = clamp(h[2i+1], -7, 7),
//                           (u + 1) * g * sigmoid(1.702 g).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

constexpr double kGptOssLimit = 7.0;
constexpr double kGptOssAlpha = 1.702;
constexpr double kPi = 3.14159265358979323846;

enum class Activation { kSilu, kGelu, kGeluTanh, kGptOss };

Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "gpt_oss") return Activation::kGptOss;
  TORCH_CHECK(false, "experts_ref: activation must be one of 'silu', 'gelu', 'gelu_tanh', 'gpt_oss', got '",
              name, "'");
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Gate nonlinearity of the non-interleaved activations.
double gate_fn(double x, Activation act) {
  switch (act) {
    case Activation::kSilu:
      return x * sigmoid(x);
    case Activation::kGelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / kPi);
      return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
    }
    default:
      TORCH_CHECK(false, "experts_ref: gate_fn called for gpt_oss");
  }
}

// act(h[0..2I)) -> out[0..I).
void gated_activation(const double* h, int64_t inter, Activation act, double* out) {
  for (int64_t i = 0; i < inter; ++i) {
    if (act == Activation::kGptOss) {
      const double g = std::min(h[2 * i], kGptOssLimit);
      const double u = std::min(std::max(h[2 * i + 1], -kGptOssLimit), kGptOssLimit);
      out[i] = (u + 1.0) * g * sigmoid(kGptOssAlpha * g);
    } else {
      out[i] = gate_fn(h[i], act) * h[inter + i];
    }
  }
}

torch::Tensor as_double(const torch::Tensor& t) { return t.to(torch::kFloat64).contiguous(); }

// An absent bias is None, an undefined tensor or an empty tensor.
bool has_tensor(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0;
}

}  // namespace

torch::Tensor grouped_mm_ref(torch::Tensor a, torch::Tensor b, torch::Tensor offsets) {
  TORCH_CHECK(a.dim() == 2, "grouped_mm_ref: a must be 2-D (M, K), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 3 && b.size(1) == a.size(1), "grouped_mm_ref: b must be (G, K, N) with K=",
              a.size(1), ", got shape ", b.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == b.size(0),
              "grouped_mm_ref: offsets must be (G,) with G=", b.size(0), ", got shape ", offsets.sizes());
  const int64_t rows = a.size(0), depth = a.size(1), groups = b.size(0), cols = b.size(2);
  const torch::Tensor ad = as_double(a), bd = as_double(b);
  const torch::Tensor off = offsets.to(torch::kInt64).contiguous();
  const double* ap = ad.data_ptr<double>();
  const double* bp = bd.data_ptr<double>();
  const int64_t* op = off.data_ptr<int64_t>();

  torch::Tensor out = torch::zeros({rows, cols}, torch::kFloat64);
  double* outp = out.data_ptr<double>();
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = op[g];
    TORCH_CHECK(end >= start && end <= rows, "grouped_mm_ref: offsets must be non-decreasing and <= M=", rows,
                ", got offsets[", g, "] = ", end, " after ", start);
    const double* bg = bp + g * depth * cols;
    for (int64_t r = start; r < end; ++r) {
      for (int64_t n = 0; n < cols; ++n) {
        double acc = 0.0;
        for (int64_t c = 0; c < depth; ++c) acc += ap[r * depth + c] * bg[c * cols + n];
        outp[r * cols + n] = acc;
      }
    }
    start = end;
  }
  return out;
}

torch::Tensor fused_experts_ref(torch::Tensor hidden, torch::Tensor gate_up_proj, torch::Tensor down_proj,
                                torch::Tensor weights, torch::Tensor ids, std::string activation,
                                c10::optional<torch::Tensor> gate_up_bias, c10::optional<torch::Tensor> down_bias) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK(hidden.dim() == 2, "fused_experts_ref: hidden must be 2-D (T, H), got shape ", hidden.sizes());
  const int64_t tokens = hidden.size(0), dim = hidden.size(1);
  TORCH_CHECK(gate_up_proj.dim() == 3 && gate_up_proj.size(2) == dim && gate_up_proj.size(1) % 2 == 0,
              "fused_experts_ref: gate_up_proj must be (E, 2I, H) with H=", dim, ", got shape ",
              gate_up_proj.sizes());
  const int64_t experts = gate_up_proj.size(0), inter = gate_up_proj.size(1) / 2;
  TORCH_CHECK(down_proj.dim() == 3 && down_proj.size(0) == experts && down_proj.size(1) == dim &&
                  down_proj.size(2) == inter,
              "fused_experts_ref: down_proj must be (E, H, I) = (", experts, ", ", dim, ", ", inter, "), got shape ",
              down_proj.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == tokens, "fused_experts_ref: ids must be (T, k) with T=", tokens,
              ", got shape ", ids.sizes());
  TORCH_CHECK(!ids.is_floating_point() && !ids.is_complex(), "fused_experts_ref: ids must be an integer tensor, got ",
              ids.scalar_type());
  TORCH_CHECK(weights.sizes() == ids.sizes(), "fused_experts_ref: weights must have the shape of ids ", ids.sizes(),
              ", got ", weights.sizes());
  const int64_t k = ids.size(1);

  const bool with_b1 = has_tensor(gate_up_bias), with_b2 = has_tensor(down_bias);
  torch::Tensor b1, b2;
  if (with_b1) {
    TORCH_CHECK(gate_up_bias->dim() == 2 && gate_up_bias->size(0) == experts && gate_up_bias->size(1) == 2 * inter,
                "fused_experts_ref: gate_up_bias must be (E, 2I) = (", experts, ", ", 2 * inter, "), got shape ",
                gate_up_bias->sizes());
    b1 = as_double(*gate_up_bias);
  }
  if (with_b2) {
    TORCH_CHECK(down_bias->dim() == 2 && down_bias->size(0) == experts && down_bias->size(1) == dim,
                "fused_experts_ref: down_bias must be (E, H) = (", experts, ", ", dim, "), got shape ",
                down_bias->sizes());
    b2 = as_double(*down_bias);
  }

  const torch::Tensor x = as_double(hidden), w1 = as_double(gate_up_proj), w2 = as_double(down_proj);
  const torch::Tensor w = as_double(weights);
  const torch::Tensor id = ids.to(torch::kInt64).contiguous();
  const double* xp = x.data_ptr<double>();
  const double* w1p = w1.data_ptr<double>();
  const double* w2p = w2.data_ptr<double>();
  const double* wp = w.data_ptr<double>();
  const int64_t* idp = id.data_ptr<int64_t>();
  const double* b1p = with_b1 ? b1.data_ptr<double>() : nullptr;
  const double* b2p = with_b2 ? b2.data_ptr<double>() : nullptr;

  torch::Tensor out = torch::zeros({tokens, dim}, torch::kFloat64);
  double* outp = out.data_ptr<double>();
  std::vector<double> h(static_cast<size_t>(2 * inter));
  std::vector<double> a(static_cast<size_t>(inter));

  for (int64_t t = 0; t < tokens; ++t) {
    const double* xt = xp + t * dim;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idp[t * k + j];
      if (e == -1) continue;
      TORCH_CHECK(e >= 0 && e < experts, "fused_experts_ref: ids[", t, ", ", j, "] = ", e, " is out of range [-1, ",
                  experts, ")");
      const double* w1e = w1p + e * 2 * inter * dim;
      for (int64_t r = 0; r < 2 * inter; ++r) {
        double acc = b1p ? b1p[e * 2 * inter + r] : 0.0;
        for (int64_t c = 0; c < dim; ++c) acc += w1e[r * dim + c] * xt[c];
        h[r] = acc;
      }
      gated_activation(h.data(), inter, act, a.data());
      const double* w2e = w2p + e * dim * inter;
      const double weight = wp[t * k + j];
      for (int64_t c = 0; c < dim; ++c) {
        double acc = b2p ? b2p[e * dim + c] : 0.0;
        for (int64_t i = 0; i < inter; ++i) acc += w2e[c * inter + i] * a[i];
        outp[t * dim + c] += weight * acc;
      }
    }
  }
  return out;
}
