"""The one validation layer of the public ops: argument checks whose errors name the public op,
the argument, what was expected and what was received.

Every check is a plain function of ``(op, name, value, ...)`` raising ``TypeError`` for a wrong
kind or dtype and ``ValueError`` for a wrong shape, range or device. Checks that read tensor
values run on the host only for CPU tensors in eager mode; elsewhere they queue a device-side
assert (no host sync: CUDA graphs and ``torch.compile`` keep working).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from moe_kernels.config import RoutingConfig, check_mixing, integer, override_routing, routing_or_default
from moe_kernels.ops.routing import MAX_TRITON_EXPERTS, MAX_TRITON_GROUPS
from moe_kernels.utils import use_triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# CPU id tensors up to this many elements are range-checked by reading them (cheaper than a
# reduction op and two scalar reads).
HOST_READ_MAX = 256
ID_DTYPES = (torch.int32, torch.int64)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}


def _names(dtypes: Sequence[torch.dtype]) -> str:
    if set(dtypes) == set(FLOAT_DTYPES):
        return "float32, float16 or bfloat16 (float64 for the torch backend)"
    names = [_DTYPE_NAMES.get(d, str(d)) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def tensor(
    op: str,
    name: str,
    value,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    dims: int | None = None,
    shape: str | None = None,
    device: torch.device | None = None,
    device_of: str = "",
) -> torch.Tensor:
    """``value`` is a tensor of one of ``dtypes``, with ``dims`` dimensions (``shape`` names them
    in the message, e.g. ``"(T, E)"``), on ``device`` (``device_of`` names its owner)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_names(dtypes)}, got {value.dtype}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{op}: {name} must have shape {shape or f'of {dims} dims'}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        owner = (f"{device_of}' device " if device_of.endswith("s") else f"{device_of}'s device ") if device_of else ""
        raise ValueError(f"{op}: {name} must be on {owner}{device}, got {value.device}")
    return value


def shape_is(op: str, name: str, value: torch.Tensor, expected: tuple, described) -> None:
    """``value.shape == expected``; ``described`` is the expected shape in symbols, e.g.
    ``"(T, k) = (5, 2)"``, or a function returning it (called only to raise: the per-call cost of
    a check is then one comparison, not the formatting of a message nobody reads)."""
    if value.shape != tuple(expected):
        if callable(described):
            described = described()
        raise ValueError(f"{op}: {name} must have shape {described}, got {tuple(value.shape)}")


# Tensors whose values were checked, with the version (in-place update count) checked: a bias is
# checked again only after it changed (DeepSeek-V3's correction bias is the same tensor for every
# call of a decode; an update rule bumps its version).
# Keyed by id (a tensor's == is elementwise), each entry dropped when its tensor is freed.
_NAN_FREE: dict[int, tuple[weakref.ref, int]] = {}


def no_nan(op: str, name: str, value: torch.Tensor) -> None:
    """No NaN in ``value``: a ``ValueError`` for CPU tensors, a device-side assert elsewhere (and
    under ``torch.compile``), no host sync; each version of a tensor is checked once."""
    if torch.compiler.is_compiling():
        torch._assert_async(~value.isnan().any(), f"{op}: {name} holds NaN")
        return
    key = id(value)
    entry = _NAN_FREE.get(key)
    if entry is not None and entry[0]() is value and entry[1] == value._version:
        return
    if value.is_cpu:
        if value.isnan().any():
            raise ValueError(f"{op}: {name} holds NaN (a NaN would silently rank its expert last), got {value}")
    else:
        torch._assert_async(~value.isnan().any(), f"{op}: {name} holds NaN")
    _NAN_FREE[key] = (weakref.ref(value, lambda _, key=key: _NAN_FREE.pop(key, None)), value._version)


def given_ids(op: str, ids, logits: torch.Tensor, k: int) -> None:
    """Forced expert ids (routing replay) for ``logits (..., E)``: an int32 / int64 tensor of
    shape ``(..., k)`` on the logits' device, values in ``[-1, E)``."""
    tensor(op, "ids", ids, dtypes=ID_DTYPES, device=logits.device, device_of="logits")
    expected = (*logits.shape[:-1], k)
    shape_is(op, "ids", ids, expected, f"(..., k) = {expected}")
    ids_in_range(op, "ids", ids, -1, logits.shape[-1], "E", what="expert ids or -1")


def count(op: str, name: str, value) -> int:
    """``value`` as a Python int when integer-like (:func:`moe_kernels.config.as_int`: numpy
    integers and 0-d integer tensors too), else a ``TypeError`` naming ``op`` (``2.0`` and ``True``
    included). An int passes at the cost of one type check."""
    return value if type(value) is int else integer(op, name, value)


def boolean(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def not_float64_on_triton(op: str, name: str, value: torch.Tensor, triton_path: bool) -> None:
    """The Triton kernels take 16- and 32-bit floats; float64 is the reference's (gradcheck)."""
    if triton_path and value.dtype == torch.float64:
        raise TypeError(
            f"{op}: backend='triton' takes float32/float16/bfloat16 {name}, got torch.float64; "
            "use backend='torch' for float64"
        )


def ids_in_range(
    op: str,
    name: str,
    ids: torch.Tensor,
    low: int,
    high: int,
    symbol: str,
    *,
    what: str = "",
    assert_on_device: bool = True,
) -> None:
    """Every value of ``ids`` in ``[low, high)`` (``symbol`` names ``high`` in the message, e.g.
    ``"E"``; ``what`` says what the ids index): a ``ValueError`` with the values' range for CPU
    tensors in eager mode; otherwise a device-side assert (no host sync), unless
    ``assert_on_device`` is False because the caller's kernel checks the ids itself."""
    numel = ids.numel()
    if numel == 0:
        return
    if ids.is_cpu and not torch.compiler.is_compiling():
        if numel <= HOST_READ_MAX:  # a decode step's few ids: one read, no reduction op
            values = ids.view(-1).tolist() if ids.is_contiguous() else ids.reshape(-1).tolist()
            smallest, largest = min(values), max(values)
        else:
            extremes = torch.aminmax(ids)
            smallest, largest = extremes.min.item(), extremes.max.item()
        if smallest < low or largest >= high:
            expected = _ids_expected(name, low, high, symbol, what)
            raise ValueError(f"{op}: {expected}, got values in [{smallest}, {largest}]")
        return
    if assert_on_device:
        expected = _ids_expected(name, low, high, symbol, what)
        torch._assert_async(((ids >= low) & (ids < high)).all(), f"{op}: {expected}")


def _ids_expected(name, low, high, symbol, what) -> str:
    return f"{name} must lie in [{low}, {symbol}) = [{low}, {high})" + (f" ({what})" if what else "")


# ------------------------------------------------------------------------------------------------
# Checks several ops share


def routing_args(
    op: str, logits, k, bias, routing, score_func, renormalize, num_groups, topk_groups, group_score, scale
) -> RoutingConfig:
    """Check the routing arguments every routing op shares (the logits ``(..., E)``, ``k``, the
    selection ``bias``, ``routing`` and its fields given as keywords, None where not given);
    returns the call's :class:`RoutingConfig` (``routing`` with the keyword options applied)."""
    tensor(op, "logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must have shape (..., E) with E >= 1, got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    options = (score_func, renormalize, num_groups, topk_groups, group_score, scale)  # RoutingConfig's order
    routing = override_routing(op, routing_or_default(op, routing), options, num_experts)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        allowed = (torch.float32, torch.float64) if logits.dtype == torch.float64 else (torch.float32,)
        if bias.dtype not in allowed:
            raise TypeError(f"{op}: bias must be float32, got {bias.dtype}")
        shape_is(op, "bias", bias, (num_experts,), f"(E,) = ({num_experts},)")
        tensor(op, "bias", bias, device=logits.device, device_of="logits")
        no_nan(op, "bias", bias)
    routing.check(num_experts, k, op)
    return routing


# Calls without a bias or keyword options that passed routing_call's checks, by what the checks
# read: (op, dtype, dims, E, k, routing, device type, backend) -> (routing, triton_path).
_CHECKED_ROUTING_CALLS: dict = {}
_CHECKED_ROUTING_CALLS_MAX = 1024
_NO_OPTIONS = (None,) * len(RoutingConfig.OP_FIELDS)


def routing_call(op: str, logits, k, bias, routing, options: tuple, backend: str) -> tuple[RoutingConfig, bool]:
    """:func:`routing_args` (``options``: the RoutingConfig fields given as keywords, None where
    not), the backend (:func:`moe_kernels.utils.use_triton`) and :func:`triton_routing` in one:
    returns ``(routing, triton_path)``. A call without bias or options whose arguments passed
    once pays one lookup, not ~2.5 us of checks: the fixed cost a decode step pays per layer."""
    key = None
    # type(k) is int: 8.0 and True hash as 8 and 1 but must meet the int check. No cache while
    # torch.compile traces (no Python state for dynamo to guard on).
    if bias is None and type(k) is int and options == _NO_OPTIONS and type(logits) is torch.Tensor:
        if not torch.compiler.is_compiling():
            shape = logits.shape
            key = (op, logits.dtype, len(shape), shape[-1] if shape else 0, k, routing, logits.device.type, backend)
            try:
                return _CHECKED_ROUTING_CALLS[key]
            except KeyError:
                pass
            except TypeError:  # an unhashable routing, which routing_args names
                key = None
    routing = routing_args(op, logits, k, bias, routing, *options)
    triton_path = use_triton(backend, logits.device, op)
    triton_routing(op, logits, routing, triton_path)
    if key is not None and len(_CHECKED_ROUTING_CALLS) < _CHECKED_ROUTING_CALLS_MAX:
        _CHECKED_ROUTING_CALLS[key] = (routing, triton_path)
    return routing, triton_path


def triton_routing(op: str, logits: torch.Tensor, routing: RoutingConfig, triton_path: bool = True) -> None:
    """What only the Triton kernels refuse (nothing off the Triton path): float64 logits, E or the
    group count past their tiles."""
    if not triton_path:
        return
    not_float64_on_triton(op, "logits", logits, True)
    if logits.shape[-1] > MAX_TRITON_EXPERTS:
        raise ValueError(f"{op}: backend='triton' takes E <= {MAX_TRITON_EXPERTS}, got E={logits.shape[-1]}")
    if routing.num_groups is not None and routing.num_groups > MAX_TRITON_GROUPS:
        raise ValueError(f"{op}: backend='triton' takes num_groups <= {MAX_TRITON_GROUPS}, got {routing.num_groups}")


def on_router_device(
    op: str, name: str, value, router_logits: torch.Tensor, dtypes=None, dims=None, shape=None
) -> torch.Tensor:
    """:func:`tensor` on ``router_logits``' device: the kNN ops' other tensors."""
    return tensor(
        op, name, value, dtypes=dtypes, dims=dims, shape=shape, device=router_logits.device, device_of="router_logits"
    )


def neighbor_ids(op: str, ids, router_logits: torch.Tensor, neighbor_sims: torch.Tensor) -> None:
    """``ids (T, n)`` int32 / int64 on ``router_logits``' device, shaped as ``neighbor_sims``."""
    on_router_device(op, "neighbor_ids", ids, router_logits, dtypes=ID_DTYPES)
    expected = neighbor_sims.shape
    shape_is(op, "neighbor_ids", ids, expected, lambda: f"(T, n) = {tuple(expected)} as neighbor_sims")


def memory_rows(op: str, ids: torch.Tensor, memory_logits: torch.Tensor, *, assert_on_device: bool = True) -> None:
    """Every neighbour id a row of ``memory_logits (N, E)`` (:func:`ids_in_range`)."""
    rows = memory_logits.shape[0]
    ids_in_range(
        op, "neighbor_ids", ids, 0, rows, "N", what="the rows of memory_logits", assert_on_device=assert_on_device
    )


def mix_args(op: str, router_logits, neighbor_sims, weighting, temperature, min_confidence):
    """The checks every kNN op shares: ``router_logits (T, E)`` with E >= 1, ``neighbor_sims (T, n)``
    with n >= 1, and the mixing options (:class:`~moe_kernels.config.KnnMixing`'s fields)."""
    tensor(op, "router_logits", router_logits, dtypes=FLOAT_DTYPES, dims=2, shape="(T, E)")
    num_tokens, num_experts = router_logits.shape
    if num_experts < 1:
        raise ValueError(f"{op}: router_logits must have E >= 1 experts, got shape {tuple(router_logits.shape)}")
    on_router_device(op, "neighbor_sims", neighbor_sims, router_logits, dtypes=FLOAT_DTYPES)
    if neighbor_sims.dim() != 2 or neighbor_sims.shape[1] < 1 or neighbor_sims.shape[0] != num_tokens:
        raise ValueError(
            f"{op}: neighbor_sims must have shape (T, n) = ({num_tokens}, n) with n >= 1, got "
            f"{tuple(neighbor_sims.shape)}"
        )
    check_mixing(op, weighting, temperature, min_confidence)
