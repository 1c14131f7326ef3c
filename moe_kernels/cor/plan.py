"""The result of CoR calibration: per-layer k and the causal prior, saved as a small JSON file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_kernels.config import is_finite_number, real_number
from moe_kernels.files import read_json, write_json

PLAN_FORMAT = "moe_kernels.cor.CoRPlan"
# 2: written through moe_kernels.files (atomic, with a checksum); version 1 files are refused.
PLAN_VERSION = 2


def min_max_normalize(impact: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation of ``impact (L, E)``: ``(c - min) / (max - min)`` in [0, 1],
    0 where a row's values are all equal; float32."""
    values = impact.double()
    low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (values - low) / torch.where(spread > 0, spread, 1), 0.0).float()


def _tensor(name: str, value, dtype: torch.dtype, dim: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"CoRPlan: {name} must be a {dim}-D tensor, got {type(value).__name__}") from None
    if tensor.dim() != dim or tensor.numel() == 0:
        raise ValueError(f"CoRPlan: {name} must be a non-empty {dim}-D tensor, got shape {tuple(tensor.shape)}")
    if dtype == torch.int64 and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"CoRPlan: {name} must hold ints, got {tensor.dtype}")
    if dtype == torch.float32 and not tensor.is_floating_point():
        tensor = tensor.double()
    if dtype == torch.float32 and not torch.isfinite(tensor).all():
        raise ValueError(f"CoRPlan: {name} must be finite")
    return tensor.to(dtype)


@dataclass(eq=False)  # tensors: no elementwise ==
class CoRPlan:
    """A Counterfactual Routing plan for a model of ``L`` MoE layers of ``E`` experts.

    Fields:
        k: ``(L,)`` int64, the experts each layer selects per token (each >= 1).
        prior: ``(L, E)`` float32 in [0, 1], the per-layer min-max normalised expert impact (0 for
            a layer whose impacts are all equal), added as ``strength * prior[l]`` to layer l's
            selection key.
        strength: the prior's weight (lambda), a finite number.
        ratio: optional ``(L,)`` float32, the layers' Relative Knowledge Intensity.
        impact: optional ``(L, E)`` float32, the raw counterfactual expert impact.
        calibration: JSON-able facts about the calibration (quantiles, delta, token counts,
            the layers' base k and sensitivities).

    Tensors are stored on the CPU; :func:`apply_counterfactual_routing` moves what it needs.
    """

    k: torch.Tensor
    prior: torch.Tensor
    strength: float = 0.1
    ratio: torch.Tensor | None = None
    impact: torch.Tensor | None = None
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        self.k = _tensor("k", self.k, torch.int64, 1)
        if (self.k < 1).any():
            raise ValueError(f"CoRPlan: k must be >= 1 in every layer, got {self.k.tolist()}")
        self.prior = _tensor("prior", self.prior, torch.float32, 2)
        if self.prior.shape[0] != self.k.numel():
            raise ValueError(
                f"CoRPlan: prior must be (L, E) with L = len(k) = {self.k.numel()}, got {tuple(self.prior.shape)}"
            )
        if (self.prior < 0).any() or (self.prior > 1).any():
            raise ValueError("CoRPlan: prior must lie in [0, 1] (a min-max normalised impact)")
        real_number("CoRPlan", "strength", self.strength)
        if not is_finite_number(self.strength):
            raise ValueError(f"CoRPlan: strength must be a finite number, got {self.strength!r}")
        self.strength = float(self.strength)
        if self.ratio is not None:
            self.ratio = _tensor("ratio", self.ratio, torch.float32, 1)
            if self.ratio.shape != self.k.shape:
                raise ValueError(f"CoRPlan: ratio must be (L,) = {tuple(self.k.shape)}, got {tuple(self.ratio.shape)}")
        if self.impact is not None:
            self.impact = _tensor("impact", self.impact, torch.float32, 2)
            if self.impact.shape != self.prior.shape:
                raise ValueError(
                    f"CoRPlan: impact must have prior's shape {tuple(self.prior.shape)}, got {tuple(self.impact.shape)}"
                )
        if not isinstance(self.calibration, dict):
            raise TypeError(f"CoRPlan: calibration must be a dict, got {type(self.calibration).__name__}")

    @property
    def num_layers(self) -> int:
        return self.k.numel()

    @property
    def num_experts(self) -> int:
        return self.prior.shape[1]

    @property
    def total_k(self) -> int:
        """The activation count per token over all layers, ``sum(k)``."""
        return int(self.k.sum())

    def to_dict(self) -> dict:
        """The plan as JSON-able values (the content of :meth:`save`)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "k": self.k.tolist(),
            "prior": self.prior.tolist(),
            "strength": self.strength,
            "ratio": None if self.ratio is None else self.ratio.tolist(),
            "impact": None if self.impact is None else self.impact.tolist(),
            "calibration": self.calibration,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (float32 values round-trip exactly), atomically and with a
        checksum (:mod:`moe_kernels.files`: a failed write leaves the old file); returns the
        path."""
        document = {key: value for key, value in self.to_dict().items() if key not in ("format", "version")}
        return write_json(path, document, kind=PLAN_FORMAT, version=PLAN_VERSION)

    @classmethod
    def from_dict(cls, data: dict, source: str = "CoRPlan.from_dict") -> CoRPlan:
        """A plan from :meth:`to_dict`'s values, validated (format, version, sizes, values)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{source}: not a {PLAN_FORMAT} file")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"{source}: plan format version {data.get('version')!r}, this moe_kernels reads version {PLAN_VERSION}"
            )
        missing = [key for key in ("k", "prior", "strength", "num_layers", "num_experts") if key not in data]
        if missing:
            raise ValueError(f"{source}: the plan lacks {missing}")
        plan = cls(
            k=data["k"],
            prior=data["prior"],
            strength=data["strength"],
            ratio=data.get("ratio"),
            impact=data.get("impact"),
            calibration=data.get("calibration") or {},
        )
        if (plan.num_layers, plan.num_experts) != (data["num_layers"], data["num_experts"]):
            raise ValueError(
                f"{source}: the plan says L={data['num_layers']}, E={data['num_experts']} but holds "
                f"L={plan.num_layers}, E={plan.num_experts}"
            )
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoRPlan:
        """Read a plan written by :meth:`save`; ``FileNotFoundError`` for no file, ``ValueError``
        naming the file for another format or version, a corrupted or malformed file, or fields
        that do not describe the plan's values."""
        source = f"CoRPlan.load({str(path)!r})"
        document = read_json(path, kind=PLAN_FORMAT, version=PLAN_VERSION, op="CoRPlan.load")
        try:
            return cls.from_dict({**document, "format": PLAN_FORMAT, "version": PLAN_VERSION}, source)
        except (TypeError, ValueError) as error:  # a field that is no plan's: name the file
            if source in str(error):
                raise
            raise ValueError(f"{source}: {error}") from error
