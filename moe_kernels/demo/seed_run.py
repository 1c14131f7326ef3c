"""One seed's whole run of the pre-registered protocol (:mod:`moe_kernels.demo.protocol`), run by
the demo in its own process (``python -m moe_kernels.demo.seed_run --mode M --seed S --out F``),
one thread, so that seeds run in parallel and each is deterministic.

The seed fixes the pretraining (initialisation and batches), the fixed fine-tuning set, every
arm's data order and sampling stream, the calibration draws and the placebo shuffles. Steps:
pretrain on code with rare prose (router z-loss); measure zero-shot; fine-tune every arm
(:mod:`moe_kernels.demo.arms`); kNN-MoE (:mod:`moe_kernels.demo.knn_arm`); Counterfactual Routing
with placebos (:mod:`moe_kernels.demo.cor_arm`); the digits collapse threshold. Every loss is
measured on every held-out position; a paired change's standard error comes from a circular
block bootstrap over positions.

The result is a JSON document (:data:`RESULT_KIND`) of plain numbers; ``timings`` holds the only
numbers that differ run to run.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch

from moe_kernels.balance import router_z_loss
from moe_kernels.config import RoutingConfig
from moe_kernels.demo.arms import ARMS, evaluate, finetune_arm
from moe_kernels.demo.cor_arm import cor_arm
from moe_kernels.demo.data import all_batches, even_batches, load_corpus, mixed_batches, random_batches
from moe_kernels.demo.knn_arm import knn_arm
from moe_kernels.demo.model import CharMoELM, batch_loss, train
from moe_kernels.demo.protocol import PROTOCOLS, Protocol
from moe_kernels.demo.verdict import block_bootstrap_se
from moe_kernels.dynamics.digits import sweep_digits
from moe_kernels.files import write_json, write_tensors

RESULT_KIND, RESULT_VERSION = "moe_kernels.demo.seed", 1
MODEL_KIND, MODEL_VERSION = "moe_kernels.demo.model", 1
EVAL_BATCH = 1024
CURVE_POINTS = 150  # the pretraining loss curve kept: means over this many equal spans


def pretrain(protocol: Protocol, corpus, seed: int, device) -> tuple[CharMoELM, dict, float]:
    """The seed's pretrained LM (code with rare prose, router z-loss), its loss curve and seconds."""
    size = protocol.size
    torch.manual_seed(seed)
    model = CharMoELM(size, routing=RoutingConfig(), device=device)
    for block in model.blocks:
        block.keep_router_logits = True
    batches = mixed_batches(
        corpus.code_train,
        corpus.prose_pretrain,
        protocol.pretrain_prose_share,
        size.context,
        size.batch,
        size.train_steps,
        seed * 1000 + 1,
    )
    batches = [tuple(t.to(device) for t in batch) for batch in batches]

    def loss_fn(model, batch):
        loss = batch_loss(model, batch)
        return loss + protocol.z_loss * sum(router_z_loss(block.last_router_logits) for block in model.blocks)

    training = train(model, batches, lr=size.lr, loss_fn=loss_fn, progress=False)
    for block in model.blocks:
        block.keep_router_logits = False
        block.last_router_logits = None
    spans = torch.tensor(training.losses).tensor_split(min(CURVE_POINTS, len(training.losses)))
    return model, {"curve": [float(span.mean()) for span in spans]}, training.seconds


def _paired(a: torch.Tensor, b: torch.Tensor, protocol: Protocol, seed: int) -> dict:
    """Mean of ``a - b`` over positions and its block-bootstrap standard error."""
    change = a - b
    se = block_bootstrap_se(change, protocol.block, resamples=protocol.bootstrap_resamples, seed=seed)
    return {"mean": float(change.mean()), "se": se}


def run_seed(protocol: Protocol, seed: int, *, device: str = "cpu", model_path=None) -> dict:
    """Every number of the seed's run (see the module doc); ``model_path``: also save the
    pretrained LM there (safetensors, checksummed)."""
    device = torch.device(device)
    corpus = load_corpus(protocol.corpus_chars)
    size = protocol.size
    timings = {}

    def on_device(batches):
        return [tuple(t.to(device) for t in batch) for batch in batches]

    model, pretraining, timings["pretrain"] = pretrain(protocol, corpus, seed, device)
    if model_path is not None:
        write_tensors(
            model_path,
            model.state_dict(),
            {"seed": seed, "mode": protocol.mode},
            kind=MODEL_KIND,
            version=MODEL_VERSION,
        )
    held_out = {
        "prose": on_device(all_batches(corpus.prose_held_out, size.context, EVAL_BATCH)),
        "code": on_device(all_batches(corpus.code_held_out, size.context, EVAL_BATCH)),
    }
    calibration = on_device(
        even_batches(corpus.prose_calibration, size.context, EVAL_BATCH, protocol.calibration_windows)
    )
    data = on_device(
        random_batches(corpus.prose_reference, size.context, size.batch, protocol.reference_batches, seed * 1000 + 3)
    )

    per_token, arms = {}, {}
    per_token["zero_shot"], arms["zero_shot"] = evaluate(model, held_out)
    arms["zero_shot"]["choice"] = {}
    for arm in ARMS:
        tuned, choice = finetune_arm(model, arm, data, calibration, protocol, seed)
        timings[arm] = choice.pop("seconds")
        per_token[arm], arms[arm] = evaluate(tuned, held_out)
        arms[arm]["choice"] = choice
    knn_model, choice = knn_arm(model, data, calibration, protocol)
    timings["knn_build"] = choice.pop("seconds")
    per_token["knn"], arms["knn"] = evaluate(knn_model, held_out)
    arms["knn"]["choice"] = choice
    paired = {
        f"{a}-{b}:{domain}": _paired(per_token[a][domain], per_token[b][domain], protocol, seed)
        for a, b, domains in (
            ("knn", "zero_shot", ("prose", "code")),
            ("router_ft", "zero_shot", ("prose",)),
            ("full_ft", "zero_shot", ("prose",)),
            ("exact_k", "full_ft", ("prose",)),
            ("dynamic_k", "exact_k", ("prose",)),
        )
        for domain in domains
    }
    start = time.perf_counter()
    cor_numbers = cor_arm(
        model, corpus.prose_calibration, held_out["prose"], per_token["zero_shot"]["prose"], protocol, seed
    )
    timings["cor"] = time.perf_counter() - start
    start = time.perf_counter()
    digits = [_digits(protocol, experts, seed) for experts in protocol.digits_experts]
    timings["digits"] = time.perf_counter() - start
    return {
        "seed": seed,
        "mode": protocol.mode,
        "pretraining": pretraining,
        "arms": arms,
        "paired": paired,
        "cor": cor_numbers,
        "digits": digits,
        "positions": {domain: int(values.numel()) for domain, values in per_token["zero_shot"].items()},
        "timings": timings,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _digits(protocol: Protocol, experts: int, seed: int) -> dict:
    sweep = sweep_digits(
        experts,
        protocol.digits_feedbacks,
        relative=True,
        pretrain_epochs=protocol.digits_pretrain_epochs,
        epochs=protocol.digits_epochs,
        grid_points=0,
        seed=seed,
        threads=None,
    )
    return {
        "experts": experts,
        "predicted": _finite(sweep.predicted),
        "measured": _finite(sweep.measured),
        "with_bias": _finite(sweep.balanced),
        "largest_feedback": max(row["feedback"] for row in sweep.rows),
        "rows": sweep.rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.demo.seed_run", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(PROTOCOLS), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True, help="the result's JSON file")
    parser.add_argument("--model", help="also save the pretrained LM here (safetensors)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run_seed(PROTOCOLS[args.mode], args.seed, device=args.device, model_path=args.model)
    write_json(args.out, result, kind=RESULT_KIND, version=RESULT_VERSION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
