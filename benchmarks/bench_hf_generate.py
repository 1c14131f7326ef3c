"""Whole HF MoE models (random weights, built from :func:`moe_kernels.testing.tiny_hf_config`, no
download): greedy generation and one training step (forward with labels + backward), patched by
:func:`moe_kernels.integrations.transformers.apply_moe_kernels` against the same model unpatched.

Baselines (the same model object, same weights):

- ``hf_eager``: transformers with ``experts_implementation="eager"``, the per-expert loop;
- ``hf_grouped_mm``: transformers' default on the CPU since 5.x, ``"grouped_mm"``.

At the tiny width a decode step is made of small launches, so generation measures what the op
boundary and the routing / expert launches cost per token; ``--width 16`` (hidden 512) is a
mid-size model where the expert GEMMs count. Providers are timed interleaved (one call of each per
round), so a load change on the host hits all of them alike; ``spread`` is the min-max of the
per-round ratios. ``same_tokens`` is the fraction of generated tokens equal to the baseline's (1
in float32); ``loss_diff`` the relative difference of the training loss.

    python -m benchmarks.bench_hf_generate --quick
    python -m benchmarks.bench_hf_generate --width 16 --batch 2 --new-tokens 32 --train \
        --baselines hf_eager hf_grouped_mm
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device
from moe_kernels.integrations.transformers import SUPPORTED_MODEL_TYPES
from moe_kernels.testing import tiny_hf_config

OP_NAME = "hf_generate"
TABLE_COLUMNS = (
    "family",
    "hidden",
    "task",
    "batch",
    "provider",
    "tokens_per_s",
    "median_us",
    "speedup_vs_hf",
    "spread",
    "same_tokens",
    "loss_diff",
)
PROMPT_TOKENS = 16
TRAIN_TOKENS = 64
REPEATS = 3
BASELINES = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm"}


def build_model(family: str, width: int, device: torch.device, dtype: torch.dtype, max_tokens: int):
    """A tiny ``family`` causal LM on ``device`` in ``dtype``, eval mode, seeded weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_hf_config(family, width=width, overrides={"max_position_embeddings": max(64, max_tokens)})
    return AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _train_step(model, ids: torch.Tensor) -> float:
    """One forward with labels and its backward; returns the loss (the gradients are dropped)."""
    loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def _configure(model, provider: str) -> None:
    """Put ``model`` in ``provider``'s state: patched (``moe_kernels``) or HF with an experts
    implementation."""
    from moe_kernels.integrations.transformers import apply_moe_kernels, revert_moe_kernels

    revert_moe_kernels(model)
    if provider == "moe_kernels":
        apply_moe_kernels(model)
    else:
        model.set_experts_implementation(BASELINES[provider])


def interleaved_seconds(
    model, providers: Sequence[str], call: Callable[[], object], device, repeats: int = REPEATS
) -> dict:
    """provider -> (per-round seconds, last output): one warm-up, then ``repeats`` rounds, each
    timing one call per provider."""
    outputs, times = {}, {p: [] for p in providers}
    for provider in providers:
        _configure(model, provider)
        outputs[provider] = call()
    for _ in range(repeats):
        for provider in providers:
            _configure(model, provider)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            outputs[provider] = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[provider].append(time.perf_counter() - start)
    _configure(model, "hf_grouped_mm")  # transformers' default again, unpatched
    return {p: (times[p], outputs[p]) for p in providers}


def run(
    *,
    quick: bool = False,
    device=None,
    families: Sequence[str] | None = None,
    width: int | None = None,
    batches: Sequence[int] | None = None,
    new_tokens: int | None = None,
    train: bool = False,
    baselines: Sequence[str] = ("hf_eager",),
    repeats: int = REPEATS,
) -> list[dict]:
    """Rows of every (family, batch, task): the baselines, then the patched model."""
    device = resolve_device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    width = width or (1 if quick else 8)
    batches = batches or ((2,) if quick else (1, 16))
    new_tokens = new_tokens or (8 if quick else 64)
    providers = (*baselines, "moe_kernels")
    rows = []
    for family in families or SUPPORTED_MODEL_TYPES:
        model = build_model(family, width, device, dtype, max(PROMPT_TOKENS + new_tokens, TRAIN_TOKENS))
        vocab = model.config.vocab_size
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=generator).to(device)
            tasks = {"generate": lambda model=model, prompt=prompt: _generate(model, prompt, new_tokens)}
            if train:
                ids = torch.randint(0, vocab, (batch, TRAIN_TOKENS), generator=generator).to(device)
                tasks["train"] = lambda model=model, ids=ids: _train_step(model.train(), ids)
            for task, call in tasks.items():
                measured = interleaved_seconds(model, providers, call, device, repeats)
                model.eval()
                rows += _rows(family, width, model.config.hidden_size, batch, task, new_tokens, dtype, measured)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _rows(family, width, hidden, batch, task, new_tokens, dtype, measured) -> list[dict]:
    reference_provider = next(iter(measured))
    reference_times, reference_out = measured[reference_provider]
    ours_times, ours_out = measured["moe_kernels"]
    rows = []
    for provider, (times, out) in measured.items():
        seconds = statistics.median(times)
        ours = provider == "moe_kernels"
        ratios = [r / o for r, o in zip(reference_times, ours_times)]
        row = {
            "op": OP_NAME,
            "family": family,
            "width": width,
            "hidden": hidden,
            "task": task,
            "batch": batch,
            "T": batch,
            "new_tokens": new_tokens if task == "generate" else None,
            "provider": provider,
            "dtype": str(dtype).removeprefix("torch."),
            "median_us": seconds * 1e6,
            "tokens_per_s": batch * (new_tokens if task == "generate" else TRAIN_TOKENS) / seconds,
            "timer": "wall",
            "speedup_vs_hf": statistics.median(reference_times) / seconds if ours else None,
            "spread": f"{min(ratios):.2f}-{max(ratios):.2f}" if ours else None,
            "panel": f"{family} hidden={hidden} {task}",
        }
        if task == "generate":
            same = (out[:, PROMPT_TOKENS:] == reference_out[:, PROMPT_TOKENS:]).float().mean().item()
            row["same_tokens"] = same if ours else None
        else:
            row["loss_diff"] = abs(out - reference_out) / max(abs(reference_out), 1e-30) if ours else None
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_hf_generate", __doc__, "width 1, batch 2, 8 new tokens")
    parser.add_argument("--family", action="append", dest="families", choices=SUPPORTED_MODEL_TYPES)
    parser.add_argument("--width", type=int, help="multiplies the tiny config's hidden and intermediate sizes")
    parser.add_argument("--batch", type=int, nargs="+", dest="batches")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--train", action="store_true", help="also time one training step (forward + backward)")
    parser.add_argument("--baselines", nargs="+", choices=tuple(BASELINES), default=["hf_eager"])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved rounds per measurement")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
