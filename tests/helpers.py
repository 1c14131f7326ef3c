"""Checks every op family's tests share: compiled equals eager, the eager ``autograd.Function``
equals the registered op, a routing result against the float64 oracle (with near-ties allowed
either way), an error that names the op and the argument, and the chi-square test of a sampler
against an exact law."""

from __future__ import annotations

import math
import re

import pytest
import torch
from oracles import routing_keys_oracle

from moe_kernels import testing


def _leaves(inputs, requires_grad: bool):
    """Fresh copies of ``inputs`` (tensors detached and cloned; a float tensor that required grad
    becomes a new leaf that does), so eager and compiled runs get their own gradients."""
    copies = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            wants = requires_grad and x.requires_grad
            x = x.detach().clone().requires_grad_(wants)
        copies.append(x)
    return copies


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def _compare(got, want, exact: bool, what: str, op: str | None = None):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {got.shape} vs {want.dtype}"
    if exact or not got.dtype.is_floating_point:
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        testing.assert_close(got, want, op=op, msg=what)


def _grads(outputs, leaves, seed):
    """Gradients of ``sum_i <outputs_i, g_i>`` (fixed random ``g_i``) with respect to ``leaves``."""
    generator = torch.Generator().manual_seed(seed)
    floats = [o for o in outputs if o.dtype.is_floating_point and o.requires_grad]
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device)).sum() for o in floats)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def assert_compile_matches_eager(
    fn, *input_sets, dynamic=None, forward_exact: bool = False, no_recompile: bool = False, op: str | None = None
):
    """``torch.compile(fn, fullgraph=True)`` equals ``fn`` eager on every tuple of ``input_sets``
    (one compiled function for all of them: with ``dynamic=True`` several token counts share a
    graph). Integer outputs are compared exactly, float outputs within the tolerance of their
    dtype (and ``op``'s row of :data:`moe_kernels.testing.TOLERANCES`; exactly with
    ``forward_exact``); when an input requires grad, the gradients of every such input (of
    ``sum_i <output_i, g_i>`` for fixed random ``g_i``) are compared too. ``no_recompile``: every
    input set after the first must reuse the first one's graph (a recompile raises). Returns the
    compiled function."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for number, inputs in enumerate(input_sets):
        eager_in, compiled_in = _leaves(inputs, True), _leaves(inputs, True)
        with torch._dynamo.config.patch(error_on_recompile=no_recompile and number > 0):
            got = _outputs(compiled(*compiled_in))
        want = _outputs(fn(*eager_in))
        assert len(got) == len(want)
        for index, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, forward_exact, f"input set {number}, output {index}", op)
        eager_leaves = [x for x in eager_in if isinstance(x, torch.Tensor) and x.requires_grad]
        compiled_leaves = [x for x in compiled_in if isinstance(x, torch.Tensor) and x.requires_grad]
        if eager_leaves:
            for index, (g, w) in enumerate(
                zip(_grads(got, compiled_leaves, number), _grads(want, eager_leaves, number))
            ):
                _compare(g, w, False, f"input set {number}, gradient of input {index}")
    return compiled


def assert_function_matches_op(op, args, *, seed: int = 0) -> None:
    """The eager ``autograd.Function`` of a :func:`moe_kernels.ops._boundary.define_op` op gives
    bit-exactly the registered ``torch.library`` op's outputs and input gradients (``args``: the
    op's arguments; tensors that require grad are differentiated)."""
    through_function, through_op = _leaves(args, True), _leaves(args, True)
    via_function = _outputs(op.function.apply(*through_function))
    via_op = _outputs(op.registered(*through_op))
    for index, (f, o) in enumerate(zip(via_function, via_op)):
        _compare(f, o, True, f"{op.spec.name}: output {index}")
    leaves_f = [x for x in through_function if isinstance(x, torch.Tensor) and x.requires_grad]
    leaves_o = [x for x in through_op if isinstance(x, torch.Tensor) and x.requires_grad]
    if leaves_f:
        for index, (f, o) in enumerate(zip(_grads(via_function, leaves_f, seed), _grads(via_op, leaves_o, seed))):
            _compare(f, o, True, f"{op.spec.name}: gradient of input {index}")


def assert_routing_matches_oracle(
    weights: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    renormalize: bool = False,
    score_func: str = "softmax",
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "top2_sum",
    scale: float = 1.0,
    rel_tol: float = 1e-5,
    abs_tol: float = 1e-35,
    weights_dtype: torch.dtype = torch.float32,
) -> int:
    """``(weights, ids)`` of a gate + top-k of ``logits`` against the float64 oracle, exactly where
    the float64 keys are apart and either way where they lie within ``rel_tol`` of each other
    (what an implementation in lower precision may decide either way):

    - ``ids`` are distinct, in ``[0, E)``, in non-increasing key order; no expert left out has a
      larger key than one chosen; of two exactly equal keys the lower id comes first;
    - with groups, every chosen expert is in a group the oracle keeps (or one within ``rel_tol``
      of the last kept group: then the row is only checked for valid distinct ids);
    - ``weights`` are the oracle's scores at ``ids`` (renormalised, scaled), NaN where it has NaN.

    Returns the number of rows with an ambiguous group choice (so callers can keep it small).
    """
    num_experts = logits.shape[-1]
    rows = logits.double().reshape(-1, num_experts).tolist()
    chosen_rows = ids.reshape(-1, k).tolist()
    got_weights = weights.reshape(-1, k).double()
    offsets = [0.0] * num_experts if bias is None else bias.double().tolist()
    want_weights = torch.empty(len(rows), k, dtype=torch.float64)
    ambiguous = 0
    for t, (row, chosen) in enumerate(zip(rows, chosen_rows)):
        assert len(set(chosen)) == k and all(0 <= e < num_experts for e in chosen), f"row {t}: ids {chosen}"
        scores, keys, group_scores = routing_keys_oracle(row, offsets, score_func, num_groups, topk_groups, group_score)

        def close(a: float, b: float) -> bool:
            if a == b:
                return True
            finite = math.isfinite(a) and math.isfinite(b)
            return finite and abs(a - b) <= rel_tol * max(abs(a), abs(b)) + abs_tol

        if num_groups and any(
            close(group_scores[g], group_scores[h]) and group_scores[g] != group_scores[h]
            for g in range(num_groups)
            for h in range(num_groups)
            if g != h
        ):
            ambiguous += 1  # a group near-tie: which experts are eligible is decided either way
        else:
            chosen_keys = [keys[e] for e in chosen]
            for j in range(k - 1):
                a, b = chosen_keys[j], chosen_keys[j + 1]
                assert a > b or close(a, b), f"row {t}: keys of ids {chosen} not in order: {chosen_keys}"
                if a == b:  # exactly equal keys (-inf too): lower id first
                    assert chosen[j] < chosen[j + 1], f"row {t}: equal keys, ids {chosen}"
            lowest = min(chosen_keys)
            for e in set(range(num_experts)) - set(chosen):
                assert keys[e] < lowest or close(keys[e], lowest), f"row {t}: expert {e} left out of {chosen}"
                if keys[e] == lowest:  # an equal key left out must have a larger id
                    assert e > max(c for c in chosen if keys[c] == lowest), f"row {t}: tie, ids {chosen}"
        picked = [scores[e] for e in chosen]
        if renormalize:
            total = sum(picked) + 1e-20
            picked = [w / total for w in picked]
        want_weights[t] = torch.tensor([w * scale for w in picked], dtype=torch.float64)
    if want_weights.numel():
        atol, rtol = testing.tolerance(weights_dtype)
        atol *= max(1.0, abs(scale))  # the scale multiplies the error of the scores
        torch.testing.assert_close(got_weights, want_weights, atol=atol, rtol=rtol, equal_nan=True)
    return ambiguous


def assert_names(error: Exception, op: str, argument: str) -> None:
    """``error`` is a ``ValueError`` / ``TypeError`` whose message starts with ``"<op>: "`` and names
    ``argument`` as a word after it."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    prefix = f"{op}: "
    assert message.startswith(prefix), f"the message does not start with {prefix!r}: {message}"
    assert re.search(rf"\b{re.escape(argument)}\b", message[len(prefix) :]), f"{argument!r} not named: {message}"


def assert_refused(run, op: str, argument: str) -> None:
    """``run()`` raises a ``ValueError`` / ``TypeError`` that names ``op`` and ``argument`` (see
    :func:`assert_names`)."""
    with pytest.raises((ValueError, TypeError)) as error:
        run()
    assert_names(error.value, op, argument)


def chi_square_pvalue(ids: torch.Tensor, law: dict) -> float:
    """p-value of Pearson's chi-square test of the sampled subsets' counts against ``law``."""
    draws = ids.shape[0]
    counts = {subset: 0 for subset in law}
    for row in ids.tolist():
        counts[tuple(i for i in row if i >= 0)] += 1
    stat = sum((counts[s] - draws * p) ** 2 / (draws * p) for s, p in law.items())
    dof = len(law) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()
