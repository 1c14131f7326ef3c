"""The experts' gated activations in PyTorch: the production code of :class:`moe_kernels.nn.GatedMLP`
(the shared expert), the expert-parallel layer and the CPU experts path. The Triton kernels compute
the same in their epilogues (``kernels/activations.py``); the oracle is
:func:`moe_kernels.reference.experts.gated_activation` (whose backward is autograd's, so that this
module's written-out backward is checked against an independent derivation).

Both functions compute in float32 for 16-bit inputs (float64 stays float64) and return the
input's dtype: ``gate_up (..., 2I)`` holds the gate then the up columns, interleaved for GPT-OSS.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation
from moe_kernels.utils import compute_dtype

_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# The gate nonlinearity of each GLU activation (GPT-OSS's clamped form is written out below).
_GATES = {
    Activation.SILU: F.silu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: functools.partial(F.gelu, approximate="tanh"),
}


def _split(gate_up: torch.Tensor, code: Activation, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` views of ``gate_up`` along ``dim``: interleaved for GPT-OSS, halves otherwise."""
    if code == Activation.GPT_OSS:
        dim %= gate_up.dim()
        return gate_up.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return gate_up.chunk(2, dim=dim)


def _halves(gate_up: torch.Tensor, code: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` of ``gate_up (..., 2I)`` in the compute dtype."""
    return _split(gate_up.to(compute_dtype(gate_up.dtype)), code, -1)


def gated_activation(
    gate_up: torch.Tensor, activation: str | Activation, dim: int = -1, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``act`` of ``gate_up``, whose ``dim`` (``2I`` long, the last by default) becomes ``I`` long:
    ``gate_fn(gate) * up`` (SwiGLU, GeGLU with erf or tanh), or GPT-OSS's ``(up + 1) * gate *
    sigmoid(alpha * gate)`` on the clamped halves. ``dim=0`` serves the CPU path's ``(2I, rows)``
    pre-activations (features first). ``scale`` (optional, broadcast against ``act``: each row's
    routing weight) multiplies it before its one rounding to ``gate_up``'s dtype. Differentiable
    by autograd."""
    code = Activation.parse(activation)
    gate, up = _split(gate_up, code, dim)
    work = compute_dtype(gate_up.dtype)
    if code == Activation.GPT_OSS:
        gate, up = gate.to(work).clamp(max=GPT_OSS_LIMIT), up.to(work).clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        act = (up + 1.0) * gate * torch.sigmoid(GPT_OSS_ALPHA * gate)
    else:  # the 16-bit up half joins the float32 product as it is read (no float32 copy of it)
        act = _GATES[code](gate.to(work)) * up
    if scale is not None:
        act = act.mul_(scale) if not act.requires_grad else act * scale
    return act.to(gate_up.dtype)


def gated_activation_backward(
    grad_act: torch.Tensor, gate_up: torch.Tensor, activation: str | Activation
) -> torch.Tensor:
    """The gradient of :func:`gated_activation` written out: ``grad_act (..., I)``, ``gate_up
    (..., 2I)`` -> ``grad_gate_up (..., 2I)`` in ``gate_up.dtype`` (one pass, no graph). GPT-OSS's
    clamps pass the gradient where ``-limit <= x <= limit`` (the boundary included, as autograd's
    ``clamp``) and zero elsewhere."""
    code = Activation.parse(activation)
    gate, up = _halves(gate_up, code)
    grad = grad_act.to(gate.dtype)
    if code == Activation.SILU:
        s = torch.sigmoid(gate)
        grad_gate = grad * up * s * (1.0 + gate * (1.0 - s))
        grad_up = grad * gate * s
    elif code == Activation.GELU:
        cdf = 0.5 * (1.0 + torch.erf(gate * _INV_SQRT2))
        pdf = torch.exp(-0.5 * gate * gate) * _INV_SQRT_2PI
        grad_gate = grad * up * (cdf + gate * pdf)
        grad_up = grad * gate * cdf
    elif code == Activation.GELU_TANH:
        t = torch.tanh(_GELU_TANH_C * (gate + 0.044715 * gate**3))
        dt = (1.0 - t * t) * _GELU_TANH_C * (1.0 + 3.0 * 0.044715 * gate * gate)
        grad_gate = grad * up * (0.5 * (1.0 + t) + 0.5 * gate * dt)
        grad_up = grad * 0.5 * gate * (1.0 + t)
    else:
        limit, alpha = GPT_OSS_LIMIT, GPT_OSS_ALPHA
        g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
        s = torch.sigmoid(alpha * g)
        grad_gate = torch.where(gate <= limit, grad * (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s)), 0.0)
        grad_up = torch.where((up >= -limit) & (up <= limit), grad * g * s, 0.0)
    if code == Activation.GPT_OSS:
        joined = torch.stack((grad_gate, grad_up), dim=-1).flatten(-2)
    else:
        joined = torch.cat((grad_gate, grad_up), dim=-1)
    return joined.to(gate_up.dtype)
