"""HF transformers MoE blocks, patched by :func:`moe_kernels.integrations.transformers.apply_moe_kernels`
against the same blocks unpatched (HF eager), forward and forward+backward, at decode and prefill
token counts. Each block is built from its family's config at the public model's sizes (random
weights; DeepSeek-V3 with 32 local experts; the integration's family registry), so no download is
needed.

    python -m benchmarks.bench_hf --quick
    python -m benchmarks.bench_hf --family qwen3_moe --tokens 1 64 4096 16384
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device, time_fn, warm_up
from benchmarks.points import add_speedups, dtype_name
from moe_kernels.integrations.transformers.families import FAMILIES

OP_NAME = "hf_moe_block"
DECODE_TOKENS = (1, 8, 64)
PREFILL_TOKENS = (4096, 16384)
PROVIDERS = ("hf_eager", "moe_kernels")  # the block as HF runs it, then patched
TABLE_COLUMNS = ("family", "T", "direction", "provider", "median_us", "speedup_vs_hf", "timer")

# A CPU smoke run: every family at a tiny size.
QUICK_SIZES = dict(hidden_size=32, intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=24)


class _Holder(nn.Module):
    """A block with a ``config``: what ``apply_moe_kernels`` patches (it walks ``modules()``)."""

    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.block, self.config = block, config


def build_block(family: str, *, quick: bool, device, dtype) -> _Holder:
    """The family's MoE block, random weights, at the public model's sizes (tiny with ``quick``)."""
    import transformers

    family_entry = FAMILIES[family]
    sizes = dict(family_entry.public_sizes)
    if quick:
        sizes = {key: QUICK_SIZES.get(key, value) for key, value in sizes.items()}
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if key in sizes:
                sizes[key] = 8
        sizes["num_experts_per_tok"] = 2
        if "n_group" in sizes:
            sizes.update(n_group=4, topk_group=2)
    config = getattr(transformers, family_entry.config_class)(**sizes)
    block_class = getattr(importlib.import_module(family_entry.module), family_entry.block)
    with torch.device(device):
        block = block_class(config).to(dtype)
    for param in block.parameters():
        nn.init.normal_(param, std=0.02)  # transformers leaves some expert weights uninitialised
    if hasattr(getattr(block, "gate", None), "e_score_correction_bias"):
        nn.init.normal_(block.gate.e_score_correction_bias, std=0.1)
    return _Holder(block, config)


def run(
    *,
    quick: bool = False,
    device=None,
    tokens: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
    directions: Sequence[str] = ("fwd", "fwd+bwd"),
) -> list[dict]:
    """Rows of every (family, T, direction): the HF block, then the patched one."""
    device = resolve_device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = tokens or ((1, 16) if quick else DECODE_TOKENS + PREFILL_TOKENS)
    rows = []
    for family in families or FAMILIES:
        holder = build_block(family, quick=quick, device=device, dtype=dtype)
        hidden_size = holder.config.hidden_size
        for num_tokens in tokens:
            hidden = torch.randn(1, num_tokens, hidden_size, device=device, dtype=dtype)
            for direction in directions:
                case = {"op": OP_NAME, "family": family, "T": num_tokens, "direction": direction}
                case["dtype"] = dtype_name(dtype)
                backward = direction == "fwd+bwd"
                point = [{**case, "provider": p, **_timing(holder, hidden, backward, p, device)} for p in PROVIDERS]
                add_speedups(point, (("speedup_vs_hf", "hf_eager"),))
                rows += point
        del holder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _timing(holder: _Holder, hidden: torch.Tensor, backward: bool, provider: str, device) -> dict:
    """:func:`time_fn` of the block's forward (and backward), patched while the provider is
    moe_kernels."""
    from moe_kernels.integrations.transformers import apply_moe_kernels, revert_moe_kernels

    if provider == "moe_kernels":
        apply_moe_kernels(holder)
    try:
        call = _call(holder.block, hidden, backward)  # after patching: it lists the block's parameters
        warm_up(call, device)
        return time_fn(call, device=device)
    finally:
        if provider == "moe_kernels":
            revert_moe_kernels(holder)


def _call(block: nn.Module, hidden: torch.Tensor, backward: bool):
    def output():
        out = block(hidden)
        return out[0] if isinstance(out, tuple) else out

    if not backward:
        return lambda: torch.no_grad()(output)()
    params = [p for p in block.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(output().float().square().mean(), params, allow_unused=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_hf", __doc__, "every family at a tiny size, T in (1, 16)")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--family", action="append", dest="families", choices=tuple(FAMILIES))
    parser.add_argument("--direction", action="append", choices=("fwd", "fwd+bwd"), dest="directions")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
