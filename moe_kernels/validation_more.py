"""``validate``'s rows for the ops beyond the four of :mod:`moe_kernels.validation`: the fused kNN
route (with ``knn_route_assignments``), ProbMoE routing in both modes (``exact_k_sample`` inside
training), the grouped GEMM and the alignment ops, each against its float64 reference (for
sampled ids, against the law's support: distinct experts, in range, their number in the band;
for the composite ``knn_route_assignments``, against itself on float64 inputs)."""

from __future__ import annotations

import torch

import moe_kernels
from moe_kernels import reference, testing
from moe_kernels.config import KnnMixing


def validate_knn_route_case(shape, num_tokens, dtype, device, backend, row, within, num_neighbors=8) -> dict:
    """``knn_route`` (the model's routing and bias, softmax weighting, fallback 0.3): weights,
    ids and the gradients of the router and memory logits against the float64 reference."""
    generator = torch.Generator().manual_seed(num_tokens)
    router = torch.randn(num_tokens, shape.num_experts, generator=generator).to(dtype).to(device)
    memory = torch.randn(64, shape.num_experts, generator=generator).to(device)
    neighbor_ids = torch.randint(0, 64, (num_tokens, num_neighbors), generator=generator).to(device)
    sims = (torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2).to(device)
    bias = testing.make_bias(shape.num_experts, seed=1, device=device) if shape.has_bias else None
    mixing = KnnMixing(weighting="softmax", temperature=0.1, min_confidence=0.3)
    options = dict(routing=shape.routing, bias=bias)
    router.requires_grad_(True)
    memory.requires_grad_(True)
    weights, ids, _ = moe_kernels.knn_route(
        router, neighbor_ids, sims, memory, shape.k, **options, **_mixing(mixing), backend=backend
    )
    grad_out = torch.randn(weights.shape, generator=generator).to(device)
    weights.backward(grad_out)
    router64, memory64 = (t.detach().double().requires_grad_(True) for t in (router, memory))
    options64 = dict(routing=shape.routing, bias=None if bias is None else bias.double())
    ref_weights, ref_ids, _ = reference.knn_route(
        router64, neighbor_ids, sims.double(), memory64, shape.k, **options64, mixing=mixing
    )
    ref_weights.backward(grad_out.double())
    ids_match = torch.equal(ids.cpu(), ref_ids.cpu())
    grads = [(router.grad, router64.grad), (memory.grad, memory64.grad)]
    ok = ids_match and within(weights, ref_weights, torch.float32) and all(within(a, b, dtype) for a, b in grads)
    grad_err = max(testing.max_errors(a, b)[0] for a, b in grads)
    # knn_route_assignments (a composite of softmax_topk and tensor ops): its dense assignment
    # against the same op on the float64 inputs.
    cases = ((router, sims, memory, options, backend), (router64, sims.double(), memory64, options64, "torch"))
    dense, dense64 = (
        _dense(
            *moe_kernels.knn_route_assignments(
                r.detach(), neighbor_ids, s, m.detach(), shape.k, **o, **_mixing(mixing), backend=b
            )[:2],
            shape.num_experts,
        )
        for r, s, m, o, b in cases
    )
    ok = ok and within(dense, dense64, torch.float32)
    weight_err = max(testing.max_errors(weights, ref_weights)[0], testing.max_errors(dense, dense64)[0])
    status = "exact" if ids_match else "MISMATCH"
    return row("knn_route", shape, shape.k, num_tokens, dtype, status, weight_err, grad_err, ok)


def _dense(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(T, E)`` float64 assignment of ``weights`` at ``ids`` (-1 slots dropped)."""
    dense = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.float64, device=ids.device)
    dense.scatter_add_(1, torch.where(ids < 0, num_experts, ids).long(), weights.double())
    return dense[:, :num_experts]


def _mixing(mixing: KnnMixing) -> dict:
    return dict(weighting=mixing.weighting, temperature=mixing.temperature, min_confidence=mixing.min_confidence)


def validate_probmoe_case(shape, num_tokens, dtype, device, backend, row, within) -> dict:
    """``probmoe_route`` with the band ``[1, k]``: inference (ids, weights and the gradient against
    the float64 softmax, top-k and band size) and training (every sampled subset is distinct
    experts in range, their number in the band, weighted by the softmax)."""
    generator = torch.Generator().manual_seed(num_tokens)
    logits = (2 * torch.randn(num_tokens, shape.num_experts, generator=generator)).to(dtype).to(device)
    logits.requires_grad_(True)
    weights, ids = moe_kernels.probmoe_route(logits, shape.k, k_min=1, training=False, backend=backend)
    grad_out = torch.randn(weights.shape, generator=generator).to(device)
    weights.backward(grad_out)
    logits64 = logits.detach().double().requires_grad_(True)
    probs = torch.softmax(logits64, dim=-1)
    _, ref_top = reference.softmax_topk(logits64.detach(), shape.k)
    size = (logits64.detach() > 0).sum(-1).clamp(1, shape.k)
    keep = torch.arange(shape.k, device=logits64.device) < size[:, None]
    ref_ids = torch.where(keep, ref_top, -1)
    ref_weights = torch.where(keep, probs.gather(-1, ref_top.long()), 0.0)
    ref_weights.backward(grad_out.double())
    ids_match = torch.equal(ids.cpu(), ref_ids.cpu())
    sampled_w, sampled = moe_kernels.probmoe_route(logits.detach(), shape.k, k_min=1, training=True, seed=num_tokens)
    taken = sampled >= 0
    count = taken.sum(-1)
    valid = bool(((sampled < shape.num_experts) & (sampled >= -1)).all() and (count >= 1).all())
    chosen = [[e for e in r if e >= 0] for r in sampled.cpu().tolist()]
    distinct = all(len(set(r)) == len(r) for r in chosen)
    expected_w = torch.where(taken, probs.detach().gather(-1, sampled.clamp(min=0).long()), 0.0)
    valid = valid and distinct and within(sampled_w, expected_w, torch.float32)
    ok = (
        ids_match
        and valid
        and within(weights, ref_weights, torch.float32)
        and within(logits.grad, logits64.grad, dtype)
    )
    status = ("exact" if ids_match else "MISMATCH") + ("" if valid else ", bad samples")
    weight_err = testing.max_errors(weights, ref_weights)[0]
    return row(
        "probmoe_route",
        shape,
        shape.k,
        num_tokens,
        dtype,
        status,
        weight_err,
        testing.max_errors(logits.grad, logits64.grad)[0],
        ok,
    )


def validate_grouped_mm_case(shape, num_tokens, dtype, device, backend, row, within, width=64) -> dict:
    """``grouped_mm`` over the model's experts: ``T * k`` rows in random groups (empty ones
    included), output and both gradients against a float64 matmul per group."""
    generator = torch.Generator().manual_seed(num_tokens)
    num_rows, groups = num_tokens * shape.k, shape.num_experts
    sizes = torch.bincount(torch.randint(0, groups, (num_rows,), generator=generator), minlength=groups)
    offsets = sizes.cumsum(0).to(torch.int32).to(device)
    a = torch.randn(num_rows, width, generator=generator).to(dtype).to(device).requires_grad_(True)
    b = (torch.randn(groups, width, width, generator=generator) * width**-0.5).to(dtype).to(device)
    b.requires_grad_(True)
    out = moe_kernels.grouped_mm(a, b, offsets, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype).to(device)
    out.backward(grad_out)
    a64, b64 = (t.detach().double().cpu().requires_grad_(True) for t in (a, b))
    ref = reference.grouped_mm(a64, b64, offsets.cpu())
    ref.backward(grad_out.double().cpu())
    grads = [(a.grad.cpu(), a64.grad), (b.grad.cpu(), b64.grad)]
    ok = within(out.cpu(), ref, dtype, "grouped_mm") and all(within(x, y, dtype, "grouped_mm") for x, y in grads)
    grad_err = max(testing.max_errors(x, y)[0] for x, y in grads)
    return row(
        "grouped_mm", shape, shape.k, num_tokens, dtype, "-", testing.max_errors(out.cpu(), ref)[0], grad_err, ok
    )


def validate_align_case(shape, num_tokens, dtype, device, backend, row, within) -> dict:
    """``moe_align`` and ``expert_counts`` (integer ops: exact) against a stable sort and a
    bincount, with empty slots."""
    generator = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(-1, shape.num_experts, (num_tokens, shape.k), generator=generator).to(device)
    counts = moe_kernels.expert_counts(ids, shape.num_experts)
    align = moe_kernels.moe_align(ids, shape.num_experts)
    ref_counts = reference.expert_counts(ids.cpu(), shape.num_experts)
    flat = ids.reshape(-1).cpu().long()
    key = torch.where(flat < 0, shape.num_experts, flat)
    order = torch.argsort(key, stable=True)
    valid = int((flat >= 0).sum())
    ok = torch.equal(counts.cpu(), ref_counts) and torch.equal(align.counts.cpu(), ref_counts)
    ok = ok and torch.equal(align.order.cpu()[:valid].long(), order[:valid])
    return row("moe_align", shape, shape.k, num_tokens, dtype, "exact" if ok else "MISMATCH", 0.0, 0.0, ok)


CASES = (validate_knn_route_case, validate_probmoe_case, validate_grouped_mm_case, validate_align_case)
