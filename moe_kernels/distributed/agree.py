"""What every expert-parallel exchange does before its data moves, and how long it waits.

- :func:`agree`: the ranks exchange a small fixed-size header (an error flag and the fields the
  exchange depends on: E, H, dtype, widths, ``requires_grad``) with one ``all_gather`` and read it
  on the host; :func:`raise_unless_agreed` then raises the same named error on every rank when any
  rank failed its local checks or the ranks disagree. The header has the same size whatever the
  fields hold, so a disagreement can never become a mismatched collective (which gloo answers
  with a hang or a SIGABRT).
- :func:`wait_bounded`: every collective of the exchange waits at most :func:`exchange_timeout`
  seconds (default :data:`DEFAULT_TIMEOUT_S`, or ``MOE_KERNELS_EXCHANGE_TIMEOUT``; settable with
  :func:`set_exchange_timeout`) for its peers on gloo, then raises ``RuntimeError``: a rank that
  raised between two exchanges (or skipped a backward) leaves its peers an error, not a wait of
  the process group's 30 minutes. On NCCL a bounded wait would synchronise the host on every
  collective, so there the process group's own timeout bounds it (pass ``timeout=`` to
  ``init_process_group``). After a timeout the group is out of step: make a new one.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
_timeout_s = float(os.environ.get("MOE_KERNELS_EXCHANGE_TIMEOUT", DEFAULT_TIMEOUT_S))


def exchange_timeout() -> float:
    """Seconds a rank waits for its peers in an exchange collective (gloo)."""
    return _timeout_s


def set_exchange_timeout(seconds: float) -> float:
    """Set :func:`exchange_timeout` for this process (every rank should set the same); returns
    the previous value. ``ValueError`` unless ``seconds`` is a finite number > 0."""
    global _timeout_s
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise ValueError(f"set_exchange_timeout: seconds must be a finite number > 0, got {seconds!r}")
    previous, _timeout_s = _timeout_s, float(seconds)
    return previous


def wait_bounded(op: str, launch: Callable[[bool], object], device: torch.device) -> None:
    """Run ``launch(async_op)`` (one collective); on the CPU (gloo) wait for it at most
    :func:`exchange_timeout` seconds, then raise a ``RuntimeError`` naming ``op``."""
    if device.type != "cpu":
        launch(False)
        return
    work = launch(True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=_timeout_s))
    except RuntimeError as error:
        raise RuntimeError(
            f"{op}: the peers did not join this exchange within {_timeout_s:g} s (a rank failed or took another "
            "path since the last exchange); the process group is out of step now: create a new one "
            "(moe_kernels.distributed.set_exchange_timeout sets the bound)"
        ) from error


def agree(op: str, fields: dict, group, device: torch.device) -> list[dict[str, int]]:
    """Every rank's ``fields`` (the same names, in the same order, on every rank; each an int, a
    bool or a 0-d tensor on ``device``, which is not read before the exchange), exchanged with one
    bounded ``all_gather`` and read on the host (the exchange's host synchronisation):
    ``table[r]`` holds rank ``r``'s."""
    names = list(fields)
    mine = torch.stack([torch.as_tensor(fields[name], device=device).to(torch.int64) for name in names])
    world = dist.get_world_size(group)
    gathered = torch.empty(world * len(names), dtype=torch.int64, device=device)
    wait_bounded(
        op, lambda async_op: dist.all_gather_into_tensor(gathered, mine, group=group, async_op=async_op), device
    )
    values = gathered.tolist()
    return [dict(zip(names, values[r * len(names) : (r + 1) * len(names)])) for r in range(world)]


def raise_unless_agreed(op: str, table: list[dict[str, int]], rank: int, problem: Exception | None, same: dict) -> None:
    """Raise on every rank alike: this rank's own ``problem`` when it has one; a ``RuntimeError``
    naming the failed ranks when a peer reported one (``table[r]["error"]``); when a field of
    ``same`` (``{field: (description, error type[, labels of its codes])}``) differs between ranks,
    that error naming the field and every rank's value."""
    failed = [r for r, row in enumerate(table) if row["error"]]
    if failed:
        if problem is not None:
            raise problem
        raise RuntimeError(
            f"{op}: rank(s) {failed} of the group got invalid arguments (they raise the details); rank {rank} "
            "raises too, so that no rank waits in the exchange"
        )
    for field, (description, error, *labels) in same.items():
        values = [row[field] for row in table]
        if len(set(values)) > 1:
            if labels:  # codes of a known list (dtypes): shown by name
                values = [labels[0][v] if 0 <= v < len(labels[0]) else v for v in values]
            raise error(f"{op}: {description} must be the same on every rank, got {values} by rank")
