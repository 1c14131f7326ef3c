"""Keyword arguments shared by functions that mirror a reference function.

The CPU path (``moe_kernels.cpu``), the fused kNN route and the test helpers take the keyword
arguments of the reference function they mirror as ``**options`` and read them through a record
built from that function's own signature, so the names and defaults are written once (in the
reference's signature) and cannot drift apart.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable


def keyword_options(fn: Callable, name: str) -> type:
    """A namedtuple class ``name`` whose fields are the keyword-only arguments of ``fn``, in order,
    with ``fn``'s defaults (arguments without a default stay required).

    ``keyword_options(fn, "Opts")(**options)`` fills the defaults and raises ``TypeError`` on an
    unknown or missing name, as a call of ``fn`` would.
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    defaults = [p.default for p in params if p.default is not p.empty]
    if any(p.default is p.empty for p in params[len(params) - len(defaults) :]):
        raise TypeError(f"keyword_options: {fn.__name__}'s defaulted keyword arguments must come last")
    return collections.namedtuple(name, [p.name for p in params], defaults=defaults)


def split_options(options: dict, record: type) -> tuple:
    """``(record(**known), rest)``: the entries of ``options`` named by ``record``'s fields (the
    others defaulted), and a new dict of the remaining entries."""
    rest = dict(options)
    known = {field: rest.pop(field) for field in record._fields if field in rest}
    return record(**known), rest
