"""The gated activations as Triton device functions, shared by the experts' elementwise kernels
(``_experts.py``) and the grouped GEMM's fused epilogue (``_grouped_mm.py``). The ``ACTIVATION``
constexpr is a :class:`moe_kernels.config.Activation` code."""

import triton
import triton.language as tl

from moe_kernels.config import Activation

# The ``ACTIVATION`` constexpr's codes, by name (a kernel reads globals only as constexprs).
SILU = tl.constexpr(Activation.SILU.value)
GELU = tl.constexpr(Activation.GELU.value)
GELU_TANH = tl.constexpr(Activation.GELU_TANH.value)
GPT_OSS = tl.constexpr(Activation.GPT_OSS.value)


@triton.jit
def gate_up_offsets(cols, I, ACTIVATION: tl.constexpr):
    """Column offsets of the gate and up halves of a ``2I`` row: ``[gate | up]``, or interleaved
    ``[g0 u0 g1 u1 ...]`` for GPT-OSS."""
    if ACTIVATION == GPT_OSS:
        return 2 * cols, 2 * cols + 1
    return cols, cols + I


@triton.jit
def gated_activation(gate, up, limit, alpha, ACTIVATION: tl.constexpr):
    """``act`` and its partial derivatives ``(d act / d gate, d act / d up)``, float32."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(gate)
        act = gate * s * up
        d_gate = up * s * (1.0 + gate * (1.0 - s))
        d_up = gate * s
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        act = gate * cdf * up
        d_gate = up * (cdf + gate * pdf)
        d_up = gate * cdf
    elif ACTIVATION == GELU_TANH:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh
        dt = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * gate * gate)
        act = 0.5 * gate * (1.0 + t) * up
        d_gate = up * (0.5 * (1.0 + t) + 0.5 * gate * dt)
        d_up = 0.5 * gate * (1.0 + t)
    else:
        # GPT-OSS: clamp, then (up + 1) * gate * sigmoid(alpha * gate); a clamped input passes no
        # gradient (the boundary itself does, as torch's clamp).
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        s = tl.sigmoid(alpha * g)
        act = (u + 1.0) * g * s
        d_gate = tl.where(gate <= limit, (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s)), 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), g * s, 0.0)
    return act, d_gate, d_up
