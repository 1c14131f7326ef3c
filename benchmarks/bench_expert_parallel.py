"""Expert-parallel exchange benchmark: :func:`moe_kernels.distributed.dispatch` / ``combine`` (one
count exchange + ``all_to_all_single`` each way) and the whole :class:`ExpertParallelMoE` forward,
against the all-gather + reduce-scatter formulation (every rank gathers every token, runs its
experts on the ones routed to them, and a reduce-scatter sums the partial outputs back: the
default path of vLLM and the shape of transformers' tensor-parallel MoE) measured in the same run,
on W spawned ranks (gloo on CPU; NCCL with one GPU per rank).

    python -m benchmarks.bench_expert_parallel --quick
    python -m benchmarks.bench_expert_parallel --worlds 2 4 --tokens 256 1024 --hidden 2048

Rows: ``median_us`` is the slowest rank's median over fixed repetitions (each preceded by a
barrier, so all ranks start together); ``gb_per_s`` is the payload (the token rows the ranks'
experts consume, ``R * H * itemsize``, averaged over ranks: the same bytes for both providers, so
their ratio is the speedup) over that time. DeepEP's published figures (H800, EP8) are quoted
beside the table as the GPU reference, not measured.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device
from moe_kernels import TopKRouter, fused_experts
from moe_kernels.distributed import ExpertParallelMoE, combine, dispatch, run_group

OP_NAME = "expert_parallel"
PHASES = ("dispatch", "combine", "block")
PROVIDERS = ("all_to_all", "allgather_reducescatter")
DEEPEP_REFERENCE = (
    "GPU reference (quoted, not measured): DeepEP V1 normal kernels, H800 NVLink, EP8, 4096 tokens, "
    "H = 7168, top-8: dispatch 153 GB/s (FP8), combine 158 GB/s (BF16) [deepseek-ai/DeepEP README]"
)
TABLE_COLUMNS = (
    "W",
    "E",
    "k",
    "H",
    "T",
    "phase",
    "provider",
    "median_us",
    "p20_us",
    "p80_us",
    "gb_per_s",
    "speedup_vs_ag_rs",
)


@dataclass(frozen=True)
class Config:
    """One benchmark run: tokens per rank, H, I, E (total, divisible by each W), k, timed reps."""

    tokens: tuple[int, ...] = (256, 1024)
    hidden: int = 1024
    inter: int = 512
    experts: int = 16
    k: int = 4
    reps: int = 20
    dtype: str = "float32"
    threads_per_rank: int = 1


QUICK = Config(tokens=(64, 256), hidden=512, inter=256, experts=8, k=2, reps=10)
TINY = Config(tokens=(8,), hidden=32, inter=16, experts=4, k=2, reps=2)  # the tests' smoke run


def _collective(new: str, old: str):
    """``dist.<new>`` where this torch has it, else the older name (2.13 deprecates the old)."""
    return getattr(dist, new, None) or getattr(dist, old)


def all_gather_rows(tensor: torch.Tensor, world: int) -> torch.Tensor:
    out = tensor.new_empty(world * tensor.shape[0], *tensor.shape[1:])
    _collective("all_gather_single", "all_gather_into_tensor")(out, tensor.contiguous())
    return out


def allgather_dispatch(x, ids, weights, world):
    """Every rank's tokens, ids and weights on every rank (the baseline's dispatch)."""
    return all_gather_rows(x, world), all_gather_rows(ids, world), all_gather_rows(weights, world)


def allgather_experts(block: ExpertParallelMoE, x_all, ids_all, weights_all) -> torch.Tensor:
    """The rank's experts on the gathered tokens routed to them, weighted: ``(W*T, H)`` partial sums."""
    first = block.rank * block.gate_up_proj.shape[0]
    mine = (ids_all >= first) & (ids_all < first + block.gate_up_proj.shape[0])
    local_ids = torch.where(mine, ids_all - first, torch.full_like(ids_all, -1))
    return fused_experts(
        x_all, block.gate_up_proj, block.down_proj, weights_all, local_ids, activation=block.activation
    )


def reducescatter_combine(partial: torch.Tensor, world: int) -> torch.Tensor:
    out = partial.new_empty(partial.shape[0] // world, partial.shape[1])
    _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, partial)
    return out


def allgather_block(block: ExpertParallelMoE, x: torch.Tensor) -> torch.Tensor:
    weights, ids = block.router(x)
    partial = allgather_experts(block, *allgather_dispatch(x, ids, weights, block.world_size))
    return reducescatter_combine(partial, block.world_size)


def _build_block(config: Config, world: int, rank: int, device) -> ExpertParallelMoE:
    """An expert-parallel block made directly from this rank's shard (no unsharded copy): the
    router drawn from the same seed on every rank, the experts from a per-rank seed."""
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(0)
    router = TopKRouter(config.hidden, config.experts, config.k, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(1 + rank)
    num_local = config.experts // world
    gate_up = torch.randn(num_local, 2 * config.inter, config.hidden, generator=generator, device=device, dtype=dtype)
    down = torch.randn(num_local, config.hidden, config.inter, generator=generator, device=device, dtype=dtype)
    return ExpertParallelMoE(
        router,
        torch.nn.Parameter(gate_up * config.hidden**-0.5),
        torch.nn.Parameter(down * config.inter**-0.5),
        num_experts=config.experts,
    )


def _time(fn, reps: int, device) -> list[float]:
    """Per-call seconds of ``fn`` over ``reps`` calls, all ranks starting each call together."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def bench_rank(rank: int, world: int, config: Config) -> list[dict]:
    """One rank's part of the benchmark; rank 0 returns the rows (the others an empty list)."""
    nccl = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if nccl else torch.device("cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    block = _build_block(config, world, rank, device)
    rows = []
    for num_tokens in config.tokens:
        x = torch.randn(
            num_tokens,
            config.hidden,
            generator=torch.Generator(device=device).manual_seed(10 + rank),
            device=device,
            dtype=block.gate_up_proj.dtype,
        )
        with torch.no_grad():
            rows += _bench_point(block, x, config, device)
    return rows if rank == 0 else []


def _bench_point(block: ExpertParallelMoE, x, config: Config, device) -> list[dict]:
    world, num_experts = block.world_size, block.num_experts
    weights, ids = block.router(x)
    recv, handle = dispatch(x, ids, num_experts)
    expert_out = block.experts(recv, handle)
    partial = allgather_experts(block, *allgather_dispatch(x, ids, weights, world))
    calls = {
        ("dispatch", "all_to_all"): lambda: dispatch(x, ids, num_experts),
        ("combine", "all_to_all"): lambda: combine(expert_out, handle, weights),
        ("block", "all_to_all"): lambda: block(x),
        ("dispatch", "allgather_reducescatter"): lambda: allgather_dispatch(x, ids, weights, world),
        ("combine", "allgather_reducescatter"): lambda: reducescatter_combine(partial, world),
        ("block", "allgather_reducescatter"): lambda: allgather_block(block, x),
    }
    payload = handle.num_received * x.shape[1] * x.element_size()
    mine = {key: _time(call, config.reps, device) for key, call in calls.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, payload))
    mean_payload = statistics.mean(p for _, p in gathered)
    rows = []
    for phase, provider in calls:
        # The slowest rank's samples: a step waits for it.
        samples = max((g[(phase, provider)] for g, _ in gathered), key=statistics.median)
        deciles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
        median_us = statistics.median(samples) * 1e6
        rows.append(
            {
                "op": OP_NAME,
                "model": f"EP{world} {phase}",
                "W": world,
                "E": num_experts,
                "k": ids.shape[1],
                "H": x.shape[1],
                "I": block.down_proj.shape[2],
                "T": x.shape[0],
                "dtype": str(x.dtype).removeprefix("torch."),
                "phase": phase,
                "provider": provider,
                "median_us": median_us,
                "p20_us": deciles[1] * 1e6,
                "p80_us": deciles[7] * 1e6,
                "timer": "wall",
                "reps": config.reps,
                "backend": dist.get_backend(),
                "threads_per_rank": config.threads_per_rank,
                "bytes": None if phase == "block" else int(mean_payload),
                "gb_per_s": None if phase == "block" else mean_payload / median_us / 1e3,
            }
        )
    baseline = {row["phase"]: row["median_us"] for row in rows if row["provider"] == "allgather_reducescatter"}
    for row in rows:
        ours = row["provider"] == "all_to_all"
        row["speedup_vs_ag_rs"] = baseline[row["phase"]] / row["median_us"] if ours else None
    return rows


def run(
    config: Config = Config(), *, worlds: Sequence[int] = (2, 4), device=None, timeout: float = 600.0
) -> list[dict]:
    """Rows of every (W, T, phase, provider), each W in its own spawned process group."""
    device = resolve_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    rows = []
    for world in worlds:
        if backend == "nccl" and torch.cuda.device_count() < world:
            print(f"  skipping W = {world}: NCCL needs one GPU per rank, {torch.cuda.device_count()} visible")
            continue
        if config.experts % world:
            raise ValueError(f"bench_expert_parallel: E = {config.experts} is not divisible by W = {world}")
        results = run_group(
            bench_rank, world, config, backend=backend, timeout=timeout, threads=config.threads_per_rank
        )
        rows += results[0]
    return rows


def _run_options(args, device: torch.device) -> dict:
    """``run``'s keywords: the ``--quick`` or default :class:`Config`, with the sizes given as flags
    (each flag's dest is the field's name)."""
    config = QUICK if args.quick else Config()
    given = {field.name: getattr(args, field.name, None) for field in fields(Config)}
    given["tokens"] = tuple(args.tokens) if args.tokens else None
    config = replace(config, **{name: value for name, value in given.items() if value is not None})
    return {"config": config, "worlds": args.worlds, "device": device}


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_expert_parallel", __doc__, "T in (64, 256), H=512, I=256, E=8, k=2, 10 reps")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="ranks per run (default 2 4)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank")
    for size in ("--hidden", "--inter", "--experts", "--k", "--reps", "--threads-per-rank"):
        parser.add_argument(size, type=int)
    device_flag = {"help": "cpu (gloo) or cuda (nccl, one GPU per rank); default cuda when available"}
    status = main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS, device_flag=device_flag, options=_run_options)
    print(DEEPEP_REFERENCE)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
