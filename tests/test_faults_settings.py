"""The settings records refuse bad fields when built, as the validation layer's rule says: a
``TypeError`` for a value of the wrong kind, a ``ValueError`` for one of the right kind out of
range, each naming the record and the field (hypothesis draws the values)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kernels import RoutingConfig
from moe_kernels.balance import AuxLossFreeBias
from moe_kernels.config import KnnMixing
from moe_kernels.cor import CalibrationSettings, CoRPlan


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KINDS = {
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "int?": lambda v: v is None or _is_int(v),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}

# record -> (builder from one field's value, {field: kind})
RECORDS = {
    "RoutingConfig": (
        lambda name, value: RoutingConfig(**{name: value}),
        {
            "score_func": "str",
            "renormalize": "bool",
            "num_groups": "int?",
            "topk_groups": "int?",
            "group_score": "str",
            "scale": "number",
        },
    ),
    "KnnMixing": (
        lambda name, value: KnnMixing(**{name: value}),
        {"weighting": "str", "temperature": "number", "min_confidence": "number"},
    ),
    "CalibrationSettings": (
        lambda name, value: CalibrationSettings(**{name: value}),
        {
            "total_k": "int?",
            "strength": "number",
            "hard_quantile": "number",
            "easy_quantile": "number",
            "delta": "number",
            "tokens_per_forward": "int",
            "progress": "bool",
        },
    ),
    "CoRPlan": (
        lambda name, value: CoRPlan(torch.tensor([1, 2]), torch.zeros(2, 3), **{name: value}),
        {"strength": "number"},
    ),
    "AuxLossFreeBias": (
        lambda name, value: AuxLossFreeBias(**{"num_experts": 4, **{name: value}}),
        {"num_experts": "int", "rate": "number"},
    ),
}
FIELDS = [(record, field) for record, (_, fields) in RECORDS.items() for field in fields]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "softmax", "top2_sum", "similarity", "x", "0.5"]),
    st.just([1]),
    st.just(math.nan),
)


@settings(max_examples=400, deadline=None)
@given(target=st.sampled_from(FIELDS), value=VALUES)
def test_records_refuse_bad_fields_by_kind_then_value(target, value):
    record, field = target
    build, fields = RECORDS[record]
    right_kind = KINDS[fields[field]](value)
    try:
        build(field, value)
    except TypeError as error:
        assert not right_kind, (record, field, value, error)
        assert record in str(error) and field in str(error)
    except ValueError as error:
        assert right_kind, (record, field, value, error)
        assert record in str(error)
    else:
        assert right_kind, (record, field, value)


@pytest.mark.parametrize(
    "build,error",
    [
        (lambda: RoutingConfig(scale=float("nan")), ValueError),
        (lambda: RoutingConfig(scale="2"), TypeError),
        (lambda: KnnMixing(temperature=0.0), ValueError),
        (lambda: KnnMixing(temperature="0.1"), TypeError),
        (lambda: CalibrationSettings(total_k=2.5), TypeError),
        (lambda: CalibrationSettings(total_k=0), ValueError),
    ],
)
def test_examples_of_the_rule(build, error):
    with pytest.raises(error):
        build()
