"""Whole-model greedy generation with tiny HF MoE models (random weights, built from
:func:`moe_kernels.testing.tiny_hf_config`, no download), patched by
:func:`moe_kernels.integrations.transformers.apply_moe_kernels` against the same model unpatched.

At these sizes a decode step is made of small launches, so the table measures what the op
boundary and the routing/expert launches cost per generated token, not GEMM throughput (that is
``bench_hf``'s job). ``same_tokens`` is the fraction of generated tokens equal to HF's: 1 in
float32; in bf16 an exactly tied router score may pick another expert, after which the
sequences diverge.

    python -m benchmarks.bench_hf_generate --quick
    python -m benchmarks.bench_hf_generate --width 8 --batch 1 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks.common import resolve_device, run_and_report
from moe_kernels.testing import TINY_HF_FAMILIES, tiny_hf_config

OP_NAME = "hf_generate"
TABLE_COLUMNS = (
    "family",
    "width",
    "batch",
    "new_tokens",
    "provider",
    "tokens_per_s",
    "median_us",
    "speedup_vs_hf",
    "same_tokens",
)
PROMPT_TOKENS = 16
REPEATS = 3


def build_model(family: str, width: int, device: torch.device, dtype: torch.dtype, max_tokens: int):
    """A tiny ``family`` causal LM on ``device`` in ``dtype``, eval mode, seeded weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_hf_config(family, width=width, max_position_embeddings=max(64, max_tokens))
    return AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _seconds(model, prompt, new_tokens, device) -> tuple[float, torch.Tensor]:
    """Median wall time of ``REPEATS`` generations after one warm-up, and the tokens."""
    out = _generate(model, prompt, new_tokens)
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = _generate(model, prompt, new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(
    *,
    quick: bool = False,
    device=None,
    families: Sequence[str] | None = None,
    width: int | None = None,
    batches: Sequence[int] | None = None,
    new_tokens: int | None = None,
) -> list[dict]:
    """Rows of every (family, batch): HF eager, then the patched model."""
    from moe_kernels.integrations.transformers import apply_moe_kernels, revert_moe_kernels

    device = resolve_device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    width = width or (1 if quick else 8)
    batches = batches or ((2,) if quick else (1, 16))
    new_tokens = new_tokens or (8 if quick else 64)
    rows = []
    for family in families or TINY_HF_FAMILIES:
        model = build_model(family, width, device, dtype, PROMPT_TOKENS + new_tokens)
        vocab = model.config.vocab_size
        for batch in batches:
            prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
            prompt = prompt.to(device)
            hf_s, hf_tokens = _seconds(model, prompt, new_tokens, device)
            apply_moe_kernels(model)
            ours_s, our_tokens = _seconds(model, prompt, new_tokens, device)
            revert_moe_kernels(model)
            same = (our_tokens[:, PROMPT_TOKENS:] == hf_tokens[:, PROMPT_TOKENS:]).float().mean().item()
            for provider, seconds in (("hf_eager", hf_s), ("moe_kernels", ours_s)):
                rows.append(
                    {
                        "op": OP_NAME,
                        "family": family,
                        "width": width,
                        "hidden": model.config.hidden_size,
                        "batch": batch,
                        "T": batch,
                        "new_tokens": new_tokens,
                        "provider": provider,
                        "dtype": str(dtype).removeprefix("torch."),
                        "median_us": seconds * 1e6,
                        "tokens_per_s": batch * new_tokens / seconds,
                        "timer": "wall",
                        "speedup_vs_hf": hf_s / seconds if provider == "moe_kernels" else None,
                        "same_tokens": same if provider == "moe_kernels" else None,
                    }
                )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_hf_generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="width 1, batch 2, 8 new tokens")
    parser.add_argument("--family", action="append", dest="families", choices=TINY_HF_FAMILIES)
    parser.add_argument("--width", type=int, help="multiplies the tiny config's hidden and intermediate sizes")
    parser.add_argument("--batch", type=int, nargs="+", dest="batches")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    return run_and_report(
        OP_NAME,
        device,
        lambda: run(
            quick=args.quick,
            device=device,
            families=args.families,
            width=args.width,
            batches=args.batches,
            new_tokens=args.new_tokens,
        ),
        TABLE_COLUMNS,
        write=not args.no_write,
    )


if __name__ == "__main__":
    raise SystemExit(main())
