"""The digits experiment: a small MoE classifier on scikit-learn's bundled 8x8 digits (no download)
whose router carries adaptive scores (:class:`AdaptiveScoreRouter`), swept over the feedback
strength ``K``. Below a threshold set by the router's logit spread the load stays balanced; above
it, it collapses onto one expert; an :class:`moe_kernels.balance.AuxLossFreeBias` holds it
balanced past the threshold.

Protocol of :func:`sweep_digits`:

1. Pretrain the classifier (gate, experts, head) with ``K = 0``: the gate learns its logit spread.
2. Predict from the pretrained gate's logits ``L (N, E)`` on the data, without training:
   - ``critical``: the ``K`` at which balanced routing loses stability, ``1 / lambda``, with
     ``lambda`` the largest zero-sum eigenvalue of the load Jacobian ``J = d load / d logit bias``
     of hard top-1 routing, estimated by smoothing the top-1 with a softmax of temperature
     ``tau`` (a logistic kernel density estimate of the logit gaps): ``J = mean_t (diag p_t -
     p_t p_t^T) / tau``;
   - the mean-field load curve: the fixed point of ``s <- (1 - a) s + a load(K s)`` on all ``N``
     examples, from uniform scores, for each swept ``K``.
3. For each ``K``: copy the pretrained model, set the router's feedback to ``K`` (optionally add
   an :class:`AuxLossFreeBias`), train ``epochs`` more (the gate frozen with ``train_gate=False``,
   so the theory's load map stays exact; trained too with ``train_gate=True``), and measure the
   eval-mode load of the whole data set.

The threshold of a load curve is where its normalised imbalance ``(max load - 1/E) / (1 - 1/E)``
first reaches 0.5 (linear interpolation between swept ``K``); it is computed the same way for the
predicted (mean-field) and the measured curve.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch
from torch import nn

from moe_kernels.balance import AuxLossFreeBias, load_stats
from moe_kernels.dynamics.router import AdaptiveScoreRouter
from moe_kernels.nn import MoE

IMBALANCE_LEVEL = 0.5
BATCH_SIZE = 64
# Kernel width of the smoothed top-1 (in logit units, relative to the gaps' spread below).
_TAU_FRACTION = 0.1


def load_digits_tensors(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (1797, 64) float32, labels (1797,) int64)``: scikit-learn's bundled digits,
    each feature standardised over the set (constant pixels stay 0)."""
    from sklearn.datasets import load_digits  # optional dependency: imported when needed

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    return x.to(device), torch.tensor(labels, dtype=torch.int64, device=device)


class DigitsMoE(nn.Module):
    """``features (T, 64) -> class logits (T, 10)``: one :class:`moe_kernels.MoE` layer (top-1,
    gated experts of width ``intermediate``) routed by an :class:`AdaptiveScoreRouter`, ReLU, and
    a linear head."""

    def __init__(self, num_experts: int, *, intermediate: int = 32, eps: float = 0.05, device=None):
        super().__init__()
        router = AdaptiveScoreRouter(64, num_experts, 1, feedback=0.0, eps=eps, device=device)
        self.moe = MoE(64, intermediate, num_experts, 1, router=router, device=device)
        self.head = nn.Linear(64, 10, device=device)

    @property
    def router(self) -> AdaptiveScoreRouter:
        return self.moe.router

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.moe(features)))


def train(
    model: DigitsMoE,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    *,
    lr: float = 3e-3,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    train_gate: bool = True,
) -> None:
    """Adam on cross-entropy for ``epochs`` passes over shuffled full batches (the router's
    scores adapt once per batch)."""
    params = [p for name, p in model.named_parameters() if train_gate or name != "moe.router.weight"]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def linear_threshold(gate_logits: torch.Tensor, tau: float | None = None) -> float:
    """Predicted ``K`` where balanced top-1 routing of ``gate_logits (N, E)`` loses stability:
    ``1 / lambda_max`` of the smoothed load Jacobian on zero-sum bias vectors (module doc).
    ``tau`` defaults to a tenth of the standard deviation of the logits' pairwise gaps."""
    logits = gate_logits.double()
    num_experts = logits.shape[1]
    if tau is None:
        gaps = logits.unsqueeze(-1) - logits.unsqueeze(-2)
        tau = _TAU_FRACTION * float(gaps.std())
    p = torch.softmax(logits / tau, dim=-1)
    jacobian = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)).mean(0) / tau
    center = torch.eye(num_experts, dtype=torch.float64) - 1 / num_experts
    rate = float(torch.linalg.eigvals(center @ jacobian.cpu() @ center).real.max())
    return 1 / rate


def mean_field_load(
    gate_logits: torch.Tensor,
    feedbacks: torch.Tensor,
    *,
    start: str = "uniform",
    iterations: int = 1000,
    step: float = 0.05,
    window: int | None = None,
) -> torch.Tensor:
    """``(P, E)`` stationary top-1 loads of ``gate_logits (N, E)`` under the deterministic
    mean-field rule ``s <- (1 - step) s + step load(K s)``, one row per ``K`` in ``feedbacks
    (P,)``, from uniform scores (``start="uniform"``) or from all the score on the expert the
    gate alone loads most (``start="collapsed"``, which finds the collapsed branch down to its
    fold). Averaged over the last ``window`` iterations (default a quarter of them): on a finite
    set the map is piecewise constant and the scores jitter by ``~step`` around a discontinuity.
    With ``iterations`` and ``step`` equal to a training run's score updates and ``eps``, it
    predicts the load that run reaches, slow relaxation near the threshold included."""
    num_points, num_experts = feedbacks.shape[0], gate_logits.shape[1]
    logits = gate_logits.float().unsqueeze(0)
    gains = feedbacks.float().to(logits.device).view(-1, 1, 1)
    experts = torch.arange(num_experts, device=logits.device)
    if start == "uniform":
        scores = torch.full((num_points, 1, num_experts), 1 / num_experts, device=logits.device)
    elif start == "collapsed":
        favourite = logits[0].argmax(dim=-1).bincount(minlength=num_experts).argmax()
        scores = (experts == favourite).float().expand(num_points, 1, num_experts).clone()
    else:
        raise ValueError(f"mean_field_load: start must be 'uniform' or 'collapsed', got {start!r}")
    average = torch.zeros(num_points, num_experts, device=logits.device)
    keep_from = iterations - (max(1, iterations // 4) if window is None else min(max(1, window), iterations))
    for index in range(iterations):
        chosen = (logits + gains * scores).argmax(dim=-1, keepdim=True)
        load = (chosen == experts).float().mean(dim=1)
        scores.lerp_(load.unsqueeze(1), step)
        if index >= keep_from:
            average += load
    return average / (iterations - keep_from)


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """Normalised imbalance ``(max load - 1/E) / (1 - 1/E)`` of ``load (..., E)``: 0 balanced,
    1 collapsed onto one expert."""
    num_experts = load.shape[-1]
    return (load.amax(dim=-1) - 1 / num_experts) / (1 - 1 / num_experts)


def crossing(feedbacks, values, level: float = IMBALANCE_LEVEL) -> float:
    """The first ``K`` at which ``values`` (one per sorted ``feedbacks``) reaches ``level``,
    linearly interpolated; ``inf`` when it never does."""
    points = list(zip(feedbacks, values))
    for (k0, v0), (k1, v1) in zip(points[:-1], points[1:]):
        if v0 < level <= v1:
            return k0 + (level - v0) * (k1 - k0) / (v1 - v0)
    return float(points[0][0]) if points and points[0][1] >= level else math.inf


@dataclasses.dataclass(frozen=True)
class DigitsSweep:
    """The result of :func:`sweep_digits`.

    ``rows``: one dict per swept ``K`` with ``feedback``, ``predicted_imbalance`` (the
    mean-field rule on the gate's logits for as many score updates as a run makes),
    ``imbalance`` and ``max_over_mean`` (measured: eval-mode load of the whole set),
    ``accuracy`` (eval, whole set), and ``balanced_imbalance`` / ``balanced_accuracy`` with the
    :class:`AuxLossFreeBias` (None when ``balance_rate`` is None).

    Thresholds, each a ``K`` (``inf`` when the curve never reaches the level, ``nan`` when not
    computed): ``critical`` (linear instability of balanced routing), ``stationary`` / ``fold``
    (the long-run mean-field curve from uniform / collapsed scores, on ``grid_points`` values of
    ``K`` up to the largest swept), ``predicted`` (``predicted_imbalance`` over the swept ``K``),
    ``measured`` and ``balanced`` (the runs without / with the bias, over the same ``K``).
    """

    num_experts: int
    train_gate: bool
    updates: int
    critical: float
    stationary: float
    fold: float
    predicted: float
    measured: float
    balanced: float
    rows: list


def _finetune(base: DigitsMoE, x, y, feedback: float, balance_rate, epochs, seed, train_gate):
    model = copy.deepcopy(base)
    model.router.feedback = float(feedback)
    if balance_rate is not None:
        model.router.balancer = AuxLossFreeBias(model.router.num_experts, balance_rate, device=x.device)
    train(model, x, y, epochs, seed=seed + 1, train_gate=train_gate)
    model.eval()
    with torch.no_grad():
        _, ids = model.router(x)
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    stats = load_stats(ids, model.router.num_experts)
    return float(imbalance(stats.fraction)), float(stats.max_over_mean), accuracy


def sweep_digits(
    num_experts: int = 2,
    feedbacks=None,
    *,
    relative: bool = False,
    pretrain_epochs: int = 10,
    epochs: int = 5,
    eps: float = 0.05,
    balance_rate: float | None = 0.05,
    train_gate: bool = False,
    grid_points: int = 61,
    seed: int = 0,
    threads: int | None = 1,
    device="cpu",
) -> DigitsSweep:
    """Run the digits experiment (module doc) for ``num_experts`` experts.

    Args:
        feedbacks: the swept ``K`` values, increasing; default 16 points from 0 to 2.5x the
            predicted ``critical``.
        relative: ``feedbacks`` are multiples of the predicted ``critical`` (known only after
            pretraining).
        pretrain_epochs, epochs: training passes with ``K = 0``, then per swept ``K``
            (``BATCHES_PER_EPOCH`` score updates each).
        eps: the router's score step per batch (64 examples).
        balance_rate: the :class:`AuxLossFreeBias` rate of the balanced runs (one per swept
            ``K``); None skips them.
        train_gate: keep training the gate after pretraining (else only experts and head, and
            the predicted load map stays exact).
        grid_points: ``K`` values of the long-run mean-field curves (``stationary``, ``fold``);
            0 skips them.
        seed: seeds the model's initialisation and the batch order.
        threads: torch's intra-op CPU threads during the sweep (restored after); None keeps the
            current setting. The model is tiny (batches of 64 x 64 features): extra threads only
            add fork/join overhead, and on a shared, busy machine each parallel region can wait
            milliseconds for a core (the sweep ran 10x slower with 2 threads there).

    One run takes about 0.4 s for two experts and 5 epochs on one CPU core.
    """
    with _cpu_threads(threads if torch.device(device).type == "cpu" else None):
        return _sweep(
            num_experts,
            feedbacks,
            relative,
            pretrain_epochs,
            epochs,
            eps,
            balance_rate,
            train_gate,
            grid_points,
            seed,
            device,
        )


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """torch's intra-op CPU threads set to ``threads`` within the block (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sweep(
    num_experts, feedbacks, relative, pretrain_epochs, epochs, eps, balance_rate, train_gate, grid_points, seed, device
) -> DigitsSweep:
    """:func:`sweep_digits`' body, under its thread setting."""
    x, y = load_digits_tensors(device)
    torch.manual_seed(seed)
    base = DigitsMoE(num_experts, eps=eps, device=device)
    train(base, x, y, pretrain_epochs, seed=seed)
    with torch.no_grad():
        gate_logits = nn.functional.linear(x, base.router.weight)
    critical = linear_threshold(gate_logits)
    if feedbacks is None:
        feedbacks, relative = torch.linspace(0, 2.5, 16).tolist(), True
    feedbacks = [float(k) * (critical if relative else 1.0) for k in feedbacks]
    updates = epochs * (len(x) // BATCH_SIZE)
    # The run's own number of score updates; averaged over its last tenth, as the jitter of a
    # finite set's map would otherwise decide a point near the threshold.
    predicted_curve = imbalance(
        mean_field_load(gate_logits, torch.tensor(feedbacks), iterations=updates, step=eps, window=updates // 10)
    ).tolist()
    stationary = fold = math.nan
    if grid_points:
        grid = torch.linspace(0, max(feedbacks), grid_points)
        stationary = crossing(grid.tolist(), imbalance(mean_field_load(gate_logits, grid)).tolist())
        fold = crossing(grid.tolist(), imbalance(mean_field_load(gate_logits, grid, start="collapsed")).tolist())
    rows = []
    for k, predicted in zip(feedbacks, predicted_curve):
        value, max_over_mean, accuracy = _finetune(base, x, y, k, None, epochs, seed, train_gate)
        row = dict(
            feedback=k,
            predicted_imbalance=predicted,
            imbalance=value,
            max_over_mean=max_over_mean,
            accuracy=accuracy,
            balanced_imbalance=None,
            balanced_accuracy=None,
        )
        if balance_rate is not None:
            row["balanced_imbalance"], _, row["balanced_accuracy"] = _finetune(
                base, x, y, k, balance_rate, epochs, seed, train_gate
            )
        rows.append(row)
    balanced = math.inf if balance_rate is None else crossing(feedbacks, [r["balanced_imbalance"] for r in rows])
    return DigitsSweep(
        num_experts=num_experts,
        train_gate=train_gate,
        updates=updates,
        critical=critical,
        stationary=stationary,
        fold=fold,
        predicted=crossing(feedbacks, predicted_curve),
        measured=crossing(feedbacks, [r["imbalance"] for r in rows]),
        balanced=balanced,
        rows=rows,
    )


def _cell(value: float) -> str:
    return "never" if math.isinf(value) else "-" if math.isnan(value) else f"{value:.2f}"


def threshold_table(sweeps) -> str:
    """A markdown table of predicted and measured thresholds, one line per :class:`DigitsSweep`
    (columns as :class:`DigitsSweep` names them)."""
    lines = [
        "| experts | gate after pretraining | K_c (linear) | stationary (mean-field) | collapsed branch "
        "down to (fold) | predicted for the run | measured | measured with AuxLossFreeBias | K swept up to |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sweep in sweeps:
        top = max(r["feedback"] for r in sweep.rows)
        cells = (sweep.critical, sweep.stationary, sweep.fold, sweep.predicted, sweep.measured, sweep.balanced)
        lines.append(
            f"| {sweep.num_experts} | {'trained' if sweep.train_gate else 'frozen'} | "
            + " | ".join(_cell(c) for c in cells)
            + f" | {top:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """``python -m moe_kernels.dynamics.digits``: the README's sweeps (2 and 4 experts, gate
    frozen and trained after pretraining, 16 values of K each; about 2 minutes on one core) and
    their threshold table."""
    sweeps = []
    for num_experts in (2, 4):
        for train_gate in (False, True):
            sweep = sweep_digits(num_experts, train_gate=train_gate)
            sweeps.append(sweep)
            print(f"E = {num_experts}, gate {'trained' if train_gate else 'frozen'} ({sweep.updates} score updates):")
            for row in sweep.rows:
                print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print()
    print(threshold_table(sweeps))


if __name__ == "__main__":
    main()
