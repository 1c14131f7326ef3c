"""Helpers for testing ops against their references (used by the tests and ``moe-kernels validate``).

- :data:`TOLERANCES`: the one table of ``(atol, rtol)`` per dtype.
- :func:`assert_close` / :func:`max_errors`: compare an output with a (float64) reference.
- :data:`PLAIN_FACTOR` / :func:`assert_within_plain` / :func:`plain_fused_experts`: the rule for
  16-bit results computed the way plain PyTorch computes them (the CPU experts path): their error
  against float64 within twice plain PyTorch's in the same dtype.
- :func:`poisoned_outputs` / :func:`assert_written`: prove every output element was written.
- :func:`make_routing_logits` / :func:`make_bias`: tie-free routing inputs, so ids can be
  compared exactly.
- :func:`tiny_hf_config`: a small transformers config per supported MoE family (the HF
  integration tests and the generation benchmark build their models from it), from the
  integration's family registry.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from moe_kernels import utils
from moe_kernels.config import DEFAULT_ROUTING, GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation, RoutingConfig
from moe_kernels.reference import routing as routing_ref

# (atol, rtol) by the dtype of the tensor being checked. Routing weights are float32 computed
# from (possibly low-precision) logits, so they use the float32 row; gradients come back in the
# logits' dtype and use its row.
#
# An op whose float32 error grows with the problem has its own row, keyed ``(op, dtype)``:
# - ``exact_k`` (ProbMoE marginals, log normaliser and their gradient): a sequential log-space
#   DP over the E experts rounds once per expert, so the error grows about linearly with E
#   (float32 vs float64: ~2e-6 at E = 60, ~2e-5 at E = 512 with k = 32).
TOLERANCES: dict[torch.dtype | tuple[str, torch.dtype], tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
    ("exact_k", torch.float32): (3e-5, 1e-4),
    # - ``fused_experts``: a weight gradient is a GEMM reducing over the T*k routed rows, so its
    #   float32 error grows with them (1.2e-5 at 64 rows of H = 128 per expert, on entries near 0
    #   after cancellation); in 16-bit the intermediates (pre-activation, activation, their
    #   gradients) are stored in the activations' dtype, as HF's eager experts do, so each
    #   carries one rounding of that dtype. (The CPU path's 16-bit results are judged by
    #   PLAIN_FACTOR below instead: they round where plain PyTorch does.)
    ("fused_experts", torch.float32): (5e-5, 1e-5),
    # - ``grouped_mm``: the same weight-gradient GEMM over every row of a group (validate: up to
    #   1.2e-5 at 256 tokens of k = 2 over 8 groups).
    ("grouped_mm", torch.float32): (5e-5, 1e-5),
    ("fused_experts", torch.float16): (1e-2, 1e-2),
    ("fused_experts", torch.bfloat16): (6e-2, 6e-2),
    # - ``whole_model``: a whole (tiny) HF model against HF eager when its layers sum in another
    #   order: under ``torch.compile`` (Inductor fuses and reassociates the model's own norms,
    #   attention and softmaxes: up to 2.6e-6 on float32 logits of magnitude 3.5 after three
    #   layers), or patched with the Triton kernels (tiled GEMMs in every MoE layer: up to 1.5e-6 on
    #   GPT-OSS's embedding gradient, which sums over every token and layer, on one x86 host).
    ("whole_model", torch.float32): (1e-5, 1e-4),
}


# 16-bit results of a path that rounds where plain PyTorch does (the CPU experts: each GEMM's
# output, the activation) are judged as flash-attention judges its kernels: their largest error
# against float64 at most PLAIN_FACTOR times that of plain PyTorch in the same dtype
# (:func:`plain_fused_experts`), rather than against an absolute number derived from a
# float32-accumulating GPU epilogue.
PLAIN_FACTOR = 2.0


def tolerance(dtype: torch.dtype, op: str | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` for tensors of ``dtype`` (the op's own row when it has one)."""
    return TOLERANCES.get((op, dtype), TOLERANCES[dtype])


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Largest absolute error and largest error relative to ``|expected|`` (float64)."""
    if actual.numel() == 0:
        return 0.0, 0.0
    diff = (actual.double() - expected.double()).abs()
    rel = diff / expected.double().abs().clamp_min(torch.finfo(torch.float64).tiny)
    return diff.max().item(), rel.max().item()


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    op: str | None = None,
    msg: str = "",
):
    """``actual`` equals ``expected`` within the tolerance of ``dtype`` (default: actual's) and
    ``op`` (see :data:`TOLERANCES`)."""
    atol, rtol = tolerance(dtype or actual.dtype, op)
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        atol=atol,
        rtol=rtol,
        msg=lambda default: f"{msg}\n{default}" if msg else default,
    )


def plain_error_bound(
    actual: torch.Tensor,
    plain: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    factor: float = PLAIN_FACTOR,
) -> tuple[float, float]:
    """``(error, bound)``: the largest error of ``actual`` against the float64 ``expected``, and
    ``factor`` times that of ``plain`` (plain PyTorch's result) plus one unit in the last place of
    the largest ``|expected|`` in ``dtype``, the dtype both computed in (default ``actual``'s; a
    float32 routing weights' gradient computed from 16-bit activations names theirs). The unit
    keeps a lucky plain result on a few elements from demanding a luckier one."""
    if actual.shape != plain.shape or actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape}, {plain.shape}, {expected.shape}")
    if expected.numel() == 0:
        return 0.0, 0.0
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item()
    plain_error = (plain.double() - expected).abs().max().item()
    return error, factor * plain_error + torch.finfo(dtype or actual.dtype).eps * expected.abs().max().item()


def assert_within_plain(
    actual: torch.Tensor,
    plain: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    factor: float = PLAIN_FACTOR,
    msg: str = "",
):
    """``actual``'s largest error against the float64 ``expected`` is within
    :func:`plain_error_bound`."""
    error, bound = plain_error_bound(actual, plain, expected, dtype=dtype, factor=factor)
    assert error <= bound, (
        f"{msg}: largest error {error:.3g} against float64, over {bound:.3g} ({factor:g}x plain PyTorch's "
        f"in {dtype or actual.dtype}, plus one unit in the last place)"
    )


_PLAIN_GATES = {
    Activation.SILU: F.silu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: functools.partial(F.gelu, approximate="tanh"),
}


def plain_fused_experts(
    hidden, gate_up_proj, down_proj, weights, ids, activation="silu", gate_up_bias=None, down_bias=None
):
    """``fused_experts`` as plain PyTorch computes it in ``hidden``'s dtype (HF transformers' eager
    experts): every GEMM output, the activation and its product, the weighted expert outputs and
    their running sum over the ``k`` slots rounded to that dtype. The yardstick of
    :func:`assert_within_plain`. Same arguments and result as :func:`moe_kernels.fused_experts`
    (``weights`` cast to the dtype, as HF's routers do); differentiable by autograd. Gathers each
    slot's expert weights: test sizes only."""
    code = Activation.parse(activation)
    num_tokens, k = ids.shape
    experts = ids.reshape(-1).long().clamp(min=0)
    rows = hidden.repeat_interleave(k, dim=0).unsqueeze(-1)
    h = torch.bmm(gate_up_proj[experts], rows).squeeze(-1)
    if gate_up_bias is not None:
        h = h + gate_up_bias[experts]
    if code == Activation.GPT_OSS:
        gate, up = h[:, 0::2].clamp(max=GPT_OSS_LIMIT), h[:, 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        act = (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
    else:
        gate, up = h.chunk(2, dim=-1)
        act = _PLAIN_GATES[code](gate) * up
    y = torch.bmm(down_proj[experts], act.unsqueeze(-1)).squeeze(-1)
    if down_bias is not None:
        y = y + down_bias[experts]
    y = (y * weights.reshape(-1, 1).to(y.dtype)).masked_fill(ids.reshape(-1, 1) < 0, 0)
    y = y.view(num_tokens, k, hidden.shape[-1])
    out = torch.zeros_like(hidden)
    for slot in range(k):  # one rounding per added slot, as the eager loop's index_add_
        out = out + y[:, slot]
    return out


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block, every output buffer an op allocates starts filled with poison
    (:func:`moe_kernels.utils.poison_value`): NaN for floats, a sentinel for integers."""
    previous = utils._poison_outputs
    utils._poison_outputs = True
    try:
        yield
    finally:
        utils._poison_outputs = previous


def assert_written(tensor: torch.Tensor, name: str = "output"):
    """No element of ``tensor`` still holds the poison value."""
    poison = utils.poison_value(tensor.dtype)
    left = torch.isnan(tensor) if tensor.dtype.is_floating_point else tensor == poison
    count = int(left.sum())
    assert count == 0, f"{name}: {count} of {tensor.numel()} elements were never written"


def _distinct_values(dtype: torch.dtype, low: float, high: float, min_magnitude: float) -> torch.Tensor:
    """All finite values of a 16-bit ``dtype`` in ``[low, high]`` with ``|x| >= min_magnitude``,
    as float64 (so choosing among them can never round two picks onto one value)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).double()
    keep = torch.isfinite(values) & (values >= low) & (values <= high) & (values.abs() >= min_magnitude)
    return values[keep].unique()


def _draw_logits(
    rows: int, num_experts: int, dtype: torch.dtype, score_func: str, generator: torch.Generator
) -> torch.Tensor:
    """Logits distinct within each row even after rounding to ``dtype``, in ``[-8, 8]`` for
    softmax and ``[-4, 4]`` for sigmoid (which flattens beyond, bringing scores together)."""
    bound = 8.0 if score_func == "softmax" else 4.0
    if dtype in (torch.float16, torch.bfloat16):
        pool = _distinct_values(dtype, -bound, bound, 2.0**-4)
    else:  # a grid much finer than any E, coarse enough that neighbours' scores stay apart
        pool = torch.linspace(-bound, bound, 8193, dtype=torch.float64)
    picks = torch.rand(rows, pool.numel(), generator=generator).topk(num_experts, dim=1).indices
    return pool[picks].to(dtype)


def _has_near_ties(values: torch.Tensor, min_gap: float) -> torch.Tensor:
    """Per row: do two finite entries lie within ``min_gap`` (relative) of each other?"""
    ordered = values.sort(dim=-1, descending=True).values
    upper, lower = ordered[..., :-1], ordered[..., 1:]
    both_finite = torch.isfinite(upper) & torch.isfinite(lower)
    close = (upper - lower) <= min_gap * torch.maximum(upper.abs(), lower.abs())
    return (close & both_finite).any(dim=-1)


def make_bias(num_experts: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """A random ``(E,)`` float32 selection bias (never zero)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, generator=generator) * 0.5).to(torch.float32).to(device)


def make_routing_logits(
    num_tokens: int,
    num_experts: int,
    dtype: torch.dtype = torch.float32,
    *,
    routing: RoutingConfig = DEFAULT_ROUTING,
    bias: torch.Tensor | None = None,
    seed: int = 0,
    min_gap: float = 2e-6,
    device="cpu",
) -> torch.Tensor:
    """``(T, E)`` random logits of ``dtype`` whose routing has no near-ties.

    In every row, the float64 selection keys (and, with groups, the group scores) differ
    pairwise by more than ``min_gap`` relative (about 17 float32 ulps, several times the error
    of a float32 computation of the keys), so every correct
    implementation must choose the same ids in the same order. Rows with a near-tie are redrawn.
    ``routing`` and ``bias``: as for :func:`moe_kernels.softmax_topk`; what chooses the ids
    (``score_func``, ``bias``, ``num_groups``, ``group_score``) shapes the draw.
    """
    score_func, num_groups = routing.score_func, routing.num_groups
    generator = torch.Generator().manual_seed(seed)
    logits = _draw_logits(num_tokens, num_experts, dtype, score_func, generator)
    bias64 = None if bias is None else bias.detach().double().cpu()
    for _ in range(200):
        scores = routing_ref.gate_scores(logits.double(), score_func)
        keys = routing_ref.selection_keys(scores, bias64)
        bad = _has_near_ties(keys, min_gap)
        if num_groups:
            grouped = keys.unflatten(-1, (num_groups, num_experts // num_groups))
            per_group = grouped.amax(-1) if routing.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
            bad |= _has_near_ties(per_group, min_gap)
        if not bad.any():
            return logits.to(device)
        logits[bad] = _draw_logits(int(bad.sum()), num_experts, dtype, score_func, generator)
    raise RuntimeError(f"could not draw tie-free logits for E={num_experts}, dtype={dtype}, min_gap={min_gap}")


# The sizes every tiny HF model shares; each family adds its own in :func:`tiny_hf_config`.
TINY_HF_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    initializer_range=0.15,
    eos_token_id=None,  # greedy generation runs its full length
)
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def tiny_hf_config(family: str, *, width: int = 1, overrides: dict | None = None):
    """A transformers config of ``family`` (a key of the integration's family registry,
    ``moe_kernels.integrations.transformers.FAMILIES``: its ``tiny_sizes``) with 2-3 layers of
    width 32 and 4-8 experts; ``width`` multiplies the hidden and intermediate sizes, and
    ``overrides`` (a dict of config fields) replace any field. Needs transformers."""
    import transformers

    from moe_kernels.integrations.transformers.families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"tiny_hf_config: family must be one of {tuple(FAMILIES)}, got {family!r}")
    fields = {**TINY_HF_SIZES, **FAMILIES[family].tiny_sizes}
    for key in _WIDTH_KEYS:
        if key in fields:
            fields[key] *= width
    return getattr(transformers, FAMILIES[family].config_class)(**{**fields, **(overrides or {})})
