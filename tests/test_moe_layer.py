"""The MoE block: router + fused experts (+ shared expert), against a per-token float64 loop."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import assert_compile_matches_eager

import moe_kernels as mk
from moe_kernels.config import RoutingConfig
from moe_kernels.ops.tuned_configs import pinned_config
from moe_kernels.reference.experts import gated_activation
from moe_kernels.testing import assert_close


def _loop(block: mk.MoE, hidden: torch.Tensor) -> torch.Tensor:
    """The block's output by a per-token, per-slot loop in float64."""
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    weights, ids = block.router(hidden.reshape(-1, hidden.shape[-1]))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            if e < 0:
                continue
            h = block.gate_up_proj[e].double() @ x[t]
            if block.gate_up_bias is not None:
                h = h + block.gate_up_bias[e].double()
            y = block.down_proj[e].double() @ gated_activation(h, block.activation)
            if block.down_bias is not None:
                y = y + block.down_bias[e].double()
            out[t] += w * y
        if block.shared_expert is not None:  # float64 copies: Module.double() converts in place
            shared = copy.deepcopy(block.shared_expert).double()(x[t])
            if block.shared_gate is not None:
                shared = torch.sigmoid(copy.deepcopy(block.shared_gate).double()(x[t])) * shared
            out[t] += shared
    return out.reshape(hidden.shape)


@pytest.mark.parametrize(
    "options",
    [
        dict(routing=RoutingConfig.renormalize()),
        dict(shared_intermediate_size=12, shared_gate=True),
        dict(shared_intermediate_size=12),
        dict(activation="gpt_oss", expert_bias=True, routing=RoutingConfig.renormalize()),
    ],
    ids=["mixtral-like", "qwen2-moe-like", "deepseek-like", "gpt-oss-like"],
)
def test_block_matches_loop(options):
    block = mk.MoE(16, 8, 6, 2, **options)
    if block.gate_up_bias is not None:
        torch.nn.init.normal_(block.gate_up_bias)
        torch.nn.init.normal_(block.down_bias)
    hidden = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert_close(block(hidden), _loop(block, hidden), dtype=torch.float32)


def test_block_trains_every_parameter():
    block = mk.MoE(16, 8, 4, 2, shared_intermediate_size=8, shared_gate=True)
    block(torch.randn(32, 16)).square().sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


def test_block_with_probmoe_router_and_compile():
    block = mk.MoE(16, 8, 4, 2, router=mk.ProbMoERouter(16, 4, 2)).eval()
    assert_compile_matches_eager(block, (torch.randn(9, 16),))
    with pytest.raises(ValueError, match="routing applies to the default router only"):
        mk.MoE(16, 8, 4, 2, router=mk.ProbMoERouter(16, 4, 2), routing=RoutingConfig.renormalize())


@pytest.mark.kernel
def test_block_kernel_path(kernel_device):
    block = mk.MoE(16, 8, 4, 2, shared_intermediate_size=8, backend="triton", device=kernel_device)
    hidden = torch.randn(11, 16, device=kernel_device)
    tiles = pinned_config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if kernel_device == "cpu" else contextlib.nullcontext()
    with tiles, torch.no_grad():
        got = block(hidden)
    assert_close(got.cpu(), _loop(block, hidden).cpu(), dtype=torch.float32)
