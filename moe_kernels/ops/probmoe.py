"""Launchers and ``torch.library`` registration of the ProbMoE exact-k / dynamic-k op.

========================  ======================================================================
``exact_k``               logits ``(T, E)``, seed ``(1,)`` int64 -> ``marginals (T, E)`` float32,
                          ``log_z (T,)`` float32, ``ids (T, k)`` int32 (``(T, 0)`` unsampled)
``exact_k_backward``      logits, ``grad_marginals (T, E)``, ``grad_log_z (T,)`` ->
                          ``grad_logits (T, E)``
========================  ======================================================================

One kernel computes the DP, the marginals, the log normaliser and (``sample=True``) an exact
sample; the backward kernel computes ``Cov(z) @ grad_marginals + grad_log_z * marginals``. As for
every op, ``use_triton`` picks the kernels or the PyTorch path; the op is built by
:func:`moe_kernels.ops._boundary.define_op`.
"""

from __future__ import annotations

import functools
import math

import torch

from moe_kernels._compat import interpreter_enabled
from moe_kernels.cpu import probmoe as cpu_probmoe
from moe_kernels.ops._boundary import define_op
from moe_kernels.ops._launch import MIN_PROGRAMS, unit_stride_last
from moe_kernels.reference import probmoe as reference
from moe_kernels.utils import cdiv, compute_dtype, new_output, next_power_of_2

# Largest k the kernels take: the DP row (k + 1 sizes, padded to a power of two) lives in
# registers, one row per token.
MAX_TRITON_K = 63
# Persistent programs per SM. The interpreter runs programs one after another at a large fixed
# cost per step, so there the fewest, widest programs win: two, which still exercise the loop over
# tiles, and no splitting of small batches.
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 2
# DP entries (tokens x sizes) per program on a GPU, and DP entries per thread of each kernel.
# The backward keeps about a dozen such tiles live. These hold both kernels under 128 registers
# with no stack on sm_90 and sm_80 (Triton 3.9): ptxas spilled a register of some other
# splits, erratically across archs (see benchmarks/NOTES.md). The interpreter's cost is per
# step, nearly whatever the tile, so there a program takes as many tokens as it can.
_TILE = 256
_ENTRIES_PER_THREAD = {False: 2, True: 4}
_INTERPRETER_TILE = 4096


def exact_k_meta(num_tokens: int, num_experts: int, k: int, *, backward: bool = False) -> dict:
    """Constexprs and ``num_warps`` of the forward (or backward) kernel, shared with the AOT cases.

    A tile holds ``BLOCK_T`` tokens x ``K_PAD`` sizes; small batches use fewer tokens per
    program so that they still spread over many programs.
    """
    k_pad = next_power_of_2(k + 1)
    if interpreter_enabled():
        tile = _INTERPRETER_TILE
    else:
        tile = _TILE // 2 if k_pad >= 64 else _TILE
    block_t = max(1, tile // k_pad)
    while block_t > 1 and cdiv(num_tokens, block_t) < MIN_PROGRAMS:
        block_t //= 2
    threads = block_t * k_pad // _ENTRIES_PER_THREAD[backward]
    return dict(
        K_PAD=k_pad,
        BLOCK_T=block_t,
        # The row-max pre-pass reads (BLOCK_T, BLOCK_E) tiles, no wider than the DP tile: ptxas
        # sizes the whole kernel's registers for its widest tile (sm_90: a 32 x 128 tile took
        # 255 registers and spilled, 32 x 8 takes 48).
        BLOCK_E=min(next_power_of_2(num_experts), max(1, tile // block_t)),
        num_warps=max(1, min(8, threads // 32)),
    )


def checkpoint_chunk(num_experts: int) -> int:
    """Rows between the forward pass's checkpoints: about sqrt(E), which minimises the scratch
    ``E / chunk + chunk`` rows."""
    return next_power_of_2(max(1, math.isqrt(max(num_experts - 1, 0)) + 1))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid_and_scratch(device: torch.device, num_tiles: int, num_experts: int, meta: dict, planes: int):
    """Persistent grid size and a scratch buffer ``(programs, rows, planes, BLOCK_T, K_PAD)``."""
    if device.type == "cuda":
        max_programs = _PROGRAMS_PER_SM * _sm_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    else:
        max_programs = _INTERPRETER_PROGRAMS
    programs = max(1, min(num_tiles, max_programs))
    chunk = checkpoint_chunk(num_experts)
    num_checkpoints = cdiv(num_experts, chunk)
    rows = num_checkpoints + chunk + 1
    scratch = torch.empty((programs, rows, planes, meta["BLOCK_T"], meta["K_PAD"]), dtype=torch.float32, device=device)
    return programs, scratch, chunk, num_checkpoints


def _dp_launch(logits: torch.Tensor, k: int, k_min: int, backward: bool):
    """What both DP kernels take besides their own pointers: ``(grid, arguments by name)``, the
    logits, the persistent grid's scratch buffer, the sizes and the constexprs; None for T = 0."""
    num_tokens, num_experts = logits.shape
    if num_tokens == 0:
        return None
    meta = exact_k_meta(num_tokens, num_experts, k, backward=backward)
    num_tiles, planes = cdiv(num_tokens, meta["BLOCK_T"]), 2 if backward else 1
    programs, scratch, chunk, num_checkpoints = _grid_and_scratch(logits.device, num_tiles, num_experts, meta, planes)
    arguments = dict(
        logits_ptr=logits,
        scratch_ptr=scratch,
        T=num_tokens,
        E=num_experts,
        stride_lt=logits.stride(0),
        k=k,
        k_min=k_min,
        chunk=chunk,
        num_checkpoints=num_checkpoints,
        **meta,
    )
    return (programs,), arguments


def launch_exact_k(logits, k, k_min, seed, sample):
    """Run the forward kernel; returns fresh ``marginals``, ``log_z`` and ``ids``."""
    from moe_kernels.kernels._probmoe import _exact_k_fwd_kernel

    num_tokens, num_experts = logits.shape
    device = logits.device
    logits = unit_stride_last(logits)
    marginals = new_output((num_tokens, num_experts), torch.float32, device)
    log_z = new_output((num_tokens,), torch.float32, device)
    ids = new_output((num_tokens, k if sample else 0), torch.int32, device)
    launch = _dp_launch(logits, k, k_min, backward=False)
    if launch is not None:
        grid, arguments = launch
        _exact_k_fwd_kernel[grid](
            seed_ptr=seed, marginals_ptr=marginals, log_z_ptr=log_z, ids_ptr=ids, SAMPLE=sample, **arguments
        )
    return marginals, log_z, ids


def launch_exact_k_backward(logits, grad_marginals, grad_log_z, k, k_min):
    """Run the backward kernel; returns a fresh ``grad_logits`` in the logits' dtype."""
    from moe_kernels.kernels._probmoe import _exact_k_bwd_kernel

    logits = unit_stride_last(logits)
    grad = new_output(logits.shape, logits.dtype, logits.device)
    launch = _dp_launch(logits, k, k_min, backward=True)
    if launch is not None:
        grid, arguments = launch
        _exact_k_bwd_kernel[grid](
            grad_m_ptr=grad_marginals.to(torch.float32).contiguous(),
            grad_log_z_ptr=grad_log_z.to(torch.float32).contiguous(),
            grad_ptr=grad,
            **arguments,
        )
    return grad


def reference_uniforms(seed: torch.Tensor, num_tokens: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``(T, E+1)`` uniforms of the reference sampler, from a torch generator seeded by ``seed``
    (its stream differs from the kernel's Philox stream: samples agree in law, not draw by draw).
    Seeding a torch generator reads the seed on the host: on CUDA this reference fallback syncs,
    which the Triton path (CUDA's default) never does."""
    generator = torch.Generator(device=seed.device).manual_seed(int(seed.item()))
    return torch.rand((num_tokens, num_experts + 1), generator=generator, device=seed.device, dtype=dtype)


def exact_k_forward(
    logits: torch.Tensor, k: int, k_min: int, seed: torch.Tensor, sample: bool, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel, or the reference."""
    if use_triton:
        return launch_exact_k(logits, k, k_min, seed, sample)
    num_tokens, num_experts = logits.shape
    uniforms = reference_uniforms(seed, num_tokens, num_experts, compute_dtype(logits.dtype)) if sample else None
    path = cpu_probmoe if logits.is_cpu else reference  # the fast CPU path, same semantics
    marginals, log_z, ids = path.exact_k_forward(logits, k, k_min, uniforms)
    return marginals.contiguous(), log_z.contiguous(), ids.contiguous()


def exact_k_backward(
    logits: torch.Tensor, grad_marginals: torch.Tensor, grad_log_z: torch.Tensor, k: int, k_min: int, use_triton: bool
) -> torch.Tensor:
    """The kernel, or the reference's dual recursion."""
    if use_triton:
        return launch_exact_k_backward(logits, grad_marginals, grad_log_z, k, k_min)
    path = cpu_probmoe if logits.is_cpu else reference
    return path.exact_k_backward(logits, grad_marginals, grad_log_z, k, k_min).contiguous()


def _fake(inputs):
    logits, (num_tokens, num_experts) = inputs.logits, inputs.logits.shape
    dtype = compute_dtype(logits.dtype)
    return (
        logits.new_empty((num_tokens, num_experts), dtype=dtype),
        logits.new_empty((num_tokens,), dtype=dtype),
        logits.new_empty((num_tokens, inputs.k if inputs.sample else 0), dtype=torch.int32),
    )


def _backward_fake(inputs):
    return torch.empty_like(inputs.logits, memory_format=torch.contiguous_format)


def _save(ctx, inputs, outputs):
    ctx.save_for_backward(inputs.logits)
    ctx.mark_non_differentiable(outputs[2])
    ctx.options = (inputs.k, inputs.k_min, inputs.use_triton)


def _grads(ctx, backward, grad_marginals, grad_log_z, _grad_ids):
    (logits,) = ctx.saved_tensors
    if grad_marginals is None:
        grad_marginals = logits.new_zeros(logits.shape, dtype=compute_dtype(logits.dtype))
    if grad_log_z is None:
        grad_log_z = logits.new_zeros(logits.shape[:1], dtype=compute_dtype(logits.dtype))
    return {"logits": backward(logits, grad_marginals, grad_log_z, *ctx.options)}


EXACT_K = define_op(exact_k_forward, _fake, exact_k_backward, _backward_fake, _save, _grads)
