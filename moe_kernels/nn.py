"""``nn.Module`` wrappers of the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from moe_kernels.functional import probmoe_route, softmax_topk


class TopKRouter(nn.Module):
    """Linear gate + fused :func:`moe_kernels.softmax_topk`.

    ``forward(hidden (..., H)) -> (weights (..., k) float32, ids (..., k) int32)``.
    ``weight (E, H)`` is the gate (the HF ``*TopKRouter.weight`` layout); with
    ``correction_bias=True`` a float32 ``(E,)`` buffer ``e_score_correction_bias`` biases
    selection only (DeepSeek-V3), and is not trained by gradients.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        *,
        renormalize: bool = False,
        score_func: str = "softmax",
        correction_bias: bool = False,
        num_groups: int | None = None,
        topk_groups: int | None = None,
        group_score: str = "top2_sum",
        scale: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        bias = torch.zeros(num_experts, device=device, dtype=torch.float32) if correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)
        self.k = k
        self.routing = dict(
            renormalize=renormalize,
            score_func=score_func,
            num_groups=num_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            scale=scale,
            backend=backend,
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden, self.weight)
        return softmax_topk(logits, self.k, bias=self.e_score_correction_bias, **self.routing)

    def extra_repr(self) -> str:
        num_experts, hidden = self.weight.shape
        return f"hidden_size={hidden}, num_experts={num_experts}, k={self.k}, " + ", ".join(
            f"{key}={value}" for key, value in self.routing.items()
        )


class ProbMoERouter(nn.Module):
    """Linear gate + ProbMoE routing (:func:`moe_kernels.probmoe_route`): exact-k (or, with
    ``k_min``, dynamic-k) subsets sampled from the conditional-Bernoulli law in training, with
    gradients through the exact marginals; the most probable subset in eval mode.

    ``forward(hidden (..., H)) -> (weights (..., k) float32, ids (..., k) int32)``, ``-1`` ids
    with weight 0 in empty slots. ``weight (E, H)`` is the gate; :meth:`from_gate` shares the
    weight of an existing gate (``nn.Linear``, :class:`TopKRouter`, or any module with an
    ``(E, H)`` ``weight``), so a trained top-k MoE layer keeps its parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        *,
        k_min: int | None = None,
        renormalize: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.k = k
        self.k_min = k_min
        self.renormalize = renormalize
        self.backend = backend

    @classmethod
    def from_gate(cls, gate: nn.Module, k: int, **options) -> "ProbMoERouter":
        """A router sharing ``gate.weight`` (no copy): its gradients update the same tensor."""
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(f"ProbMoERouter.from_gate: gate must have an (E, H) weight Parameter, got {type(gate).__name__}")
        if getattr(gate, "bias", None) is not None:
            raise ValueError("ProbMoERouter.from_gate: the gate has a bias, which this router does not apply")
        router = cls(weight.shape[1], weight.shape[0], k, device="meta", **options)
        router.weight = weight
        return router

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden, self.weight)
        return probmoe_route(
            logits,
            self.k,
            k_min=self.k_min,
            renormalize=self.renormalize,
            training=self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        num_experts, hidden = self.weight.shape
        return (
            f"hidden_size={hidden}, num_experts={num_experts}, k={self.k}, k_min={self.k_min}, "
            f"renormalize={self.renormalize}, backend={self.backend}"
        )
