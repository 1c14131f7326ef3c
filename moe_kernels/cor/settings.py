"""The keyword settings every CoR entry point takes (:func:`~moe_kernels.cor.calibrate`,
:func:`~moe_kernels.cor.layer_sensitivity`, :func:`~moe_kernels.cor.expert_impact`,
:func:`~moe_kernels.cor.evaluate_counterfactual_routing`): their names, defaults and checks in
one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from moe_kernels.config import is_finite_number
from moe_kernels.cor.losses import check_quantiles


class CalibrationSettings(NamedTuple):
    """The CoR settings, with their defaults.

    ``total_k``: the activation budget (None: the model's own total); ``strength``: the prior's
    weight lambda; ``hard_quantile`` / ``easy_quantile``: hard tokens above ``quantile(l,
    hard_quantile)``, easy ones below ``quantile(l, easy_quantile)``, both in (0, 1), easy <=
    hard; ``delta``: the output scaling ``1 - delta`` of :func:`layer_sensitivity`, in (0, 1];
    ``tokens_per_forward``: the most tokens (routed rows) one what-if forward holds (at least one
    sequence copy); ``progress``: show progress bars (stderr).

    A function that does not use a setting holds None there (see :meth:`of`)."""

    total_k: int | None = None
    strength: float | None = 0.1
    hard_quantile: float = 0.7
    easy_quantile: float | None = 0.3
    delta: float | None = 0.2
    tokens_per_forward: int = 4096
    progress: bool = False

    @classmethod
    def of(cls, op: str, keywords: dict, names: Iterable[str] | None = None) -> CalibrationSettings:
        """The settings ``keywords`` give (the others at their defaults), checked; ``names``: the
        settings ``op`` takes (default all), the others None. ``TypeError`` naming ``op`` for a
        keyword that is not one of them, ``ValueError`` for a value out of range."""
        names = cls._fields if names is None else tuple(names)
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise TypeError(f"{op}: unexpected keyword argument(s) {unknown}; the settings are {list(names)}")
        unused = {name: None for name in cls._fields if name not in names}
        settings = cls(**{**unused, **keywords})
        settings.check(op)
        return settings

    def check(self, op: str) -> None:
        """``ValueError`` naming ``op`` for a setting out of range (None: not used, not checked;
        ``total_k`` is checked against the model by :func:`calibrate`)."""
        if self.strength is not None and not is_finite_number(self.strength):
            raise ValueError(f"{op}: strength must be a finite number, got {self.strength!r}")
        check_quantiles(op, self.hard_quantile, self.easy_quantile)
        if self.delta is not None and (not is_finite_number(self.delta) or not 0 < self.delta <= 1):
            raise ValueError(f"{op}: delta must be a number in (0, 1], got {self.delta!r}")
        tokens = self.tokens_per_forward
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{op}: tokens_per_forward must be a positive int, got {tokens!r}")
