"""Batched Monte-Carlo of the adaptive-score routing rule: ``P`` parameter points x ``R`` replicas,
every chain advanced by the same few tensor ops per step (no Python loop over chains)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from moe_kernels.balance import check_num_experts
from moe_kernels.dynamics.theory import MIN_EXPERTS, SELECTIONS

# Random numbers are drawn this many at a time (E per chain and step): large draws are cheaper per
# number, and the chunk size depends only on the problem, so a seed fixes the result.
_RANDOM_CHUNK_NUMBERS = 1 << 21


@dataclasses.dataclass(frozen=True)
class Simulation:
    """The result of :func:`simulate`; every tensor on the inputs' device.

    Attributes:
        load: ``(P, R, E)`` float32, each chain's selection fractions over the last half of the
            steps (``steps - steps // 2`` selections), summing to 1 over ``E``.
        scores: ``(P, R, E)`` float32, each chain's final scores ``s``.
        feedback: ``(P,)`` float32, the ``K`` of each parameter point.
        bias: ``(P, E)`` float32, the logit bias ``b`` of each parameter point.
        trajectory: ``(steps // record_every, P, R, E)`` float32 scores after steps
            ``record_every, 2 * record_every, ...``; None unless ``record_every`` was given.
        eps, steps, selection, noise: the run's settings.
    """

    load: torch.Tensor
    scores: torch.Tensor
    feedback: torch.Tensor
    bias: torch.Tensor
    trajectory: torch.Tensor | None
    eps: float
    steps: int
    selection: str
    noise: float

    @property
    def winner_load(self) -> torch.Tensor:
        """``(P, R)`` float32: each chain's largest expert load."""
        return self.load.amax(dim=-1)


def _as_points(name: str, argument: str, value, device, dims: int) -> torch.Tensor:
    """``value`` (a number or a tensor with at most ``dims`` dims) as a float32 tensor, checked
    finite. The check is one host sync per call, at the entry, never per step."""
    if isinstance(value, torch.Tensor):
        if value.dim() > dims or value.is_complex():
            raise ValueError(
                f"{name}: {argument} must be a real tensor with at most {dims} dims, got shape "
                f"{tuple(value.shape)} {value.dtype}"
            )
        tensor = value.to(device=device, dtype=torch.float32)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        tensor = torch.tensor(float(value), device=device)
    else:
        raise TypeError(f"{name}: {argument} must be a number or a tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: {argument} must be finite, got {value!r}")
    return tensor


def _check_int(name: str, argument: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: {argument} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: {argument} must be >= {minimum}, got {value}")
    return int(value)


def _input_device(*values, device=None) -> torch.device:
    """``device`` if given, else that of the first tensor among ``values``, else the CPU."""
    if device is not None:
        return torch.device(device)
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _draw_noise(shape, selection: str, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Logit noise for a chunk of steps: standard Gumbel ``-log(-log(u))`` for "sample" (``u = 0``
    gives ``-inf``, never selected: probability 2^-24 per draw), normal with std ``noise`` for
    "top1_gaussian". Uniforms and two vectorised logs cost half as much as ``exponential_``."""
    if selection == "sample":
        return torch.rand(shape, generator=generator, device=generator.device).log_().neg_().log_().neg_()
    return torch.randn(shape, generator=generator, device=generator.device).mul_(noise)


def simulate(
    feedback,
    *,
    num_experts: int = 2,
    asymmetry=0.0,
    bias: torch.Tensor | None = None,
    steps: int = 20000,
    replicas: int = 64,
    eps: float = 0.01,
    seed: int = 0,
    selection: str = "sample",
    noise: float = 1.0,
    initial_scores: torch.Tensor | None = None,
    record_every: int | None = None,
    device=None,
) -> Simulation:
    """Run ``P x R`` independent chains of the routing rule for ``steps`` steps.

    Per step and chain: ``logits = K s + b``; select one expert ``I`` by

    - ``selection="sample"``: ``I ~ Categorical(softmax(logits))``, drawn as the argmax of
      ``logits`` plus standard Gumbel noise (the Gumbel-max trick);
    - ``selection="top1_gaussian"``: ``I = argmax(logits + noise * z)`` with ``z`` iid standard
      normal per expert and step (the hard top-1 routing case; its threshold is
      ``critical_feedback(E, selection="top1_gaussian", noise=noise)``, ``noise * sqrt(pi)`` for
      two experts);

    then ``s <- (1 - eps) s + eps onehot(I)``.

    Args:
        feedback: ``K``, a number or a ``(P,)`` tensor (P parameter points); finite.
        num_experts: ``E >= 2``.
        asymmetry: ``h``, a number or a ``(P,)`` tensor, added to expert 0's logit (``b = (h, 0,
            ..., 0)``, so for two experts ``h = b_0 - b_1``); ignored when ``bias`` is given.
        bias: ``(E,)`` or ``(P, E)`` logit bias ``b``, overriding ``asymmetry``.
        steps: steps per chain, ``>= 2``; ``load`` counts the last ``steps - steps // 2``.
        replicas: ``R >= 1`` independent chains per parameter point.
        eps: the score step, in ``(0, 1]``.
        seed: seeds a generator on the device: the same seed, inputs and device give the same
            result.
        selection: ``"sample"`` or ``"top1_gaussian"``.
        noise: the per-expert logit noise std of ``"top1_gaussian"`` (> 0; unused by "sample").
        initial_scores: starting scores broadcastable to ``(P, R, E)``; default ``1/E`` each.
        record_every: also return the scores every this many steps (``Simulation.trajectory``).
        device: where to run when no argument is a tensor (default CPU); otherwise the first
            tensor argument's device.

    Returns:
        A :class:`Simulation`.
    """
    name = "simulate"
    num_experts = check_num_experts(name, num_experts, MIN_EXPERTS)
    steps = _check_int(name, "steps", steps, 2)
    replicas = _check_int(name, "replicas", replicas, 1)
    seed = _check_int(name, "seed", seed, 0)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < float(eps) <= 1:
        raise ValueError(f"{name}: eps must be in (0, 1], got {eps!r}")
    eps = float(eps)
    if selection not in SELECTIONS:
        raise ValueError(f"{name}: selection must be one of {SELECTIONS}, got {selection!r}")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 < float(noise) < math.inf:
        raise ValueError(f"{name}: noise must be a finite number > 0, got {noise!r}")
    if record_every is not None:
        record_every = _check_int(name, "record_every", record_every, 1)
    device = _input_device(feedback, asymmetry, bias, initial_scores, device=device)

    feedback_t = _as_points(name, "feedback", feedback, device, 1)
    if bias is not None:
        bias_t = _as_points(name, "bias", bias, device, 2)
        if bias_t.shape[-1] != num_experts:
            raise ValueError(f"{name}: bias must be (E,) or (P, E) with E = {num_experts}, got {tuple(bias_t.shape)}")
        bias_t = bias_t.reshape(-1, num_experts)
    else:
        asymmetry_t = _as_points(name, "asymmetry", asymmetry, device, 1).reshape(-1, 1)
        bias_t = torch.cat([asymmetry_t, asymmetry_t.new_zeros(asymmetry_t.shape[0], num_experts - 1)], dim=1)
    feedback_t = feedback_t.reshape(-1)
    try:
        points = torch.broadcast_shapes(feedback_t.shape, bias_t.shape[:1])[0]
    except RuntimeError:
        raise ValueError(
            f"{name}: feedback has {feedback_t.numel()} points but the bias/asymmetry has "
            f"{bias_t.shape[0]}; give one, or the same number P"
        ) from None
    feedback_t = feedback_t.expand(points).contiguous()
    bias_t = bias_t.expand(points, num_experts).contiguous()

    chains = points * replicas
    shape = (points, replicas, num_experts)
    if initial_scores is None:
        scores = torch.full(shape, 1 / num_experts, device=device)
    else:
        start = _as_points(name, "initial_scores", initial_scores, device, 3)
        try:
            scores = start.expand(shape).clone()
        except RuntimeError:
            raise ValueError(
                f"{name}: initial_scores must broadcast to (P, R, E) = {shape}, got {tuple(start.shape)}"
            ) from None
    scores = scores.reshape(chains, num_experts)
    # Per chain: K as a column and b as a row, so that K s + b is one addcmul.
    gain = feedback_t.repeat_interleave(replicas).unsqueeze(1)
    offset = bias_t.repeat_interleave(replicas, dim=0)

    counts = torch.zeros(chains, num_experts, device=device)
    experts = torch.arange(num_experts, device=device)
    trajectory = None
    if record_every is not None:
        trajectory = torch.empty(steps // record_every, chains, num_experts, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, min(steps, _RANDOM_CHUNK_NUMBERS // (chains * num_experts)))
    count_from = steps // 2
    logits = torch.empty_like(scores)
    for step in range(steps):
        offset_in_chunk = step % chunk
        if offset_in_chunk == 0:
            noise_draws = _draw_noise((min(chunk, steps - step), chains, num_experts), selection, noise, generator)
        # Both rules are an argmax of noisy logits: Gumbel noise samples softmax(logits) exactly
        # (the Gumbel-max trick: no softmax, whose CPU kernel forks threads even for a few rows).
        torch.addcmul(offset, gain, scores, out=logits)
        chosen = logits.add_(noise_draws[offset_in_chunk]).argmax(dim=-1, keepdim=True)
        selected = (chosen == experts).to(torch.float32)
        scores.lerp_(selected, eps)
        if step >= count_from:
            counts += selected
        if trajectory is not None and (step + 1) % record_every == 0:
            trajectory[(step + 1) // record_every - 1] = scores
    load = counts / (steps - count_from)
    return Simulation(
        load=load.reshape(shape),
        scores=scores.reshape(shape),
        feedback=feedback_t,
        bias=bias_t,
        trajectory=None if trajectory is None else trajectory.reshape(-1, *shape),
        eps=eps,
        steps=steps,
        selection=selection,
        noise=float(noise),
    )
