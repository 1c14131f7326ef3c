"""An expert-parallel MoE block: the experts of a :class:`moe_kernels.MoE` split across the ranks
of a process group, tokens exchanged by :func:`dispatch` / :func:`combine`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from moe_kernels.activations import gated_activation
from moe_kernels.distributed.exchange import combine, dispatch
from moe_kernels.distributed.layout import DispatchHandle, group_rank_and_size, local_expert_count
from moe_kernels.functional import grouped_mm
from moe_kernels.layers import MOE_LAYER, LayerParts
from moe_kernels.nn import MoE, add_shared_expert, router_parts


class ExpertParallelMoE(nn.Module):
    """A :class:`moe_kernels.MoE` whose routed experts are sharded over a process group.

    Rank ``r`` of a group of ``W`` holds experts ``[r * E / W, (r + 1) * E / W)`` only:
    ``gate_up_proj (E/W, 2I, H)``, ``down_proj (E/W, H, I)`` and, when the block has them,
    ``gate_up_bias (E/W, 2I)`` / ``down_bias (E/W, H)``. The router, the shared expert and its
    gate are replicated (each rank applies them to its own tokens, as :class:`MoE` does).

    ``forward(hidden (..., H)) -> (..., H)`` in hidden's dtype computes
    ``route -> dispatch -> local experts (two grouped GEMMs around the gated activation) ->
    combine (+ shared expert)``: on each rank's tokens, the unsharded block's output. The expert
    weights' gradients are the unsharded block's gradient slice summed over every rank's tokens;
    the router's and the shared expert's are this rank's contribution (reduce them across data
    parallel ranks as for any replicated parameter). Ranks may hold different numbers of tokens,
    zero included. Collective: every rank of the group runs forward (and backward) together, with
    the same ``requires_grad`` on its input (a difference raises on every rank). Three host
    synchronisations per forward (the dispatch's header and split sizes, the combine's header).

    Build it with :meth:`from_moe` from a :class:`MoE` built identically (same seed) on every rank.
    """

    def __init__(
        self,
        router: nn.Module,
        gate_up_proj: nn.Parameter,
        down_proj: nn.Parameter,
        *,
        num_experts: int,
        activation: str = "silu",
        gate_up_bias: nn.Parameter | None = None,
        down_bias: nn.Parameter | None = None,
        shared_expert: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        backend: str = "auto",
        group=None,
    ):
        super().__init__()
        rank, world = group_rank_and_size(group, "ExpertParallelMoE")
        num_local = local_expert_count(num_experts, world, "ExpertParallelMoE")
        if gate_up_proj.dim() != 3 or gate_up_proj.shape[0] != num_local:
            raise ValueError(
                f"ExpertParallelMoE: gate_up_proj must have shape (E/W, 2I, H) with E/W = {num_local}, "
                f"got {tuple(gate_up_proj.shape)}"
            )
        num_local, width, hidden = gate_up_proj.shape
        if tuple(down_proj.shape) != (num_local, hidden, width // 2) or width % 2:
            raise ValueError(
                f"ExpertParallelMoE: down_proj must have shape (E/W, H, I) = ({num_local}, {hidden}, {width // 2}) "
                f"to match gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}"
            )
        # Replicated on every rank: the router and the shared expert with its gate.
        self.router, self.shared_expert, self.shared_gate = router, shared_expert, shared_gate
        # This rank's slice of the routed experts.
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias
        self.num_experts, self.activation, self.backend = num_experts, activation, backend
        self.group, self.rank, self.world_size = group, rank, world

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> ExpertParallelMoE:
        """This rank's share of ``moe``: copies of its expert slice, its router and shared expert
        (the new block shares no tensor with ``moe``, which may be freed). ``ValueError`` when the
        number of experts is not divisible by the group's size."""
        if not isinstance(moe, MoE):
            raise TypeError(f"ExpertParallelMoE.from_moe: moe must be a moe_kernels.MoE, got {type(moe).__name__}")
        rank, world = group_rank_and_size(group, "ExpertParallelMoE.from_moe")
        num_experts = moe.gate_up_proj.shape[0]
        num_local = local_expert_count(num_experts, world, "ExpertParallelMoE.from_moe")
        block = slice(rank * num_local, (rank + 1) * num_local)

        def shard(param):
            if param is None:
                return None
            return nn.Parameter(param.detach()[block].clone(), requires_grad=param.requires_grad)

        return cls(
            copy.deepcopy(moe.router),
            shard(moe.gate_up_proj),
            shard(moe.down_proj),
            num_experts=num_experts,
            activation=moe.activation,
            gate_up_bias=shard(moe.gate_up_bias),
            down_bias=shard(moe.down_bias),
            shared_expert=copy.deepcopy(moe.shared_expert),
            shared_gate=copy.deepcopy(moe.shared_gate),
            backend=moe.backend,
            group=group,
        )

    def experts(self, recv_x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """The local experts on the dispatched rows: ``recv_x (R, H)`` grouped by local expert ->
        ``(R, H)`` in ``recv_x.dtype``, ``down(act(gate_up(x) + b1) + b2)`` row by row."""
        # The Triton path takes no float64: float64 runs the PyTorch path on any device.
        backend = "torch" if recv_x.dtype == torch.float64 else self.backend
        hidden = grouped_mm(recv_x, self.gate_up_proj.transpose(1, 2), handle.offsets, backend=backend)
        if self.gate_up_bias is not None:
            hidden = hidden + self.gate_up_bias[handle.expert_ids]
        act = gated_activation(hidden, self.activation)
        out = grouped_mm(act, self.down_proj.transpose(1, 2), handle.offsets, backend=backend)
        if self.down_bias is not None:
            out = out + self.down_bias[handle.expert_ids]
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead, hidden_size = hidden.shape[:-1], hidden.shape[-1]
        flat = hidden.reshape(-1, hidden_size)
        weights, ids = self.router(flat)
        recv_x, handle = dispatch(flat, ids, self.num_experts, self.group)
        out = combine(self.experts(recv_x, handle), handle, weights)
        return add_shared_expert(out, flat, self.shared_expert, self.shared_gate).reshape(*lead, hidden_size)

    def extra_repr(self) -> str:
        num_local, width, hidden = self.gate_up_proj.shape
        first = self.rank * num_local
        fields = {
            "hidden_size": hidden,
            "intermediate_size": width // 2,
            "num_experts": self.num_experts,
            "local_experts": f"[{first}, {first + num_local})",
            "world_size": self.world_size,
            "activation": self.activation,
            "backend": self.backend,
        }
        return ", ".join(f"{name}={value}" for name, value in fields.items())


def _expert_parallel_parts(block: ExpertParallelMoE) -> LayerParts:
    return router_parts(block.router, block.num_experts)  # the router's E: all experts, not this rank's


# Routing replay, load metrics and Counterfactual Routing find the block (moe_kernels.layers).
setattr(ExpertParallelMoE, MOE_LAYER, staticmethod(_expert_parallel_parts))
