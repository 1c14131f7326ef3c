"""``nn.Module`` wrappers of the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from moe_kernels.activations import gated_activation
from moe_kernels.balance import LoadStats, load_tracker, set_load_tracking
from moe_kernels.config import RoutingConfig, activation_name, integer, routing_or_default
from moe_kernels.functional import fused_experts, probmoe_route, softmax_topk
from moe_kernels.layers import MOE_LAYER, RUNS_TAPS, LayerParts, run_taps
from moe_kernels.routing_override import resolve_selection
from moe_kernels.utils import check_backend


def _sizes(owner: str, **sizes) -> tuple[int, ...]:
    """Each of ``sizes`` as an int >= 1 (integer-like accepted), or the named error."""
    values = []
    for name, value in sizes.items():
        value = integer(owner, name, value)
        if value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value}")
        values.append(value)
    return tuple(values)


class _LinearGate(nn.Module):
    """What both routers hold: the gate ``weight (E, H)`` (initialised as ``nn.Linear``'s), ``k``
    and the ops' ``backend``. ``route(hidden (..., H)) -> (weights (..., k), ids (..., k),
    logits (..., E))`` is the forward with the logits routed from (after any tap of
    :mod:`moe_kernels.layers`); ``forward`` returns its first two."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, backend: str, device, dtype):
        super().__init__()
        owner = type(self).__name__
        hidden_size, num_experts = _sizes(owner, hidden_size=hidden_size, num_experts=num_experts)
        k = integer(owner, "k", k)
        if not 1 <= k <= num_experts:
            raise ValueError(f"{owner}: k must be an int in [1, num_experts={num_experts}], got {k}")
        check_backend(owner, backend)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.k = k
        self.backend = backend

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (..., H)`` -> router logits ``(..., E)`` in the weight's dtype."""
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids, _ = self.route(hidden)
        return weights, ids

    def extra_repr(self) -> str:
        num_experts, hidden = self.weight.shape
        return f"hidden_size={hidden}, num_experts={num_experts}, k={self.k}, {self._options()}backend={self.backend}"

    def _options(self) -> str:
        """The subclass's options for :meth:`extra_repr`, each followed by ``", "``."""
        return ""


setattr(_LinearGate, RUNS_TAPS, True)


class TopKRouter(_LinearGate):
    """Linear gate + fused :func:`moe_kernels.softmax_topk`.

    ``forward(hidden (..., H)) -> (weights (..., k) float32, ids (..., k) int32)``.
    ``weight (E, H)`` is the gate (the HF ``*TopKRouter.weight`` layout); ``routing`` a
    :class:`~moe_kernels.RoutingConfig` (``TopKRouter(H, E, k, routing=RoutingConfig.renormalize())``,
    default ``RoutingConfig()``); with ``correction_bias=True`` a float32 ``(E,)``
    buffer ``e_score_correction_bias`` biases selection only (DeepSeek-V3), and is not trained by
    gradients.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        *,
        routing: RoutingConfig | None = None,
        correction_bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        routing = routing_or_default("TopKRouter", routing)
        routing.check(num_experts, k, "TopKRouter")
        super().__init__(hidden_size, num_experts, k, backend, device, dtype)
        self.routing = routing
        bias = torch.zeros(num_experts, device=device, dtype=torch.float32) if correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, bias = resolve_selection(self, self.k, self.e_score_correction_bias)  # Counterfactual Routing's k, prior

        def select(logits, ids):
            return softmax_topk(logits, k, routing=self.routing, bias=bias, ids=ids, backend=self.backend)

        return run_taps(self, self.logits(hidden), k, select)

    def _options(self) -> str:
        return f"routing={self.routing}, "


class ProbMoERouter(_LinearGate):
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
        super().__init__(hidden_size, num_experts, k, backend, device, dtype)
        if k_min is not None:
            k_min = integer("ProbMoERouter", "k_min", k_min)
            if not 0 <= k_min <= self.k:
                raise ValueError(f"ProbMoERouter: k_min must be None or an int in [0, k={self.k}], got {k_min}")
        if not isinstance(renormalize, bool):
            raise TypeError(f"ProbMoERouter: renormalize must be a bool, got {type(renormalize).__name__}")
        self.k_min = k_min
        self.renormalize = renormalize

    @classmethod
    def from_gate(
        cls, gate: nn.Module, k: int, *, k_min: int | None = None, renormalize: bool = False, backend: str = "auto"
    ) -> ProbMoERouter:
        """A router sharing ``gate.weight`` (no copy): its gradients update the same tensor; the
        other arguments as for the constructor."""
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(
                f"ProbMoERouter.from_gate: gate must have an (E, H) weight Parameter, got {type(gate).__name__}"
            )
        if getattr(gate, "bias", None) is not None:
            raise ValueError("ProbMoERouter.from_gate: the gate has a bias, which this router does not apply")
        router = cls(
            weight.shape[1], weight.shape[0], k, k_min=k_min, renormalize=renormalize, backend=backend, device="meta"
        )
        router.weight = weight
        return router

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        options = dict(k_min=self.k_min, renormalize=self.renormalize, training=self.training, backend=self.backend)

        def select(logits, ids):
            return probmoe_route(logits, self.k, ids=ids, **options)

        return run_taps(self, self.logits(hidden), self.k, select)

    def _options(self) -> str:
        return f"k_min={self.k_min}, renormalize={self.renormalize}, "


class GatedMLP(nn.Module):
    """A dense gated MLP (a shared expert): ``down(act(gate_up(x)))`` with ``gate_up_proj
    (2I, H)`` (gate rows then up rows) and ``down_proj (H, I)``, the routed experts' layout for
    one expert. ``forward(x (..., H)) -> (..., H)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        hidden_size, intermediate_size = _sizes(
            "GatedMLP", hidden_size=hidden_size, intermediate_size=intermediate_size
        )
        activation = activation_name("GatedMLP", activation)
        self.gate_up_proj = nn.Parameter(
            torch.randn(2 * intermediate_size, hidden_size, device=device, dtype=dtype) * hidden_size**-0.5
        )
        self.down_proj = nn.Parameter(
            torch.randn(hidden_size, intermediate_size, device=device, dtype=dtype) * intermediate_size**-0.5
        )
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = gated_activation(nn.functional.linear(x, self.gate_up_proj), self.activation)
        return nn.functional.linear(hidden, self.down_proj)


def add_shared_expert(
    routed: torch.Tensor, hidden: torch.Tensor, shared_expert: nn.Module | None, shared_gate: nn.Module | None
) -> torch.Tensor:
    """``routed (T, H)`` plus the shared expert's output on ``hidden (T, H)``, gated by
    ``sigmoid(shared_gate(hidden))`` when there is a gate (Qwen2-MoE); ``routed`` itself without
    a shared expert."""
    if shared_expert is None:
        return routed
    shared = shared_expert(hidden)
    if shared_gate is not None:
        shared = torch.sigmoid(shared_gate(hidden)) * shared
    return routed + shared


def router_parts(router: nn.Module, num_experts: int) -> LayerParts:
    """The :class:`~moe_kernels.layers.LayerParts` of a block routed by ``router`` (a module
    returning ``(weights, ids)``) over ``num_experts`` experts: the ``MOE_LAYER`` marker of
    :class:`MoE` and of the expert-parallel block."""
    k = getattr(router, "k", None)
    if not isinstance(k, int):
        raise ValueError(f"the router of an MoE block ({type(router).__name__}) has no int k")
    routing = router.routing if isinstance(router, TopKRouter) else None
    tapped = getattr(router, RUNS_TAPS, False) is True
    return LayerParts(router, num_experts, k, routing, 0, tapped)


def _check_router(router, hidden_size: int, num_experts: int, k: int) -> None:
    """A router given to ``MoE`` must route over its experts: a module, and when it holds an
    ``(E, H)`` gate weight and a ``k``, those of the block."""
    if not isinstance(router, nn.Module):
        raise TypeError(f"MoE: router must be an nn.Module, got {type(router).__name__}")
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and tuple(weight.shape) != (num_experts, hidden_size):
        raise ValueError(
            f"MoE: the router's weight (E, H) is {tuple(weight.shape)}, the block has E={num_experts}, H={hidden_size}"
        )
    router_k = getattr(router, "k", None)
    if router_k is not None and router_k != k:
        raise ValueError(f"MoE: the router selects k={router_k} experts, the block was built with k={k}")


def _moe_parts(block: MoE) -> LayerParts:
    return router_parts(block.router, block.gate_up_proj.shape[0])


class MoE(nn.Module):
    """A mixture-of-experts block: a router, ``num_experts`` routed gated MLPs run by
    :func:`moe_kernels.fused_experts`, and optionally a shared expert with a sigmoid gate
    (Qwen2-MoE / DeepSeek style).

    ``forward(hidden (..., H)) -> (..., H)`` in hidden's dtype. Parameters follow the HF
    transformers v5 layout: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, optional
    ``gate_up_bias (E, 2I)`` / ``down_bias (E, H)``.

    Args:
        hidden_size, intermediate_size, num_experts, k: H, I, E and experts per token.
        router: any module mapping ``hidden (T, H)`` to ``(weights (T, k) float32, ids (T, k)
            int32)`` (:class:`TopKRouter`, :class:`ProbMoERouter`,
            :class:`moe_kernels.knn.KNNRouter`); default a :class:`TopKRouter` with ``routing``.
        routing: the default router's :class:`~moe_kernels.RoutingConfig` (default
            ``RoutingConfig()``; ``MoE(H, I, E, k, routing=RoutingConfig.renormalize())``).
        activation: as for :func:`moe_kernels.fused_experts`.
        expert_bias: give the experts both biases (GPT-OSS).
        shared_intermediate_size: add a shared expert of this width, gated by
            ``sigmoid(shared_gate(x))`` when ``shared_gate`` (Qwen2-MoE), ungated otherwise
            (DeepSeek-V3).
        backend: the ops' backend.
        track_load: store each forward's :class:`moe_kernels.balance.LoadStats` of the routed ids
            as ``last_load`` (a few small device ops, no host sync; off by default so that
            inference and CUDA-graph / compiled forwards carry no extra work or side effect).
            Settable later, also for a whole model with :func:`moe_kernels.balance.track_load`;
            it taps the router (a router set later starts untracked). Needs one of this
            package's routers.
        keep_router_logits: store each forward's router logits ``(T, E)`` (the flat tokens, still
            in the autograd graph) as ``last_router_logits``, for
            :func:`moe_kernels.balance.switch_aux_loss` / :func:`~moe_kernels.balance.router_z_loss`.
            Needs a router with a ``route`` method (this package's routers).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        k: int,
        *,
        router: nn.Module | None = None,
        routing: RoutingConfig | None = None,
        activation: str = "silu",
        expert_bias: bool = False,
        shared_intermediate_size: int | None = None,
        shared_gate: bool = False,
        backend: str = "auto",
        track_load: bool = False,
        keep_router_logits: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if router is not None and routing is not None:
            raise ValueError("MoE: routing applies to the default router only, got a router as well")
        sizes = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts, k=k)
        hidden_size, intermediate_size, num_experts, k = _sizes("MoE", **sizes)
        activation = activation_name("MoE", activation)
        check_backend("MoE", backend)
        if router is not None:
            _check_router(router, hidden_size, num_experts, k)
        self.router = router or TopKRouter(
            hidden_size, num_experts, k, routing=routing, backend=backend, device=device, dtype=dtype
        )
        factory = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(
            torch.randn(num_experts, 2 * intermediate_size, hidden_size, **factory) * hidden_size**-0.5
        )
        self.down_proj = nn.Parameter(
            torch.randn(num_experts, hidden_size, intermediate_size, **factory) * intermediate_size**-0.5
        )
        self.gate_up_bias = (
            nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, **factory)) if expert_bias else None
        )
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **factory)) if expert_bias else None
        self.shared_expert = None
        self.shared_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, activation=activation, **factory)
            if shared_gate:
                self.shared_gate = nn.Linear(hidden_size, 1, bias=False, **factory)
        self.activation = activation
        self.backend = backend
        self.track_load = track_load
        self.keep_router_logits = keep_router_logits
        self.last_router_logits: torch.Tensor | None = None

    @property
    def track_load(self) -> bool:
        """Whether each forward stores its :class:`~moe_kernels.balance.LoadStats` (settable)."""
        return load_tracker(self.router) is not None

    @track_load.setter
    def track_load(self, enabled: bool) -> None:
        set_load_tracking(self.router, self.gate_up_proj.shape[0], enabled, f"{type(self).__name__}.track_load")

    @property
    def last_load(self) -> LoadStats | None:
        """The last tracked forward's :class:`~moe_kernels.balance.LoadStats` (None before one)."""
        tracker = load_tracker(self.router)
        return None if tracker is None else tracker.last

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != self.gate_up_proj.dtype:
            raise TypeError(
                f"MoE: hidden must have the block's dtype {self.gate_up_proj.dtype}, got {hidden.dtype} "
                "(cast it, or the block with .to(dtype))"
            )
        lead, hidden_size = hidden.shape[:-1], hidden.shape[-1]
        flat = hidden.reshape(-1, hidden_size)
        if self.keep_router_logits:
            route = getattr(self.router, "route", None)
            if route is None:
                raise ValueError(
                    f"MoE: keep_router_logits needs a router with a route method, got {type(self.router).__name__}"
                )
            weights, ids, self.last_router_logits = route(flat)
        else:
            weights, ids = self.router(flat)
        biases = dict(gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        options = dict(activation=self.activation, backend=self.backend, **biases)
        out = fused_experts(flat, self.gate_up_proj, self.down_proj, weights, ids, **options)
        return add_shared_expert(out, flat, self.shared_expert, self.shared_gate).reshape(*lead, hidden_size)

    def extra_repr(self) -> str:
        num_experts, width, hidden = self.gate_up_proj.shape
        return (
            f"hidden_size={hidden}, intermediate_size={width // 2}, num_experts={num_experts}, "
            f"activation={self.activation}, backend={self.backend}"
        )


setattr(MoE, MOE_LAYER, staticmethod(_moe_parts))  # how layers.find_moe_layers reads a block
