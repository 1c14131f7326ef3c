"""Route 6 tokens to 2 of 8 experts and run the experts, on the CPU; check against float64."""

import torch

import moe_kernels as mk

torch.manual_seed(0)
T, H, I, E, k = 6, 32, 16, 8, 2
hidden = torch.randn(T, H, requires_grad=True)
gate = torch.randn(E, H) / H**0.5
gate_up_proj = torch.randn(E, 2 * I, H) / H**0.5  # the HF transformers v5 layout
down_proj = torch.randn(E, H, I) / I**0.5

# Gate + top-k in one op (Mixtral's routing); weights (T, k) float32, ids (T, k) int32.
weights, ids = mk.softmax_topk(hidden @ gate.T, k, routing=mk.RoutingConfig.renormalize())
# The experts: a gated MLP per (token, slot), weighted and summed per token -> (T, H).
out = mk.fused_experts(hidden, gate_up_proj, down_proj, weights, ids, activation="silu")
out.sum().backward()  # gradients reach hidden (and the routing weights, and both projections)

reference = mk.reference.fused_experts(
    hidden.double(), gate_up_proj.double(), down_proj.double(), weights.double(), ids
)
print("experts of token 0:", ids[0].tolist(), "weights:", [round(w, 3) for w in weights[0].tolist()])
print("output:", tuple(out.shape), "within 1e-6 of the float64 reference:", bool((out - reference).abs().max() < 1e-6))
print("grad of hidden:", tuple(hidden.grad.shape))
