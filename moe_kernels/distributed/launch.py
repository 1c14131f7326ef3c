"""Run a function on a local process group: ``world_size`` spawned processes joined by
``torch.distributed`` on a free localhost port, each rank's return value or exception sent back
to the caller, with a deadline so that a broken rank fails the run instead of hanging it. For
tests and benchmarks on one machine (gloo on CPU; NCCL with one GPU per rank)."""

from __future__ import annotations

import datetime
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After the first rank fails, how long the others get to report before they are killed: they are
# usually blocked in a collective with the failed rank and would only leave it at the timeout.
FAILURE_GRACE_S = 3.0
# How long finished ranks get to leave the process group and exit.
EXIT_GRACE_S = 10.0


class RankError(RuntimeError):
    """One or more ranks raised (or died); ``errors`` maps each to its traceback text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        details = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(errors.items()))
        super().__init__(f"run_group: rank(s) {sorted(errors)} failed\n{details}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_group(
    fn: Callable,
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 120.0,
    threads: int = 1,
) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, each called in its own spawned process in
    a process group of ``world_size`` ranks (``backend``: "gloo", or "nccl" with one GPU per rank).

    ``fn`` must be importable by name (a module-level function) and return a picklable value (plain
    Python values: tensors travel through shared memory that may be gone when the rank exits).
    ``threads`` caps each rank's intra-op threads (ranks share the machine's cores).

    Raises :class:`RankError` when any rank raised or died, with every failed rank's traceback
    (ranks still running :data:`FAILURE_GRACE_S` after the first failure are killed), and
    ``TimeoutError`` naming the ranks that had not reported after ``timeout`` seconds (they are
    killed). The process group's own timeout is ``timeout`` too, so a rank blocked in a
    collective fails rather than waits forever.
    """
    if world_size < 1:
        raise ValueError(f"run_group: world_size must be >= 1, got {world_size}")
    context = mp.get_context("spawn")
    results_queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, port, backend, timeout, threads, fn, args, results_queue),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        results, errors = _collect(processes, results_queue, timeout)
    finally:
        _stop(processes)
    if errors:
        raise RankError(errors)
    missing = [rank for rank in range(world_size) if rank not in results]
    if missing:
        raise TimeoutError(f"run_group: rank(s) {missing} did not finish within {timeout} s (killed)")
    return [results[rank] for rank in range(world_size)]


def _collect(processes, results_queue, timeout: float) -> tuple[dict, dict]:
    """Each rank's result or error, until all reported, the deadline, or a failure's grace ends."""
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < len(processes):
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, ok, payload = results_queue.get(timeout=min(0.2, deadline - now))
        except queue_module.Empty:
            for rank, process in enumerate(processes):
                if rank not in results and rank not in errors and process.exitcode not in (None, 0):
                    errors[rank] = f"exited with code {process.exitcode} without reporting"
            if errors:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            continue
        (results if ok else errors)[rank] = payload
        if not ok:
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    return results, errors


def _stop(processes) -> None:
    """Let finished ranks exit, then kill the ones still alive (only the processes started here)."""
    end = time.monotonic() + EXIT_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _rank_main(rank, world_size, port, backend, timeout, threads, fn, args, results_queue) -> None:
    """One rank: join the group, run ``fn``, report, leave the group together with the others."""
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
        pickle.dumps(result)  # the queue pickles in a background thread, where a failure would be lost
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        results_queue.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        return
    results_queue.put((rank, True, result))
    # A rank that destroys its group while a peer is still in a collective can abort the peer
    # (gloo: "terminate called without an active exception"), so all leave after a barrier.
    dist.barrier()
    dist.destroy_process_group()
