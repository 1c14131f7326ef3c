"""``validate``: every op against its float64 reference on this machine's device, one row per
(op, model shape, dtype, token count). Used by ``moe-kernels validate`` and the demo's first stage.
"""

from __future__ import annotations

import functools

import torch

import moe_kernels
from moe_kernels import reference, testing, validation_more
from moe_kernels.config import KnnMixing
from moe_kernels.shapes import ROUTING_SHAPES
from moe_kernels.utils import use_triton

VALIDATE_TOKENS = {"cuda": (1, 7, 256, 4099), "cpu": (1, 7, 256)}
VALIDATE_DTYPES = {"cuda": ("float32", "float16", "bfloat16"), "cpu": ("float32", "bfloat16")}


def _validate_routing_case(shape, num_tokens, dtype, device, backend) -> dict:
    """One row of ``validate``: the op against the float64 reference, forward and backward."""
    bias = testing.make_bias(shape.num_experts, seed=1, device=device) if shape.has_bias else None
    routing = shape.routing
    cpu_bias = None if bias is None else bias.cpu()
    logits = testing.make_routing_logits(num_tokens, shape.num_experts, dtype, routing=routing, bias=cpu_bias)
    logits = logits.to(device).requires_grad_(True)
    weights, ids = moe_kernels.softmax_topk(logits, shape.k, routing=routing, bias=bias, backend=backend)
    grad_out = torch.randn(weights.shape, device=device)
    weights.backward(grad_out)

    logits64 = logits.detach().double()
    bias64 = None if bias is None else bias.double()
    ref_weights, ref_ids = reference.softmax_topk(logits64, shape.k, routing=routing, bias=bias64)
    ref_grad = reference.softmax_topk_backward(grad_out.double(), logits64, ref_ids, routing=routing)
    ids_match = torch.equal(ids.cpu(), ref_ids.cpu())
    weight_err = testing.max_errors(weights, ref_weights)[0]
    grad_err = testing.max_errors(logits.grad, ref_grad)[0]
    ok = ids_match and _within(weights, ref_weights, torch.float32) and _within(logits.grad, ref_grad, dtype)
    return _row(
        "softmax_topk",
        shape,
        shape.k,
        num_tokens,
        dtype,
        "exact" if ids_match else "MISMATCH",
        weight_err,
        grad_err,
        ok,
    )


def _validate_knn_case(shape, num_tokens, dtype, device, backend, num_neighbors=8) -> dict:
    """One row of ``validate`` for ``knn_mix`` (softmax weighting, fallback threshold 0.3)."""
    generator = torch.Generator().manual_seed(num_tokens)
    router = torch.randn(num_tokens, shape.num_experts, generator=generator).to(dtype).to(device)
    neighbors = torch.randn(num_tokens, num_neighbors, shape.num_experts, generator=generator).to(dtype).to(device)
    sims = (torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2).to(device)
    mixing = KnnMixing(weighting="softmax", temperature=0.1, min_confidence=0.3)
    router.requires_grad_(True)
    neighbors.requires_grad_(True)
    mixed, conf = moe_kernels.knn_mix(
        router,
        neighbors,
        sims,
        weighting=mixing.weighting,
        temperature=mixing.temperature,
        min_confidence=mixing.min_confidence,
        backend=backend,
    )
    grad_out = torch.randn(mixed.shape, device=device)
    mixed.backward(grad_out)

    router64 = router.detach().double().requires_grad_(True)
    neighbors64 = neighbors.detach().double().requires_grad_(True)
    ref_mixed, ref_conf = reference.knn_mix(router64, neighbors64, sims.double(), mixing=mixing)
    ref_mixed.backward(grad_out.double())
    mixed_err = max(testing.max_errors(mixed, ref_mixed)[0], testing.max_errors(conf, ref_conf)[0])
    grad_err = max(
        testing.max_errors(router.grad, router64.grad)[0], testing.max_errors(neighbors.grad, neighbors64.grad)[0]
    )
    ok = (
        _within(mixed, ref_mixed, torch.float32)
        and _within(conf, ref_conf, torch.float32)
        and _within(router.grad, router64.grad, dtype)
        and _within(neighbors.grad, neighbors64.grad, dtype)
    )
    return _row("knn_mix", shape, num_neighbors, num_tokens, dtype, "-", mixed_err, grad_err, ok)


def _validate_exact_k_case(shape, num_tokens, dtype, device, backend) -> dict:
    """One row of ``validate`` for the ProbMoE marginals (exact-k at the model's k) and their
    gradient."""
    from moe_kernels.reference import probmoe as probmoe_ref

    generator = torch.Generator().manual_seed(num_tokens)
    logits = (3 * torch.randn(num_tokens, shape.num_experts, generator=generator)).to(dtype).to(device)
    logits.requires_grad_(True)
    marginals = moe_kernels.exact_k_marginals(logits, shape.k, backend=backend)
    grad_out = torch.randn(marginals.shape, device=device)
    marginals.backward(grad_out)
    logits64 = logits.detach().double().cpu()
    ref_marginals, _, _ = probmoe_ref.exact_k_forward(logits64, shape.k, shape.k)
    ref_grad = probmoe_ref.exact_k_backward(
        logits64, grad_out.double().cpu(), torch.zeros(num_tokens, dtype=torch.float64), shape.k, shape.k
    )
    ok = _within(marginals.cpu(), ref_marginals, torch.float32, "exact_k") and _within(
        logits.grad.cpu(), ref_grad, dtype, "exact_k"
    )
    return _row(
        "exact_k",
        shape,
        shape.k,
        num_tokens,
        dtype,
        "-",
        testing.max_errors(marginals.cpu(), ref_marginals)[0],
        testing.max_errors(logits.grad.cpu(), ref_grad)[0],
        ok,
    )


def _validate_experts_case(shape, num_tokens, dtype, device, backend, hidden=128, inter=64) -> dict:
    """One row of ``validate`` for ``fused_experts`` at the model's routing (E, k) with small
    ``hidden`` / ``inter``: the output and the gradients of hidden and both projections."""
    generator = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, shape.num_experts, generator=generator).to(device)
    weights, ids = moe_kernels.softmax_topk(logits, shape.k, renormalize=True, backend="torch")
    params = [
        torch.randn(num_tokens, hidden, generator=generator),
        torch.randn(shape.num_experts, 2 * inter, hidden, generator=generator) * hidden**-0.5,
        torch.randn(shape.num_experts, hidden, inter, generator=generator) * inter**-0.5,
    ]
    inputs = [p.to(dtype).to(device).requires_grad_(True) for p in params]
    out = moe_kernels.fused_experts(*inputs, weights, ids, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype).to(device)
    out.backward(grad_out)
    inputs64 = [p.detach().double().cpu().requires_grad_(True) for p in inputs]
    ref = reference.fused_experts(*inputs64, weights.double().cpu(), ids.cpu())
    ref.backward(grad_out.double().cpu())
    pairs = [(p.grad.cpu(), q.grad) for p, q in zip(inputs, inputs64)]
    if dtype.itemsize == 2 and not use_triton(backend, device, "fused_experts"):
        # The CPU path rounds where plain PyTorch does: within twice its error in the dtype.
        plain_inputs = [p.detach().cpu().requires_grad_(True) for p in inputs]
        plain = testing.plain_fused_experts(*plain_inputs, weights.cpu(), ids.cpu())
        plain.backward(grad_out.cpu())
        checks = [(out.cpu(), plain.detach(), ref)] + [(a, p.grad, b) for (a, b), p in zip(pairs, plain_inputs)]
        ok = all(error <= bound for error, bound in (testing.plain_error_bound(*c) for c in checks))
    else:
        ok = _within(out.cpu(), ref, dtype, "fused_experts") and all(
            _within(a, b, dtype, "fused_experts") for a, b in pairs
        )
    return _row(
        "fused_experts",
        shape,
        shape.k,
        num_tokens,
        dtype,
        "-",
        testing.max_errors(out.cpu(), ref)[0],
        max(testing.max_errors(a, b)[0] for a, b in pairs),
        ok,
    )


def _row(op, shape, k, num_tokens, dtype, ids, weight_err, grad_err, ok) -> dict:
    """One row of the ``validate`` table."""
    return dict(
        op=op,
        model=shape.model,
        E=shape.num_experts,
        k=k,
        T=num_tokens,
        dtype=str(dtype).removeprefix("torch."),
        ids=ids,
        weight_err=f"{weight_err:.1e}",
        grad_err=f"{grad_err:.1e}",
        status="ok" if ok else "FAIL",
    )


def _within(actual, expected, dtype, op=None) -> bool:
    atol, rtol = testing.tolerance(dtype, op)
    return torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)


def validate_rows(device: torch.device, dtypes=None, tokens=None, backend: str = "auto", progress=None) -> list[dict]:
    """Every (op, shape, dtype, T) row: ``op, model, E, k, T, dtype, ids, weight_err, grad_err,
    status`` (``"ok"`` / ``"FAIL"``). ``progress`` (optional) is called once per row."""
    dtypes = dtypes or VALIDATE_DTYPES[device.type]
    tokens = tokens or VALIDATE_TOKENS[device.type]
    rows = []
    for validate_case in _CASES:
        for shape in ROUTING_SHAPES:
            for dtype in dtypes:
                for num_tokens in tokens:
                    rows.append(validate_case(shape, num_tokens, getattr(torch, dtype), device, backend))
                    if progress is not None:
                        progress()
    return rows


def number_of_rows(device: torch.device, dtypes=None, tokens=None) -> int:
    """How many rows :func:`validate_rows` produces."""
    return (
        len(_CASES)
        * len(ROUTING_SHAPES)
        * len(dtypes or VALIDATE_DTYPES[device.type])
        * len(tokens or VALIDATE_TOKENS[device.type])
    )


# Every op: the four above, and the rest (moe_kernels.validation_more) given this module's row
# and tolerance helpers.
_CASES = (
    _validate_routing_case,
    _validate_knn_case,
    _validate_exact_k_case,
    _validate_experts_case,
    *(functools.partial(case, row=_row, within=_within) for case in validation_more.CASES),
)
