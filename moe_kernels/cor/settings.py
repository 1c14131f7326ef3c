"""The settings every CoR entry point takes (:func:`~moe_kernels.cor.calibrate`,
:func:`~moe_kernels.cor.layer_sensitivity`, :func:`~moe_kernels.cor.expert_impact`,
:func:`~moe_kernels.cor.evaluate_counterfactual_routing`) as one validated value, passed as their
``settings`` argument: the names, defaults and checks in one place."""

from __future__ import annotations

from dataclasses import dataclass

from moe_kernels.config import is_finite_number, is_int, real_number
from moe_kernels.cor.losses import check_quantiles


@dataclass(frozen=True)
class CalibrationSettings:
    """The CoR settings, with their defaults (each entry point reads the ones it uses).

    ``total_k``: the activation budget (None: the model's own total; :func:`calibrate` checks it
    against the model); ``strength``: the prior's weight lambda; ``hard_quantile`` /
    ``easy_quantile``: hard tokens above ``quantile(l, hard_quantile)``, easy ones below
    ``quantile(l, easy_quantile)``, both in (0, 1), easy <= hard; ``delta``: the output scaling
    ``1 - delta`` of :func:`layer_sensitivity`, in (0, 1]; ``tokens_per_forward``: the most tokens
    (routed rows) one what-if forward holds (at least one sequence copy); ``progress``: show
    progress bars (stderr). ``TypeError`` / ``ValueError`` naming the setting on construction."""

    total_k: int | None = None
    strength: float = 0.1
    hard_quantile: float = 0.7
    easy_quantile: float = 0.3
    delta: float = 0.2
    tokens_per_forward: int = 4096
    progress: bool = False

    def __post_init__(self):
        owner = "CalibrationSettings"
        if self.total_k is not None and not is_int(self.total_k):
            raise TypeError(f"{owner}: total_k must be None or an int, got {type(self.total_k).__name__}")
        for name in ("strength", "hard_quantile", "easy_quantile", "delta"):
            real_number(owner, name, getattr(self, name))
        if not is_int(self.tokens_per_forward):
            raise TypeError(f"{owner}: tokens_per_forward must be an int, got {type(self.tokens_per_forward).__name__}")
        if self.total_k is not None and self.total_k < 1:
            raise ValueError(f"{owner}: total_k must be None or a positive int, got {self.total_k!r}")
        if not is_finite_number(self.strength):
            raise ValueError(f"{owner}: strength must be a finite number, got {self.strength!r}")
        check_quantiles(owner, self.hard_quantile, self.easy_quantile)
        if not is_finite_number(self.delta) or not 0 < self.delta <= 1:
            raise ValueError(f"{owner}: delta must be a number in (0, 1], got {self.delta!r}")
        if not is_int(self.tokens_per_forward) or self.tokens_per_forward < 1:
            raise ValueError(f"{owner}: tokens_per_forward must be a positive int, got {self.tokens_per_forward!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"{owner}: progress must be a bool, got {type(self.progress).__name__}")


DEFAULT_SETTINGS = CalibrationSettings()


def checked_settings(op: str, settings) -> CalibrationSettings:
    """``settings`` itself, or a ``TypeError`` naming ``op`` unless it is a :class:`CalibrationSettings`."""
    if not isinstance(settings, CalibrationSettings):
        raise TypeError(f"{op}: settings must be a moe_kernels.cor.CalibrationSettings, got {type(settings).__name__}")
    return settings
