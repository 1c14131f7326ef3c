"""The small models and batches the Counterfactual Routing tests share."""

from __future__ import annotations

import torch

from moe_kernels import MoE, cor

VOCAB = 32


def tiny_lm(dtype=torch.float64, **sizes) -> cor.TinyMoELM:
    """A seeded :class:`~moe_kernels.cor.TinyMoELM` in eval mode: 2 layers of 4 experts (k = 2)
    over a 32-token vocabulary, ``sizes`` overriding any of its constructor's arguments."""
    torch.manual_seed(0)
    defaults = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_experts=4, k=2, intermediate_size=8)
    return cor.TinyMoELM(**{**defaults, **sizes}, dtype=dtype).eval()


def token_batches(num=2, seqs=2, seq_len=6, seed=1) -> list[torch.Tensor]:
    """``num`` batches of ``(seqs, seq_len)`` random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (seqs, seq_len), generator=generator) for _ in range(num)]


def moe_blocks(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
