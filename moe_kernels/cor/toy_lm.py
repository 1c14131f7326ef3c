"""A tiny causal MoE language model built from :class:`moe_kernels.MoE` blocks, for CoR's tests,
benchmark and examples (random weights; no training here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import RoutingConfig
from moe_kernels.nn import MoE


@dataclass
class LMOutput:
    """``logits (B, S, V)``, as HF causal LMs return them."""

    logits: torch.Tensor


class _Block(nn.Module):
    def __init__(self, hidden_size, num_heads, moe: MoE, dtype):
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False, dtype=dtype)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        self.moe_norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.moe = moe

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.moe(self.moe_norm(x))


class TinyMoELM(nn.Module):
    """Embedding, ``num_layers`` blocks of causal self-attention + :class:`moe_kernels.MoE`
    (pre-norm, residual), a final norm and an LM head.

    ``forward(input_ids (B, S) int64, attention_mask (B, S) | None = None) -> LMOutput(logits
    (B, S, V))`` in the model's dtype; padding positions (mask 0) are not attended to.
    ``routing`` / ``correction_bias`` configure every layer's :class:`moe_kernels.TopKRouter`
    (e.g. ``RoutingConfig.deepseek_v3(num_groups=2, topk_groups=1)`` with a correction bias).
    """

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_experts: int = 4,
        k: int = 2,
        *,
        intermediate_size: int = 16,
        num_heads: int = 2,
        routing: RoutingConfig | None = None,
        correction_bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size, dtype=dtype)
        blocks = []
        for _ in range(num_layers):
            moe = MoE(hidden_size, intermediate_size, num_experts, k, routing=routing, backend="auto", dtype=dtype)
            if correction_bias:
                moe.router.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
            blocks.append(_Block(hidden_size, num_heads, moe, dtype))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(hidden_size, dtype=dtype)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LMOutput:
        seq = input_ids.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:  # keys that are padding are not attended to (a row always sees itself)
            eye = torch.eye(seq, dtype=torch.bool, device=input_ids.device)
            mask = mask & (attention_mask[:, None, None, :] != 0) | eye
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        return LMOutput(self.head(self.norm(x)))
