"""CPU decode at real layer sizes: ``fused_experts`` against the weight-read floor and the per-expert
loop, and a patched transformers model's greedy decode against the unpatched one.

Rows (``moe-kernels bench --op cpu_decode``), at 1 thread and at all threads:

- ``layer``: the MoE layer of OLMoE-1B-7B (H 2048, I 1024, E 64, k 8) and of Qwen3-30B-A3B
  (H 2048, I 768, E 128, k 8), random weights of the public shapes, float32 and bfloat16, one
  forward of ``T`` tokens routed to distinct random experts. T = 1 / 4 / 16 (decode): at least 60%
  of the weight-read floor and 1.0x the per-expert loop; T = 64 / 256: at least 1.2x the loop.
- ``routing``: ``softmax_topk`` on the routers of OLMoE-1B-7B, Qwen3-30B-A3B, DeepSeek-V3 and
  Qwen3-Next-80B-A3B (logits in the dtype) against the fastest plain chain giving its result (HF's):
  T <= 64 at most the chain's time + 10 us (the fixed cost a decode step pays per layer), T = 1024
  at least 1.0x.
- ``model``: OLMoE-1B-7B with 2 layers (public sizes, random weights), batch 1, greedy decode:
  tokens/s at least 1.1x the unpatched model (transformers' default experts), same tokens; the
  per-expert loop (``experts_implementation="eager"``) reported beside.

The floor is the bytes of the experts a call routes to over the read bandwidth: a float32 sum over
a buffer twice the last-level cache (at least 256 MiB), run before every timed call. That same pass
evicts the caches, so every call reads its weights from memory, as a decode step of a whole model
does (the other layers' weights pass through the caches in between). ``copy_gbs`` is a copy's
bandwidth (bytes read plus written), for reference. The loop is transformers' own eager experts
module (``OlmoeExperts`` / ``Qwen3MoeExperts``: the tokens of each chosen expert indexed,
``x @ W.T``, the activation, ``index_add_``). Both run the same calls, in alternating order; a
row's ratio is the median of the per-call ratios (``spread``: their min-max), stalled calls
(threads waiting for a CPU) re-measured. ``agree`` is the largest difference between the two
outputs relative to the largest output.

    python -m benchmarks.bench_cpu_decode --quick
    python -m benchmarks.bench_cpu_decode --threads-list 1 --sections layer
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import moe_kernels
from benchmarks.command import cpu_goals_main
from benchmarks.common import environment, results_root, run_queue_wait_s, stalled
from benchmarks.cpu_baselines import hf_experts_module
from moe_kernels.integrations.transformers.families import FAMILIES

OP_NAME = "cpu_decode"
SECTIONS = ("layer", "routing", "model")
TABLE_COLUMNS = (
    "section",
    "case",
    "dtype",
    "threads",
    "T",
    "floor_us",
    "ours_us",
    "pct_floor",
    "baseline",
    "baseline_us",
    "baseline_pct_floor",
    "ratio",
    "spread",
    "target",
    "met",
    "agree",
    "stalled",
)
LAYERS = {"OLMoE-1B-7B": "olmoe", "Qwen3-30B-A3B": "qwen3_moe"}
DTYPES = (torch.float32, torch.bfloat16)
DECODE_TOKENS = (1, 4, 16)
PREFILL_TOKENS = (64, 256)
FLOOR_TARGET = 0.60
DECODE_LOOP_TARGET = 1.0
PREFILL_LOOP_TARGET = 1.2
MODEL_TARGET = 1.1
ROUTING_MODELS = ("OLMoE-1B-7B", "Qwen3-30B-A3B", "DeepSeek-V3", "Qwen3-Next-80B-A3B")
ROUTING_DECODE_TOKENS, ROUTING_PREFILL_TOKENS = (1, 4, 16, 64), (1024,)
ROUTING_EXTRA_US = 10.0  # decode: at most the plain chain's time plus this
CALLS = 9  # timed calls per provider and row
MODEL_LAYERS, PROMPT_TOKENS, NEW_TOKENS, MODEL_ROUNDS = 2, 16, 16, 3
MIN_FLUSH_BYTES = 256 << 20
WARM_HIDDEN = 128  # the warm-up layer's H (I: half of it)
QUICK = dict(layer=(64, 32, 8, 2), tokens=(1, 4, 64), calls=2, model_width=2, new_tokens=4, routing_tokens=(1, 1024))


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (Linux's ``/sys`` cache index), or 0 where it is not reported."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


class MemoryProbe:
    """A float32 buffer twice the last-level cache: :meth:`read_gbs` sums it (evicting the caches)
    and returns the read bandwidth in GB/s; :meth:`copy_gbs` times a copy of it."""

    def __init__(self, nbytes: int | None = None):
        nbytes = nbytes or max(MIN_FLUSH_BYTES, 2 * last_level_cache_bytes())
        self.buffer = torch.ones(nbytes // 4)

    def read_gbs(self) -> float:
        start = time.perf_counter()
        self.buffer.sum()
        return self.buffer.numel() * 4 / (time.perf_counter() - start) / 1e9

    def copy_gbs(self) -> float:
        half = self.buffer.numel() // 2
        src, dst = self.buffer[:half], self.buffer[half:]
        start = time.perf_counter()
        dst.copy_(src)
        return 2 * half * 4 / (time.perf_counter() - start) / 1e9


def layer_sizes(family: str, scale: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """``(H, I, E, k)`` of ``family``'s public MoE layer (``scale``: the quick run's instead)."""
    if scale:
        return scale
    sizes = FAMILIES[family].public_sizes
    inter = sizes.get("moe_intermediate_size", sizes.get("intermediate_size"))
    return sizes["hidden_size"], inter, sizes["num_experts"], sizes["num_experts_per_tok"]


def _timed(call, warm, probe: MemoryProbe, attempts: int = 3) -> tuple[float, float, bool]:
    """``(seconds, read GB/s, stalled)`` of one ``call``: a cache-evicting read, then ``warm`` (the
    same provider on a small layer: in a whole model the previous layer ran the same code, so its
    instructions and PyTorch's dispatch state are hot while the weights are not), then the timed
    call; re-measured (up to ``attempts`` times) while its threads waited for a CPU."""
    for attempt in range(attempts):
        gbs = probe.read_gbs()
        warm()
        waited, cpu = run_queue_wait_s(), time.process_time()
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
        waited = None if waited is None else run_queue_wait_s() - waited
        if not stalled(wall, time.process_time() - cpu, waited) or attempt == attempts - 1:
            return wall, gbs, attempt > 0
    raise AssertionError("unreachable")


def _random_layer(sizes, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up_proj (E, 2I, H), down_proj (E, H, I))`` in ``dtype``, at a layer's scale."""
    hidden_size, inter, num_experts, _ = sizes
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden_size, generator=generator) * hidden_size**-0.5
    down = torch.randn(num_experts, hidden_size, inter, generator=generator) * inter**-0.5
    return gate_up.to(dtype), down.to(dtype)


def _layer_calls(sizes, dtype, tokens: int, calls: int, seed: int) -> list[tuple]:
    """``calls`` inputs ``(hidden, ids, weights)``: ``tokens`` tokens, each routed to ``k``
    distinct random experts with softmax weights."""
    hidden_size, _, num_experts, k = sizes
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(calls):
        hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype)
        scores = torch.rand(tokens, num_experts, generator=generator)
        values, ids = scores.topk(k, dim=-1)
        out.append((hidden, ids, values.softmax(dim=-1)))
    return out


def layer_rows(name: str, family: str, dtype, threads: int, tokens: Sequence[int], calls: int, probe, scale=None):
    """The ``layer`` rows of one layer and dtype: ours and the per-expert loop per ``T``."""
    sizes = layer_sizes(family, scale)
    gate_up, down = _random_layer(sizes, dtype, seed=0)
    # The warm-up layer: the same E and k (the same code path), small H and I.
    small_sizes = (min(sizes[0], WARM_HIDDEN), min(sizes[1], WARM_HIDDEN // 2), *sizes[2:])
    small_gate_up, small_down = _random_layer(small_sizes, dtype, seed=1)
    layers = {"ours": (gate_up, down), "loop": hf_experts_module(family, gate_up, down, "eager")}
    small = {"ours": (small_gate_up, small_down), "loop": hf_experts_module(family, small_gate_up, small_down, "eager")}
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    copy_gbs = probe.copy_gbs()
    rows = []
    for num_tokens in tokens:
        inputs = _layer_calls(sizes, dtype, num_tokens, calls, seed=num_tokens)
        small_input = _layer_calls(small_sizes, dtype, num_tokens, 1, seed=0)[0]
        with torch.no_grad():
            first = {p: _provider_call(p, layers[p], *inputs[0]) for p in layers}
            agree = (first["ours"].double() - first["loop"].double()).abs().max() / first["loop"].abs().max()
            times = {p: [] for p in layers}
            floors, read_gbs, stalls = [], [], 0
            for index, (x, ids, w) in enumerate(inputs):
                order = list(layers) if index % 2 == 0 else list(reversed(layers))
                for p in order:
                    seconds, gbs, was_stalled = _timed(
                        lambda p=p: _provider_call(p, layers[p], x, ids, w),
                        lambda p=p: _provider_call(p, small[p], *small_input),
                        probe,
                    )
                    times[p].append(seconds)
                    stalls += was_stalled
                    read_gbs.append(gbs)
                # The floor of this call at the bandwidth read before its providers ran.
                floors.append(ids.unique().numel() * expert_bytes / (statistics.median(read_gbs[-2:]) * 1e9))
        measured = dict(floors=floors, read_gbs=statistics.median(read_gbs), copy_gbs=copy_gbs, stalled=stalls)
        rows.append(_layer_row(name, dtype, threads, num_tokens, times, measured, float(agree)))
    return rows


def _provider_call(provider: str, layer, hidden, ids, weights) -> torch.Tensor:
    """One forward of ``provider`` (``"ours"``: ``fused_experts`` on the ``(gate_up, down)`` pair;
    ``"loop"``: the HF experts module, given the weights in the hidden dtype as HF's routers do)."""
    if provider == "ours":
        return moe_kernels.fused_experts(hidden, *layer, weights, ids)
    return layer(hidden, ids, weights.to(hidden.dtype))


def _layer_row(name, dtype, threads, num_tokens, times, measured, agree) -> dict:
    ours, loop, floors = times["ours"], times["loop"], measured["floors"]
    ratios = [b / o for b, o in zip(loop, ours)]
    pct = [f / o for f, o in zip(floors, ours)]
    decode = num_tokens in DECODE_TOKENS
    ratio, pct_floor = statistics.median(ratios), statistics.median(pct)
    loop_target = DECODE_LOOP_TARGET if decode else PREFILL_LOOP_TARGET
    met = ratio >= loop_target and (pct_floor >= FLOOR_TARGET if decode else True)
    floor_s = statistics.median(floors)
    return {
        "op": OP_NAME,
        "section": "layer",
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "T": num_tokens,
        "floor_us": floor_s * 1e6,
        "ours_us": statistics.median(ours) * 1e6,
        "pct_floor": 100 * pct_floor,
        "baseline": "per_expert_loop",
        "baseline_us": statistics.median(loop) * 1e6,
        "baseline_pct_floor": 100 * statistics.median(f / b for f, b in zip(floors, loop)),
        "ratio": ratio,
        "spread": f"{min(ratios):.2f}-{max(ratios):.2f}",
        "target": (f">= {FLOOR_TARGET:.0%} floor, " if decode else "") + f">= {loop_target}x loop",
        "met": met,
        "agree": agree,
        "stalled": measured["stalled"],
        "read_gbs": measured["read_gbs"],
        "copy_gbs": measured["copy_gbs"],
    }


def routing_rows(dtype, threads: int, tokens: Sequence[int], quick: bool) -> list[dict]:
    """``softmax_topk`` on the routers of :data:`ROUTING_MODELS` (logits in ``dtype``, as a model
    in that dtype computes them) against the fastest plain chain giving its result: at decode
    sizes at most the chain's time plus :data:`ROUTING_EXTRA_US`, from 1024 tokens 1.0x."""
    from benchmarks import cpu_baselines
    from benchmarks.bench_cpu import compare
    from moe_kernels.shapes import ROUTING_SHAPES

    rows = []
    for shape in (s for s in ROUTING_SHAPES if s.model in ROUTING_MODELS):
        chains = cpu_baselines.routing_chains(shape)
        for num_tokens in tokens:
            generator = torch.Generator().manual_seed(num_tokens)
            logits = (torch.randn(num_tokens, shape.num_experts, generator=generator) * 2).to(dtype)
            bias = torch.randn(shape.num_experts, generator=generator) * 0.1 if shape.has_bias else None
            calls = {"ours": lambda: moe_kernels.softmax_topk(logits, shape.k, routing=shape.routing, bias=bias)}
            calls.update({name: (lambda chain=chain: chain(logits, bias)) for name, chain in chains.items()})
            measured = compare(calls, rounds=2 if quick else 5, target_s=0.05 if quick else 0.6)
            best = min(chains, key=lambda name: measured[name]["us"])
            ours_us, chain_us = measured["ours"]["us"], measured[best]["us"]
            decode = num_tokens in ROUTING_DECODE_TOKENS or num_tokens < ROUTING_PREFILL_TOKENS[0]
            rows.append(
                {
                    "op": OP_NAME,
                    "section": "routing",
                    "case": shape.label,
                    "dtype": str(dtype).removeprefix("torch."),
                    "threads": threads,
                    "T": num_tokens,
                    "ours_us": ours_us,
                    "baseline": best,
                    "baseline_us": chain_us,
                    "ratio": chain_us / ours_us,
                    "target": f"<= chain + {ROUTING_EXTRA_US:g} us" if decode else ">= 1.0x",
                    "met": ours_us <= chain_us + ROUTING_EXTRA_US if decode else chain_us >= ours_us,
                    "stalled": sum(m["stalled"] for m in measured.values()),
                }
            )
    return rows


def build_decode_model(dtype, quick: bool):
    """OLMoE-1B-7B's public sizes with :data:`MODEL_LAYERS` layers (quick: the tiny test model at
    twice its width), random seeded weights, eval mode."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from moe_kernels.testing import tiny_hf_config

    torch.manual_seed(0)
    if quick:
        config = tiny_hf_config("olmoe", width=QUICK["model_width"])
    else:
        config = OlmoeConfig(**FAMILIES["olmoe"].public_sizes, num_hidden_layers=MODEL_LAYERS)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def model_rows(dtype, threads: int, quick: bool) -> list[dict]:
    """Greedy decode of the patched model against transformers' default experts (``grouped_mm`` on
    the CPU: the unpatched model) and the per-expert loop, interleaved rounds."""
    from benchmarks.bench_hf_generate import interleaved_seconds

    model = build_decode_model(dtype, quick)
    new_tokens = QUICK["new_tokens"] if quick else NEW_TOKENS
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)

    def generate():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    providers = ("hf_grouped_mm", "hf_eager", "moe_kernels")
    measured = interleaved_seconds(model, providers, generate, torch.device("cpu"), 1 if quick else MODEL_ROUNDS)
    ours_times, ours_out = measured["moe_kernels"]
    rows = []
    for baseline, target in (("hf_grouped_mm", MODEL_TARGET), ("hf_eager", None)):
        base_times, base_out = measured[baseline]
        ratios = [b / o for b, o in zip(base_times, ours_times)]
        ratio = statistics.median(ratios)
        same = (ours_out[:, PROMPT_TOKENS:] == base_out[:, PROMPT_TOKENS:]).float().mean().item()
        rows.append(
            {
                "op": OP_NAME,
                "section": "model",
                "case": f"OLMoE-1B-7B x{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}",
                "dtype": str(dtype).removeprefix("torch."),
                "threads": threads,
                "T": 1,
                "new_tokens": new_tokens,
                "ours_us": statistics.median(ours_times) / new_tokens * 1e6,
                "baseline": baseline,
                "baseline_us": statistics.median(base_times) / new_tokens * 1e6,
                "ratio": ratio,
                "spread": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "target": f">= {target}x, same tokens" if target else "(reported)",
                "met": (ratio >= target and same == 1.0) if target else None,
                "agree": same,
            }
        )
    return rows


def run(
    *,
    quick: bool = False,
    threads_list: Sequence[int] | None = None,
    sections: Sequence[str] = SECTIONS,
    plot_dir: str | None = None,
) -> list[dict]:
    """Every row of ``sections`` at each thread count of ``threads_list`` (default: 1 and all of
    torch's); with ``plot_dir``, the % of floor of the layer rows drawn to
    ``<plot_dir>/cpu_decode_floor.png``."""
    all_threads = torch.get_num_threads()
    probe = MemoryProbe(MIN_FLUSH_BYTES // 16 if quick else None) if "layer" in sections else None
    rows = []
    try:
        for threads in threads_list or sorted({1, all_threads}):
            torch.set_num_threads(threads)
            for dtype in DTYPES:
                for section in sections:
                    start = time.perf_counter()
                    rows += _section_rows(section, dtype, threads, quick, probe)
                    print(f"   {section} {dtype} {threads} thr: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        torch.set_num_threads(all_threads)
    if plot_dir is not None:
        plot_floor(rows, Path(plot_dir) / f"{OP_NAME}_floor.png")
    return rows


def _section_rows(section: str, dtype, threads: int, quick: bool, probe) -> list[dict]:
    if section == "layer":
        tokens = QUICK["tokens"] if quick else DECODE_TOKENS + PREFILL_TOKENS
        calls, scale = (QUICK["calls"], QUICK["layer"]) if quick else (CALLS, None)
        return [
            row
            for name, family in LAYERS.items()
            for row in layer_rows(name, family, dtype, threads, tokens, calls, probe, scale)
        ]
    if section == "routing":
        tokens = QUICK["routing_tokens"] if quick else ROUTING_DECODE_TOKENS + ROUTING_PREFILL_TOKENS
        return routing_rows(dtype, threads, tokens, quick)
    if section == "model":
        return model_rows(dtype, threads, quick)
    raise ValueError(f"bench_cpu_decode: unknown section {section!r}; the sections are {SECTIONS}")


def plot_floor(rows: Sequence[dict], path: Path) -> Path | None:
    """Bars of the % of the weight-read floor of ours and the loop, one group per layer row (the
    60% goal drawn across); None without matplotlib or layer rows."""
    rows = [row for row in rows if row["section"] == "layer"]
    if not rows:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    panels = sorted({(row["case"], row["threads"]) for row in rows})
    fig = Figure(figsize=(11, 2.6 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (case, threads) in zip(axes, panels):
        panel = [row for row in rows if (row["case"], row["threads"]) == (case, threads)]
        labels = [f"{row['dtype']}\nT={row['T']}" for row in panel]
        positions = range(len(panel))
        ax.bar([p - 0.2 for p in positions], [row["pct_floor"] for row in panel], 0.4, label="moe_kernels")
        ax.bar([p + 0.2 for p in positions], [row["baseline_pct_floor"] for row in panel], 0.4, label="per-expert loop")
        ax.axhline(100 * FLOOR_TARGET, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(positions), labels, fontsize=7)
        ax.set(ylabel="% of weight-read floor", title=f"{case}, {threads} thread(s)", ylim=(0, 110))
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _run_options(args, _device: torch.device) -> dict:
    threads_list = args.threads_list or ([args.threads] if args.threads else None)
    plot_dir = None if args.no_write else str(results_root() / environment("cpu")["device_slug"])
    return {"quick": args.quick, "threads_list": threads_list, "sections": args.sections, "plot_dir": plot_dir}


def main(argv: Sequence[str] | None = None) -> int:
    quick_help = "tiny layers and model, 2 calls per row (seconds)"
    module = "bench_cpu_decode"
    return cpu_goals_main(OP_NAME, module, __doc__, quick_help, SECTIONS, run, TABLE_COLUMNS, _run_options, argv)


if __name__ == "__main__":
    raise SystemExit(main())
