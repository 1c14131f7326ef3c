"""Hypothesis strategies and budgets of the property tests.

Inputs are drawn as a few parameters (sizes, dtype, layout, options, a seed, the positions and
values of any non-finite entries); the tensors themselves come from ``torch.Generator(seed)``, so
an example is cheap to draw and shrinks to small sizes and few special values.

The profiles are registered in ``conftest.py``: ``ci`` (the default: derandomised, so every run
draws the same examples) and ``dev`` (``HYPOTHESIS_PROFILE=dev``: ten times the examples, fresh
ones each run). Each property test states its ``ci`` budget with :func:`examples`.
"""

from __future__ import annotations

import math

import torch
from hypothesis import settings
from hypothesis import strategies as st

CI_MAX_EXAMPLES = 100  # the ci profile's max_examples: the unit examples() scales from
DEV_MAX_EXAMPLES = 1000

NAN, INF = float("nan"), float("inf")
# T = 0, 1 and primes (several rows per program, partial tiles); odd and prime E.
TOKEN_COUNTS = (0, 1, 2, 3, 5, 7, 13, 31)
LAYOUTS = ("contiguous", "column-major", "sliced", "expanded")
REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

seeds = st.integers(0, 2**32 - 1)
token_counts = st.sampled_from(TOKEN_COUNTS)
layouts = st.sampled_from(LAYOUTS)
reference_dtypes = st.sampled_from(REFERENCE_DTYPES)


def examples(ci: int) -> int:
    """``max_examples`` of a property test: ``ci`` under the ``ci`` profile, scaled by the loaded
    profile's ``max_examples`` (``dev``: 10x)."""
    return max(1, ci * settings.default.max_examples // CI_MAX_EXAMPLES)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def drawn_generator(draw) -> torch.Generator:
    """A generator of a seed drawn with ``draw`` (``data.draw`` of ``st.data()``, or a composite's
    ``draw``), labelled "seed" so that a failing example prints it."""
    return generator(draw(seeds, label="seed"))


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with another memory layout: ``"contiguous"``; ``"column-major"`` (the last dim's stride
    is the largest); ``"sliced"`` (every other element of a buffer twice as wide, the others
    poison: NaN for floats, a huge value for ints, so reading a wrong stride shows); or
    ``"expanded"`` (row 0 broadcast over the first dim with stride 0: the values change, so compute
    the expectation from the returned tensor)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "column-major":
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "sliced":
        poison = torch.full_like(x, NAN if x.dtype.is_floating_point else 2**30)
        return torch.stack([x, poison], dim=-1)[..., 0]
    if layout == "expanded":
        return x[:1].expand(x.shape)
    raise ValueError(f"lay_out: unknown layout {layout!r}")


@st.composite
def special_values(draw, numel: int, values=(NAN, INF, -INF), max_count: int = 3) -> list[tuple[int, float]]:
    """Up to ``max_count`` (flat position, value) pairs to write into a tensor of ``numel``
    elements (none when it is empty)."""
    if numel == 0:
        return []
    count = draw(st.integers(0, max_count))
    return [(draw(st.integers(0, numel - 1)), draw(st.sampled_from(values))) for _ in range(count)]


def with_values(x: torch.Tensor, specials: list[tuple[int, float]]) -> torch.Tensor:
    """A copy of ``x`` with the given flat positions set to the given values."""
    x = x.clone()
    flat = x.view(-1)
    for position, value in specials:
        flat[position] = value
    return x


def with_special_values(
    draw, x: torch.Tensor, values=(NAN, INF, -INF), *, max_count: int = 3, label: str | None = None
) -> torch.Tensor:
    """A copy of ``x`` with up to ``max_count`` of its entries set to ``values``, the (flat
    position, value) pairs drawn with ``draw`` under ``label`` (see :func:`special_values`)."""
    return with_values(x, draw(special_values(x.numel(), values, max_count), label=label))


def with_drawn_layout(draw, x: torch.Tensor, *, label: str | None = None) -> torch.Tensor:
    """``x`` in a layout drawn with ``draw`` under ``label`` (see :func:`lay_out`)."""
    return lay_out(x, draw(layouts, label=label))


@st.composite
def duplicated_columns(draw, num_experts: int, max_count: int = 3) -> list[tuple[int, int]]:
    """Up to ``max_count`` (source, destination) expert pairs: copying column source over
    destination makes exact ties (equal keys must put the lower id first)."""
    if num_experts < 2:
        return []
    count = draw(st.integers(0, max_count))
    pairs = []
    for _ in range(count):
        source = draw(st.integers(0, num_experts - 1))
        pairs.append((source, (source + draw(st.integers(1, num_experts - 1))) % num_experts))
    return pairs


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def routing_options(draw, num_experts: int) -> dict:
    """A routing of ``num_experts`` experts as :class:`moe_kernels.RoutingConfig`'s keyword
    fields: softmax or sigmoid, renormalised or not, a scale (negative and 0 included), and, when
    E allows, a group limit (max, or top2_sum with at least 2 experts per group)."""
    options = dict(
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 2.5, 16.0, 0.5, -1.0, 0.0])),
    )
    group_counts = [g for g in divisors(num_experts) if 1 < g <= 64]
    if group_counts and draw(st.booleans()):
        num_groups = draw(st.sampled_from(group_counts))
        group_score = "top2_sum" if num_experts // num_groups >= 2 and draw(st.booleans()) else "max"
        options.update(num_groups=num_groups, topk_groups=draw(st.integers(1, num_groups)), group_score=group_score)
    return options


def eligible_experts(num_experts: int, options: dict) -> int:
    """How many experts a routing may choose from: with groups, those of the kept groups."""
    num_groups = options.get("num_groups")
    return num_experts if not num_groups else options["topk_groups"] * (num_experts // num_groups)


@st.composite
def k_for(draw, eligible: int) -> int:
    """k = 1, k = all eligible, or one in between."""
    return draw(st.sampled_from([1, eligible, math.ceil(eligible / 2), draw(st.integers(1, eligible))]))


def drawn_routing(draw, num_experts: int) -> tuple[dict, int]:
    """``(options, k)``: :func:`routing_options` of ``num_experts`` experts and a :func:`k_for` the
    experts they leave eligible, drawn with ``draw`` (labelled "routing" and "k")."""
    options = draw(routing_options(num_experts), label="routing")
    return options, draw(k_for(eligible_experts(num_experts, options)), label="k")
