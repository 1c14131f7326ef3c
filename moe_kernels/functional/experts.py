"""Public expert-compute ops: routing counts and the fused MoE experts op."""

from __future__ import annotations

import torch

from moe_kernels.config import activation_name, is_int
from moe_kernels.functional import _checks as check
from moe_kernels.ops import align
from moe_kernels.ops.align import MoEAlignment
from moe_kernels.ops.experts import FUSED_EXPERTS
from moe_kernels.utils import slot_experts, use_triton


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots routed to each expert: ``ids (T, k)`` int32/int64 (-1 = empty, not counted) ->
    ``(E,)`` int32 on ids' device, computed there without a host sync."""
    _check_ids(ids, num_experts, "expert_counts")
    return align.key_counts(slot_experts(ids, num_experts), num_experts)[:num_experts]


def moe_align(ids: torch.Tensor, num_experts: int) -> MoEAlignment:
    """The routing slots sorted by expert, as :func:`fused_experts` uses them: ``ids (T, k)``
    int32/int64 (-1 = empty) -> :class:`~moe_kernels.ops.align.MoEAlignment` (``order``,
    ``tokens``, ``experts``, ``positions`` of shape ``(T*k,)``, ``counts`` and ``offsets`` of shape
    ``(E,)``), computed on ids' device without a host sync; every shape is fixed by T, k and E, so
    the call can be captured in a CUDA graph.

    Unlike vLLM's ``moe_align_block_size`` there is no ``block_m`` padding: the grouped GEMM maps
    its row tiles to experts from ``offsets`` on the device, so no padded copy of the
    activations is ever made.
    """
    _check_ids(ids, num_experts, "moe_align")
    return align.moe_align(ids, num_experts)


def fused_experts(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The experts of an MoE layer: for every token, the routing-weighted sum over its k slots of
    the gated MLP of the slot's expert (HF transformers v5 layout).

    Args:
        hidden: ``(T, H)`` float32 / float16 / bfloat16 activations (float64 with
            ``backend="torch"``).
        gate_up_proj: ``(E, 2I, H)``, hidden's dtype: gate rows then up rows (GPT-OSS:
            interleaved gate/up rows). Any strides; on the CPU contiguous weights are fastest
            (oneDNN reorders a strided 16-bit operand on every call: transposed views of
            ``(E, H, 2I)`` storage ran bfloat16 decode 2-2.5x slower, float32 1.0-1.45x), which
            is why :func:`moe_kernels.integrations.transformers.apply_moe_kernels` re-lays them.
        down_proj: ``(E, H, I)``, hidden's dtype (the same holds).
        weights: ``(T, k)`` float32 routing weights (float64 with float64 hidden), as returned by
            :func:`moe_kernels.softmax_topk`; float16 / bfloat16 weights (what a transformers
            router returns) are converted to float32 first.
        ids: ``(T, k)`` int32 / int64 expert ids in ``[-1, E)``; -1 marks an empty slot that
            contributes nothing (dynamic-k routing, expert-parallel local maps).
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (GeGLU, erf), ``"gelu_tanh"`` (GeGLU, tanh
            approximation) or ``"gpt_oss"`` (GPT-OSS: interleaved, clamped at 7, ``(up + 1) *
            gate * sigmoid(1.702 gate)``), or the :class:`~moe_kernels.Activation` member.
        gate_up_bias: optional ``(E, 2I)``; down_bias: optional ``(E, H)``, hidden's dtype.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``(T, H)`` in hidden's dtype::

            out[t] = sum_j weights[t, j] * (down_proj[e] @ act(gate_up_proj[e] @ hidden[t] + gate_up_bias[e])
                                            + down_bias[e]),   e = ids[t, j] != -1

    Gradients flow to ``hidden``, both projections, ``weights`` and both biases; ``ids`` is not
    differentiable. Saved for backward: the inputs (no copies) and, on the Triton path, the
    pre-activation ``h`` of every slot, ``T * k * 2I`` elements of hidden's dtype (the activation
    is recomputed from it), written only when an input requires grad (the reference path
    recomputes what its backward needs and saves nothing); the activation itself is
    computed in the up projection's epilogue from its float32 accumulators. Intermediates are
    kept in hidden's dtype, GEMMs accumulate in float32. ``ids`` outside ``[-1, E)`` raise on
    CPU; on CUDA they fail a device-side assert (checked asynchronously, without a host sync).
    """
    activation = activation_name("fused_experts", activation)
    if isinstance(weights, torch.Tensor) and weights.dtype in (torch.float16, torch.bfloat16):
        weights = weights.float()  # what an HF router returns: computed in float32 as the op does
    triton_path = use_triton(backend, hidden.device, "fused_experts")
    # The Triton path checks ids inside its alignment kernel (one flag, asserted asynchronously),
    # so no separate device check is queued here.
    _check_args(
        hidden,
        gate_up_proj,
        down_proj,
        weights,
        ids,
        activation,
        gate_up_bias,
        down_bias,
        assert_on_device=not triton_path,
    )
    check.not_float64_on_triton("fused_experts", "hidden", hidden, triton_path)
    # The kernels and the CPU path store the pre-activation h only when a backward can read it
    # (the reference's backward, elsewhere, recomputes its intermediates: it never needs h).
    save_h = (
        (triton_path or hidden.is_cpu)
        and torch.is_grad_enabled()
        and any(
            t is not None and t.requires_grad
            for t in (hidden, gate_up_proj, down_proj, weights, gate_up_bias, down_bias)
        )
    )
    out, _ = FUSED_EXPERTS(
        hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, triton_path, save_h
    )
    return out


def _check_ids(ids, num_experts, op_name, assert_on_device=True):
    if not isinstance(ids, torch.Tensor) or ids.dtype not in check.ID_DTYPES or ids.dim() != 2:
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{op_name}: ids must be a (T, k) int32 or int64 tensor, got {got}")
    if not is_int(num_experts) or num_experts < 1:
        raise ValueError(f"{op_name}: num_experts must be an int >= 1, got {num_experts!r}")
    check.ids_in_range(
        op_name, "ids", ids, -1, num_experts, "E", what="-1 marks an empty slot", assert_on_device=assert_on_device
    )


def _check_args(
    hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, assert_on_device=True
):
    name = "fused_experts"
    check.tensor(name, "hidden", hidden, dims=2, shape="(T, H)")
    device = hidden.device
    for arg, tensor, dims, shape in (
        ("gate_up_proj", gate_up_proj, 3, "(E, 2I, H)"),
        ("down_proj", down_proj, 3, "(E, H, I)"),
        ("weights", weights, 2, "(T, k)"),
    ):
        check.tensor(name, arg, tensor, dims=dims, shape=shape, device=device, device_of="hidden")
    check.tensor(name, "hidden", hidden, dtypes=check.FLOAT_DTYPES)
    num_tokens, hidden_size = hidden.shape
    num_experts, width, gate_up_hidden = gate_up_proj.shape
    if width % 2 or gate_up_hidden != hidden_size:
        raise ValueError(
            f"{name}: gate_up_proj must have shape (E, 2I, H) with H={hidden_size}, got {tuple(gate_up_proj.shape)}"
        )
    inter = width // 2
    if tuple(down_proj.shape) != (num_experts, hidden_size, inter):
        raise ValueError(
            f"{name}: down_proj must have shape (E, H, I) = ({num_experts}, {hidden_size}, {inter}), "
            f"got {tuple(down_proj.shape)}"
        )
    for arg, tensor in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if tensor.dtype != hidden.dtype:
            raise TypeError(f"{name}: {arg} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")
    _check_ids(ids, num_experts, name, assert_on_device)
    if ids.device != hidden.device:
        raise ValueError(f"{name}: ids must be on hidden's device {hidden.device}, got {ids.device}")
    if tuple(ids.shape[:1]) != (num_tokens,) or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(
            f"{name}: weights and ids must both have shape (T, k) with T={num_tokens}, got weights "
            f"{tuple(weights.shape)} and ids {tuple(ids.shape)}"
        )
    weight_dtypes = (torch.float32, torch.float64) if hidden.dtype == torch.float64 else (torch.float32,)
    if weights.dtype not in weight_dtypes:
        raise TypeError(f"{name}: weights must be float32 (or 16-bit, converted), got {weights.dtype}")
    for arg, bias, shape in (
        ("gate_up_bias", gate_up_bias, (num_experts, width)),
        ("down_bias", down_bias, (num_experts, hidden_size)),
    ):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != shape or bias.dtype != hidden.dtype:
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{name}: {arg} must be None or a {hidden.dtype} tensor of shape {shape}, got {got}")
        if bias.device != hidden.device:
            raise ValueError(f"{name}: {arg} must be on hidden's device {hidden.device}, got {bias.device}")
