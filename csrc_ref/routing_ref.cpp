// Independent C++ reference ("oracle") of moe_kernels' gate + top-k routing op.
//
// Test-only: it is built on demand by tests/cpp_reference.py and is not part of the wheel.
// The math is written as plain scalar loops over rows in double precision, on purpose using no
// torch ops, so that it does not share kernels (softmax, sort, topk, scatter) with the PyTorch
// reference it is compared against. Torch is only used to receive and return tensors.
//
// Semantics (see moe_kernels/functional/routing.py::softmax_topk), per token row:
//   s      = softmax(logits) | sigmoid(logits)
//   key    = s + bias, NaN -> -inf
//   groups : experts outside the topk_groups best groups get key -inf
//   ids    = the k largest keys, descending, equal keys -> lower expert id first
//   w      = s[ids]; w /= sum(w) + 1e-20 if renormalize; weights = w * scale

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr double kRenormEps = 1e-20;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

bool is_softmax(const std::string& score_func) {
  TORCH_CHECK(score_func == "softmax" || score_func == "sigmoid",
              "routing_ref: score_func must be 'softmax' or 'sigmoid', got '", score_func, "'");
  return score_func == "softmax";
}

// Scores of one row of E logits, written into s.
void row_scores(const double* x, int64_t num_experts, bool softmax, double* s) {
  if (softmax) {
    // Max-subtracted softmax, as torch.softmax does. Its non-finite behaviour follows from the
    // IEEE arithmetic, matching torch: a +inf logit makes max = +inf and inf - inf = NaN, so the
    // whole row is NaN; an all -inf row gives -inf - -inf = NaN too; a NaN logit poisons the sum.
    // std::max would silently drop a NaN, so the max is NaN-propagating by hand (a NaN row is NaN
    // anyway through the sum, this only keeps the intent explicit).
    double m = kNegInf;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (std::isnan(x[e]) || x[e] > m) m = x[e];
      if (std::isnan(m)) break;
    }
    double sum = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
      s[e] = std::exp(x[e] - m);
      sum += s[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) s[e] /= sum;
  } else {
    for (int64_t e = 0; e < num_experts; ++e) s[e] = 1.0 / (1.0 + std::exp(-x[e]));
  }
}

// Descending order of values[0..n), ties (equal values) by lower index first. Callers have
// replaced NaN by -inf, so `>` is a strict weak ordering and stable_sort is well defined.
std::vector<int64_t> order_desc(const double* values, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [values](int64_t a, int64_t b) { return values[a] > values[b]; });
  return order;
}

double nan_to_neg_inf(double v) { return std::isnan(v) ? kNegInf : v; }

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> softmax_topk_ref(
    torch::Tensor logits, int64_t k, bool renormalize, std::string score_func,
    c10::optional<torch::Tensor> bias, int64_t num_groups, int64_t topk_groups,
    std::string group_score, double scale) {
  TORCH_CHECK(logits.dim() == 2, "softmax_topk_ref: logits must be 2-D (T, E), got ",
              logits.dim(), "-D with shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "softmax_topk_ref: logits must be a float tensor, got ",
              logits.scalar_type());
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "softmax_topk_ref: E must be >= 1, got ", num_experts);
  const bool softmax = is_softmax(score_func);
  TORCH_CHECK(group_score == "max" || group_score == "top2_sum",
              "softmax_topk_ref: group_score must be 'max' or 'top2_sum', got '", group_score, "'");

  int64_t eligible = num_experts;
  int64_t group_size = num_experts;
  if (num_groups != 0) {
    TORCH_CHECK(num_groups >= 1 && num_groups <= num_experts && num_experts % num_groups == 0,
                "softmax_topk_ref: num_groups must be 0 (no groups) or a positive divisor of E=",
                num_experts, ", got ", num_groups);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups,
                "softmax_topk_ref: topk_groups must be in [1, num_groups=", num_groups, "], got ",
                topk_groups);
    group_size = num_experts / num_groups;
    TORCH_CHECK(group_score != "top2_sum" || group_size >= 2,
                "softmax_topk_ref: group_score='top2_sum' needs >= 2 experts per group, got ",
                group_size);
    eligible = topk_groups * group_size;
  }
  TORCH_CHECK(k >= 1 && k <= eligible, "softmax_topk_ref: k must be in [1, ", eligible,
              "] (the experts eligible for selection), got ", k);

  // Everything below reads plain contiguous double arrays.
  const torch::Tensor x = logits.to(torch::kFloat64).contiguous();
  torch::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == num_experts,
                "softmax_topk_ref: bias must have shape (E,) = (", num_experts, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->is_floating_point(), "softmax_topk_ref: bias must be a float tensor, got ",
                bias->scalar_type());
    b = bias->to(torch::kFloat64).contiguous();
  }
  const double* bp = b.defined() ? b.data_ptr<double>() : nullptr;

  torch::Tensor weights = torch::empty({num_tokens, k}, torch::kFloat64);
  torch::Tensor ids = torch::empty({num_tokens, k}, torch::kInt32);
  const double* xp = x.data_ptr<double>();
  double* wp = weights.data_ptr<double>();
  int32_t* ip = ids.data_ptr<int32_t>();

  std::vector<double> s(static_cast<size_t>(num_experts));
  std::vector<double> key(static_cast<size_t>(num_experts));
  std::vector<double> gscore(static_cast<size_t>(std::max<int64_t>(num_groups, 1)));

  for (int64_t t = 0; t < num_tokens; ++t) {
    row_scores(xp + t * num_experts, num_experts, softmax, s.data());

    // Selection keys: the bias only ranks experts, it never enters the weights.
    for (int64_t e = 0; e < num_experts; ++e) {
      key[e] = nan_to_neg_inf(bp ? s[e] + bp[e] : s[e]);
    }

    if (num_groups != 0) {
      for (int64_t g = 0; g < num_groups; ++g) {
        const double* gk = key.data() + g * group_size;
        // The two largest keys of the group as a multiset (a repeated maximum counts twice, as
        // topk(2) does). Keys hold no NaN here, so plain comparisons are exact.
        double first = kNegInf, second = kNegInf;
        for (int64_t j = 0; j < group_size; ++j) {
          if (gk[j] > first) {
            second = first;
            first = gk[j];
          } else if (gk[j] > second) {
            second = gk[j];
          }
        }
        // A group of all -inf keys has first = -inf (so "max" = -inf, and -inf + -inf = -inf).
        // +inf + -inf (only reachable through an infinite bias) is NaN, ranked as -inf.
        gscore[g] = nan_to_neg_inf(group_score == "max" ? first : first + second);
      }
      const std::vector<int64_t> gorder = order_desc(gscore.data(), num_groups);
      std::vector<char> keep(static_cast<size_t>(num_groups), 0);
      for (int64_t r = 0; r < topk_groups; ++r) keep[gorder[r]] = 1;
      for (int64_t g = 0; g < num_groups; ++g) {
        if (keep[g]) continue;
        for (int64_t j = 0; j < group_size; ++j) key[g * group_size + j] = kNegInf;
      }
    }

    // Full stable descending order, then the first k: "equal keys -> lower id first" holds for
    // -inf keys too (masked experts and NaN rows pick in increasing id order).
    const std::vector<int64_t> order = order_desc(key.data(), num_experts);
    double* wrow = wp + t * k;
    int32_t* irow = ip + t * k;
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      irow[j] = static_cast<int32_t>(order[j]);
      wrow[j] = s[order[j]];
      sum += wrow[j];
    }
    if (renormalize) {
      const double denom = sum + kRenormEps;
      for (int64_t j = 0; j < k; ++j) wrow[j] /= denom;
    }
    for (int64_t j = 0; j < k; ++j) wrow[j] *= scale;
  }
  return std::make_tuple(weights, ids);
}

torch::Tensor softmax_topk_backward_ref(torch::Tensor grad_weights, torch::Tensor logits,
                                        torch::Tensor ids, bool renormalize,
                                        std::string score_func, double scale) {
  TORCH_CHECK(logits.dim() == 2, "softmax_topk_backward_ref: logits must be 2-D (T, E), got ",
              logits.dim(), "-D with shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(),
              "softmax_topk_backward_ref: logits must be a float tensor, got ",
              logits.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == logits.size(0),
              "softmax_topk_backward_ref: ids must be (T, k) with T=", logits.size(0), ", got ",
              ids.sizes());
  TORCH_CHECK(!ids.is_floating_point() && !ids.is_complex(),
              "softmax_topk_backward_ref: ids must be an integer tensor, got ", ids.scalar_type());
  TORCH_CHECK(grad_weights.sizes() == ids.sizes(),
              "softmax_topk_backward_ref: grad_weights must have the shape of ids ", ids.sizes(),
              ", got ", grad_weights.sizes());
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  const int64_t k = ids.size(1);
  const bool softmax = is_softmax(score_func);

  const torch::Tensor x = logits.to(torch::kFloat64).contiguous();
  const torch::Tensor gw = grad_weights.to(torch::kFloat64).contiguous();
  const torch::Tensor id = ids.to(torch::kInt64).contiguous();
  const double* xp = x.data_ptr<double>();
  const double* gp = gw.data_ptr<double>();
  const int64_t* idp = id.data_ptr<int64_t>();

  torch::Tensor grad_logits = torch::empty({num_tokens, num_experts}, torch::kFloat64);
  double* op = grad_logits.data_ptr<double>();

  std::vector<double> s(static_cast<size_t>(num_experts));
  std::vector<double> g(static_cast<size_t>(k));
  std::vector<double> grad_s(static_cast<size_t>(num_experts));

  for (int64_t t = 0; t < num_tokens; ++t) {
    row_scores(xp + t * num_experts, num_experts, softmax, s.data());
    const int64_t* irow = idp + t * k;
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(irow[j] >= 0 && irow[j] < num_experts, "softmax_topk_backward_ref: ids[", t,
                  ", ", j, "] = ", irow[j], " is out of range [0, ", num_experts, ")");
      g[j] = gp[t * k + j] * scale;
    }

    if (renormalize) {
      // w_j = p_j / D with D = sum(p) + eps, so dL/dp_j = g_j / D - sum_i(g_i p_i) / D^2
      // (p_i the picked scores; the eps is a constant and does not change the derivative).
      double denom = kRenormEps;
      {
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += s[irow[j]];
        denom += sum;
      }
      double dot = 0.0;
      for (int64_t j = 0; j < k; ++j) dot += g[j] * s[irow[j]];
      const double d2 = denom * denom;
      for (int64_t j = 0; j < k; ++j) g[j] = g[j] / denom - dot / d2;
    }

    // Scatter into dense dL/ds: unpicked experts get no gradient through the weights (the
    // selection is piecewise constant). Assignment, as scatter_ does; ids are distinct anyway.
    std::fill(grad_s.begin(), grad_s.end(), 0.0);
    for (int64_t j = 0; j < k; ++j) grad_s[irow[j]] = g[j];

    double* orow = op + t * num_experts;
    if (softmax) {
      // Softmax Jacobian-vector product: dx = s * (grad_s - <grad_s, s>).
      double dot = 0.0;
      for (int64_t e = 0; e < num_experts; ++e) dot += grad_s[e] * s[e];
      for (int64_t e = 0; e < num_experts; ++e) orow[e] = s[e] * (grad_s[e] - dot);
    } else {
      // sigmoid' = s (1 - s), elementwise.
      for (int64_t e = 0; e < num_experts; ++e) orow[e] = grad_s[e] * s[e] * (1.0 - s[e]);
    }
  }
  return grad_logits;
}

// Bound to Python in csrc_ref/bindings.cpp.
