"""The demo's language-model stage: the character-level MoE LMs the seeds pretrained on standard
library source code with rare English prose (router z-loss, the package's fused ops), their loss
curves and held-out losses; seed ``base``'s model is loaded for the later stages."""

from __future__ import annotations

import torch

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.model import CharMoELM
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.demo.seed_run import MODEL_KIND, MODEL_VERSION
from moe_kernels.figures import new_figure, save_png
from moe_kernels.files import read_tensors


def language_model_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("language_model", "Small MoE language models pretrained on Python's own source code")
    runs, protocol = ctx.require_runs()
    size = protocol.size
    tensors, _ = read_tensors(ctx.results["model_path"], kind=MODEL_KIND, version=MODEL_VERSION, op="demo")
    model = CharMoELM(size, device=ctx.device)
    model.load_state_dict(tensors)
    model.eval()
    ctx.model = model
    rows = [
        {
            "seed": run["seed"],
            "final_train_loss": run["pretraining"]["curve"][-1],
            "held_out_code": run["arms"]["zero_shot"]["loss_code"],
            "held_out_prose": run["arms"]["zero_shot"]["loss_prose"],
            "positive_logits": run["arms"]["zero_shot"]["positive_logits"],
        }
        for run in runs
    ]
    stage.numbers = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": dict(size.__dict__),
        "corpus_chars": ctx.corpus.sizes(),
        "seeds": rows,
    }
    stage.tables.append(markdown_table(rows, list(rows[0])))
    fig, ax = new_figure(6.4, 3.6)
    for run in runs:
        curve = run["pretraining"]["curve"]
        steps = torch.linspace(size.train_steps / len(curve), size.train_steps, len(curve))
        ax.plot(steps, curve, lw=1.0, label=f"seed {run['seed']}")
    ax.set(xlabel="step", ylabel="training loss (nats per character)", title="Character MoE LM, one curve per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    stage.plots.append(str(save_png(fig, ctx.out / "lm_loss.png").relative_to(ctx.out)))
    stage.notes += [
        f"{stage.numbers['parameters']:,} parameters: context {size.context} characters, {size.layers} MoE layers of "
        f"{size.experts} experts (top-{size.k}, softmax weights not renormalised), hidden {size.hidden}, expert "
        f"width {size.intermediate}; {size.train_steps} Adam steps (lr {size.lr}) of {size.batch} windows, "
        f"{protocol.pretrain_prose_share:.0%} of them English prose, router z-loss {protocol.z_loss:g}",
        "held-out loss in nats per character on every held-out position; positive_logits: router logits above 0 per "
        "token (the level ProbMoE's dynamic-k band reads)",
    ]
    return stage
