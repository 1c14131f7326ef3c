"""kNN-MoE in assignment space (knn_route_assignments) against a per-token float64 oracle."""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels.functional.knn_assign import knn_route_assignments


def _inputs(num_tokens=6, num_experts=10, num_neighbors=3, memory=20, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype),
        torch.randint(0, memory, (num_tokens, num_neighbors), generator=generator),
        torch.rand(num_tokens, num_neighbors, generator=generator, dtype=dtype),
        torch.randn(memory, num_experts, generator=generator, dtype=dtype),
    )


def _oracle(router, ids, sims, memory, k, **routing):
    """Dense per-token mix of the top-k assignments, float64."""
    out = []
    for t in range(router.shape[0]):
        conf = min(max(sims[t].mean().item(), 0.0), 1.0)
        w = sims[t] / sims[t].sum()
        dense = torch.zeros(router.shape[1], dtype=torch.float64)
        weights, experts = mk.softmax_topk(router[t : t + 1], k, backend="torch", **routing)
        dense[experts[0].long()] += (1 - conf) * weights[0]
        for j in range(ids.shape[1]):
            weights, experts = mk.softmax_topk(memory[ids[t, j]][None], k, backend="torch", **routing)
            dense[experts[0].long()] += conf * w[j] * weights[0]
        out.append(dense)
    return torch.stack(out)


@pytest.mark.parametrize("routing", [dict(), dict(renormalize=True, score_func="sigmoid")])
def test_matches_dense_oracle(routing):
    router, ids, sims, memory = _inputs()
    weights, experts, conf = knn_route_assignments(router, ids, sims, memory, 2, **routing)
    assert weights.shape == experts.shape == (6, 8)  # k * (n + 1) columns
    got = torch.zeros(6, 10, dtype=torch.float64)
    for t in range(6):
        valid = experts[t] >= 0
        got[t, experts[t][valid].long()] = weights[t][valid]
        assert bool((weights[t][~valid] == 0).all()) and len(set(experts[t][valid].tolist())) == int(valid.sum())
    torch.testing.assert_close(got, _oracle(router, ids, sims, memory, 2, **routing))
    torch.testing.assert_close(conf, sims.mean(1).clamp(0, 1))


def test_zero_confidence_gives_the_router_assignment():
    router, ids, sims, memory = _inputs()
    weights, experts, conf = knn_route_assignments(router, ids, -sims, memory, 3)
    want_w, want_ids = mk.softmax_topk(router, 3)
    assert bool((conf == 0).all())
    assert torch.equal(experts[:, :3], want_ids) and bool((experts[:, 3:] == -1).all())
    torch.testing.assert_close(weights[:, :3], want_w)


def test_gradients_reach_router_and_memory():
    router, ids, sims, memory = _inputs()
    router.requires_grad_()
    memory.requires_grad_()
    assert torch.autograd.gradcheck(lambda r, m: knn_route_assignments(r, ids, sims, m, 2)[0], (router, memory))


def test_feeds_fused_experts():
    router, ids, sims, memory = _inputs()
    weights, experts, _ = knn_route_assignments(router, ids, sims, memory, 2)
    hidden, gate_up, down = (
        torch.randn(6, 8, dtype=torch.float64),
        torch.randn(10, 12, 8, dtype=torch.float64),
        torch.randn(10, 8, 6, dtype=torch.float64),
    )
    out = mk.fused_experts(hidden, gate_up, down, weights, experts)
    # Every expert with a nonzero mixed weight runs, the -1 slots contribute nothing.
    dense = _oracle(router, ids, sims, memory, 2)
    want = torch.zeros_like(hidden)
    for t in range(6):
        for e in torch.nonzero(dense[t]).flatten().tolist():
            h = gate_up[e] @ hidden[t]
            want[t] += dense[t, e] * (down[e] @ (torch.nn.functional.silu(h[:6]) * h[6:]))
    torch.testing.assert_close(out, want)


def test_bad_neighbor_ids():
    router, ids, sims, memory = _inputs()
    with pytest.raises(ValueError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 20\)"):
        knn_route_assignments(router, ids + 20, sims, memory, 2)
