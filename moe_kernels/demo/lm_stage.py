"""The demo's language-model stage: train the character-level MoE LM on standard-library source
code with the package's fused ops, and measure it on held-out text of both domains."""

from __future__ import annotations

import torch

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.model import CharMoELM, mean_loss, plot_loss_curve, train
from moe_kernels.demo.report import StageResult


def language_model_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("language_model", "A small MoE language model trained on Python's own source code")
    size = ctx.size
    torch.manual_seed(ctx.seed)
    model = CharMoELM(size, device=ctx.device)
    corpus = ctx.corpus
    batches = ctx.train_batches(corpus.code_train, size.train_steps, seed_offset=1)
    training = train(model, batches, lr=size.lr, description="train LM")
    ctx.model = model
    held_out = {"code": ctx.eval_batches(corpus.code_held_out), "prose": ctx.eval_batches(corpus.prose_held_out)}
    losses = {domain: mean_loss(model, batches) for domain, batches in held_out.items()}
    stage.numbers = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": dict(size.__dict__),
        "corpus_chars": corpus.sizes(),
        "final_train_loss": sum(training.losses[-20:]) / min(20, len(training.losses)),
        "held_out_loss": losses,
    }
    stage.timings = {"train_seconds": training.seconds, "steps_per_second": training.steps / training.seconds}
    ctx.results["held_out_loss"] = losses
    stage.plots.append(
        str(
            plot_loss_curve(training, ctx.out / "lm_loss.png", "Character MoE LM on stdlib source").relative_to(ctx.out)
        )
    )
    stage.notes += [
        f"{stage.numbers['parameters']:,} parameters: context {size.context} characters, {size.layers} MoE layers of "
        f"{size.experts} experts (top-{size.k}, renormalised), hidden {size.hidden}, expert width {size.intermediate}",
        f"trained {training.steps} steps of {size.batch} windows in {training.seconds:.1f} s "
        f"({training.steps / training.seconds:.1f} steps/s, {ctx.thread_count} thread(s)) with Adam lr {size.lr}",
        f"held-out loss (nats per character): source code {losses['code']:.3f}, English prose {losses['prose']:.3f} "
        "(the domain it will be moved to)",
    ]
    return stage
