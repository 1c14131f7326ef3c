"""Options as values: :class:`RoutingConfig` (routing, with its presets), :class:`KnnMixing`
(kNN-MoE's mixing) and :class:`Activation` (the experts' gated activation).

Every routing op and module (``softmax_topk``, ``knn_route``, ``knn_route_assignments``,
``TopKRouter``, ``knn.KNNRouter``, ``MoE``, the HF integration) takes ``routing=`` a
:class:`RoutingConfig`; the options are validated once, when the value is built. Below the public
functions the records are the one currency: the op forwards, the launchers, the kernels' meta
functions, the CPU path and the reference all take them. Only the ``torch.library`` schema needs
primitives: the op boundary (``moe_kernels.ops._boundary``) flattens a record there with
``op_args()`` and rebuilds it with the cached ``from_op_args()``, both described by the record's
``OP_FIELDS``. The selection ``bias`` is not part of the routing: it is state (DeepSeek-V3's
correction bias, trained by an update rule), passed as a tensor next to the config.

This module is the bottom layer of the package: it imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_kernels.kinds import as_int, integer, is_finite_number, is_int, real_number, string  # noqa: F401

SCORE_FUNCS = ("softmax", "sigmoid")
# Added to the sum of the k weights a renormalised routing divides by (as DeepSeek-V3 does).
RENORM_EPS = 1e-20
GROUP_SCORES = ("top2_sum", "max")
KNN_WEIGHTINGS = ("similarity", "softmax")


def _check_fields(
    owner: str, score_func, renormalize, num_groups, topk_groups, group_score, scale, num_experts: int | None = None
) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming ``owner`` and the option for any bad field
    (``num_experts``, when known, only makes the messages more precise): ``TypeError`` for a wrong
    kind, ``ValueError`` for a wrong value."""
    string(owner, "score_func", score_func)
    string(owner, "group_score", group_score)
    real_number(owner, "scale", scale)
    for name, value in (("num_groups", num_groups), ("topk_groups", topk_groups)):
        if value is not None and as_int(value) is None:
            raise TypeError(f"{owner}: {name} must be None or an int, got {type(value).__name__}")
    num_groups = None if num_groups is None else as_int(num_groups)
    topk_groups = None if topk_groups is None else as_int(topk_groups)
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"{owner}: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"{owner}: renormalize must be a bool, got {type(renormalize).__name__}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"{owner}: group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    if not is_finite_number(scale):
        raise ValueError(f"{owner}: scale must be a finite number, got {scale!r}")
    if num_groups is None:
        if topk_groups is not None:
            raise ValueError(f"{owner}: topk_groups={topk_groups!r} needs num_groups, got num_groups=None")
        return
    if not is_int(num_groups) or num_groups < 1:
        raise ValueError(
            f"{owner}: num_groups must be a positive int dividing E{_equals(num_experts)}, got {num_groups!r}"
        )
    if not is_int(topk_groups) or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"{owner}: topk_groups must be an int in [1, num_groups={num_groups}], got {topk_groups!r}")


def _equals(value) -> str:
    return "" if value is None else f"={value}"


class _PresetOrField:
    """``RoutingConfig.renormalize`` is both a field (``config.renormalize`` -> bool) and, on the
    class, the preset of the same name (``RoutingConfig.renormalize()``): a non-data descriptor,
    so an instance's own value shadows it while the class sees the constructor."""

    def __init__(self, preset):
        self.preset = preset

    def __get__(self, instance, owner):
        return functools.partial(self.preset, owner)


@dataclass(frozen=True)
class RoutingConfig:
    """Every option of gate + top-k routing except the selection bias, as one frozen, hashable
    value (usable as a dict key and as a ``torch.compile`` constant).

    Fields:
        score_func: ``"softmax"`` or ``"sigmoid"`` gate scores, computed in float32.
        renormalize: divide the k weights by their sum (+1e-20).
        num_groups: split the experts into this many contiguous groups (must divide E) ...
        topk_groups: ... and keep only the best ``topk_groups`` of them eligible.
        group_score: a group's score: ``"top2_sum"`` (its two largest keys, DeepSeek-V3) or
            ``"max"`` (its largest key, DeepSeek-V2).
        scale: multiplies the final weights (DeepSeek's ``routed_scaling_factor``).

    Options that depend on the problem (``num_groups`` dividing E, ``k`` within the kept groups)
    are checked per call by :meth:`check`.

    Presets, named as vLLM / SGLang's ``RoutingMethodType``: :meth:`default`, :meth:`renormalize`
    (also RenormalizeNaive), :meth:`deepseek_v3`, :meth:`deepseek_v2`, :meth:`llama4`,
    :meth:`sigmoid_renorm`. ``dataclasses.replace(config, scale=1.0)`` makes a changed copy
    (validated like a new config).
    """

    score_func: str = "softmax"
    renormalize: bool = False
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str = "top2_sum"
    scale: float = 1.0

    def __post_init__(self):
        _check_fields(
            "RoutingConfig",
            self.score_func,
            self.renormalize,
            self.num_groups,
            self.topk_groups,
            self.group_score,
            self.scale,
        )
        if not isinstance(self.scale, float):  # 2 and 2.0 are one config (equal and of one hash)
            object.__setattr__(self, "scale", float(self.scale))
        for name in ("num_groups", "topk_groups"):  # numpy integers as the ints the schema takes
            value = getattr(self, name)
            if value is not None and type(value) is not int:
                object.__setattr__(self, name, as_int(value))
        # The (E, k) problems this config was checked for: an op call's check is one set lookup;
        # and the flat fields (neither is a field, so equality, hashing, repr and
        # dataclasses.fields do not see them).
        object.__setattr__(self, "_checked", set())
        flat = (self.score_func, self.renormalize, self.num_groups or 0, self.topk_groups or 0, self.group_score)
        object.__setattr__(self, "_op_args", (*flat, self.scale))

    def __reduce__(self):
        # Rebuilt through __init__ (validated, with a fresh problem cache), never from a __dict__.
        return (type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    # ---------------------------------------------------------------------------------------
    # presets

    @classmethod
    def default(cls) -> RoutingConfig:
        """softmax -> top-k, weights not renormalised (OLMoE, Qwen1.5-MoE)."""
        return cls()

    def _renormalize_preset(cls) -> RoutingConfig:
        """softmax -> top-k -> renormalise, the same function as top-k -> softmax (Mixtral, Qwen3,
        Qwen3-Next, GPT-OSS; vLLM's Renormalize and RenormalizeNaive)."""
        return cls(renormalize=True)

    @classmethod
    def deepseek_v3(
        cls, *, num_groups: int | None = 8, topk_groups: int | None = 4, scale: float = 2.5, renormalize: bool = True
    ) -> RoutingConfig:
        """DeepSeek-V3 / R1 / Kimi-K2 (noaux_tc): sigmoid scores, groups ranked by their top-2 key
        sum, renormalised, scaled. Pass the correction bias as ``bias=`` next to it."""
        groups = dict(num_groups=num_groups, topk_groups=topk_groups, group_score="top2_sum")
        return cls(score_func="sigmoid", renormalize=renormalize, scale=scale, **groups)

    @classmethod
    def deepseek_v2(
        cls, *, num_groups: int | None = 8, topk_groups: int | None = 3, scale: float = 16.0, renormalize: bool = False
    ) -> RoutingConfig:
        """DeepSeek-V2 group-limited greedy: softmax scores, groups ranked by their best expert."""
        groups = dict(num_groups=num_groups, topk_groups=topk_groups, group_score="max")
        return cls(score_func="softmax", renormalize=renormalize, scale=scale, **groups)

    @classmethod
    def llama4(cls) -> RoutingConfig:
        """Llama-4: sigmoid of the top logits, not renormalised (used with k = 1)."""
        return cls(score_func="sigmoid")

    @classmethod
    def sigmoid_renorm(cls) -> RoutingConfig:
        """Sigmoid scores, top-k, renormalised (vLLM's SigmoidRenorm)."""
        return cls(score_func="sigmoid", renormalize=True)

    # ---------------------------------------------------------------------------------------

    # The fields as the registered ops' schemas take them, in field order (0 for "no groups": a
    # schema int cannot be None); see the module doc.
    OP_FIELDS: ClassVar = (
        ("score_func", str),
        ("renormalize", bool),
        ("num_groups", int),
        ("topk_groups", int),
        ("group_score", str),
        ("scale", float),
    )

    def op_args(self) -> tuple[str, bool, int, int, str, float]:
        """The fields in order, as primitives for a ``torch.library`` schema (:attr:`OP_FIELDS`)."""
        return self._op_args

    @classmethod
    def from_op_args(
        cls, score_func: str, renormalize: bool, num_groups: int, topk_groups: int, group_score: str, scale: float
    ) -> RoutingConfig:
        """The config :meth:`op_args` flattened (cached: an op call rebuilds it with one lookup;
        built afresh while ``torch.compile`` traces, which cannot trace the cache)."""
        args = (score_func, renormalize, num_groups or None, topk_groups or None, group_score, scale)
        return cls(*args) if torch.compiler.is_compiling() else _cached_record(cls, args)

    def eligible_experts(self, num_experts: int) -> int:
        """How many of ``num_experts`` experts the group limit leaves selectable."""
        if self.num_groups is None:
            return num_experts
        return self.topk_groups * (num_experts // self.num_groups)

    def check(self, num_experts: int, k, op: str = "RoutingConfig") -> None:
        """Raise a ``ValueError`` naming ``op`` unless this config can route ``k`` of
        ``num_experts`` experts: the groups divide E (two experts each for ``"top2_sum"``) and
        ``1 <= k <=`` the experts of the kept groups. A problem that passed is remembered by the
        config (every later call with the same int E and k costs one set lookup)."""
        if torch.compiler.is_compiling():  # no Python state for dynamo to guard on
            _check_problem(self, num_experts, k, op)
            return
        plain = type(k) is int and type(num_experts) is int
        if plain and (num_experts, k) in self._checked:
            return
        _check_problem(self, num_experts, k, op)
        if plain:
            self._checked.add((num_experts, k))


RoutingConfig.renormalize = _PresetOrField(RoutingConfig._renormalize_preset)
del RoutingConfig._renormalize_preset


def _check_problem(config: RoutingConfig, num_experts: int, k, op: str) -> None:
    if config.num_groups is not None:
        if num_experts % config.num_groups:
            raise ValueError(
                f"{op}: num_groups must be a positive int dividing E={num_experts}, got {config.num_groups}"
            )
        group_size = num_experts // config.num_groups
        if config.group_score == "top2_sum" and group_size < 2:
            raise ValueError(
                f"{op}: group_score='top2_sum' needs at least 2 experts per group, got E={num_experts} / "
                f"num_groups={config.num_groups} = {group_size}; use group_score='max'"
            )
    eligible = config.eligible_experts(num_experts)
    if not is_int(k) or not 1 <= k <= eligible:
        where = f"E={num_experts}" if config.num_groups is None else f"the {eligible} experts of the kept groups"
        raise ValueError(f"{op}: k must be an int in [1, {eligible}] ({where}), got {k!r}")


DEFAULT_ROUTING = RoutingConfig()

# The options (RoutingConfig's fields, in order) the routing ops also take as keywords.
ROUTING_OPTIONS = tuple(name for name, _ in RoutingConfig.OP_FIELDS)


def routing_or_default(op: str, routing) -> RoutingConfig:
    """``routing``, or :data:`DEFAULT_ROUTING` for None; a ``TypeError`` naming ``op`` for anything
    but a :class:`RoutingConfig`."""
    if routing is None:
        return DEFAULT_ROUTING
    if not isinstance(routing, RoutingConfig):
        raise TypeError(f"{op}: routing must be a moe_kernels.RoutingConfig or None, got {type(routing).__name__}")
    return routing


def override_routing(op: str, base: RoutingConfig, options: tuple, num_experts: int | None = None) -> RoutingConfig:
    """``base`` with the routing options a public op took as keywords applied on top: ``options``
    holds each field's keyword value, None where not given, in :data:`ROUTING_OPTIONS` order.
    Validated with errors naming ``op`` (``num_experts``, when known, makes them more precise);
    built configs are cached, so a call with keyword options pays the validation once. An option
    left at None keeps ``base``'s value (to drop groups from a grouped config, pass a config
    without them)."""
    if options == _NO_OPTIONS:  # the common call: the config as given
        return base
    given = tuple((name, value) for name, value in zip(ROUTING_OPTIONS, options) if value is not None)
    if torch.compiler.is_compiling():
        return _build(op, base, given, num_experts)
    try:
        return _build_cached(op, base, given, num_experts, tuple(type(value) for _, value in given))
    except TypeError as error:  # an unhashable option value (a list, a tensor): build uncached
        if "unhashable" not in str(error):
            raise
        return _build(op, base, given, num_experts)


_NO_OPTIONS = (None,) * len(ROUTING_OPTIONS)


def _build(op: str, base: RoutingConfig, given: tuple, num_experts: int | None) -> RoutingConfig:
    fields = dataclasses.asdict(base)
    fields.update(given)
    _check_fields(op, **fields, num_experts=num_experts)
    return RoutingConfig(**fields)


def _build_keyed(op: str, base: RoutingConfig, given: tuple, num_experts: int | None, _types: tuple):
    """:func:`_build`, with the option values' types in the cache key: ``renormalize=1`` equals
    (and hashes as) ``renormalize=True``, and must not be served the valid config built for it."""
    return _build(op, base, given, num_experts)


_build_cached = functools.lru_cache(maxsize=256)(_build_keyed)


def check_mixing(owner: str, weighting, temperature, min_confidence) -> None:
    """Raise a ``TypeError`` (wrong kind) or ``ValueError`` (wrong value) naming ``owner`` and the
    option for a bad kNN mixing option."""
    string(owner, "weighting", weighting)
    real_number(owner, "temperature", temperature)
    real_number(owner, "min_confidence", min_confidence)
    if weighting not in KNN_WEIGHTINGS:
        raise ValueError(f"{owner}: weighting must be one of {KNN_WEIGHTINGS}, got {weighting!r}")
    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {temperature!r}")
    if not is_finite_number(min_confidence) or not 0 <= min_confidence <= 1:
        raise ValueError(f"{owner}: min_confidence must be a number in [0, 1], got {min_confidence!r}")


@dataclass(frozen=True)
class KnnMixing:
    """How kNN-MoE mixes the routing logits retrieved for a token into its router's, as one
    frozen, hashable value (the semantics are :func:`moe_kernels.knn_mix`'s).

    Fields:
        weighting: the neighbour weights ``w``: ``"similarity"`` (``sims / sum(sims)``) or
            ``"softmax"`` (``softmax(sims / temperature)``).
        temperature: of the ``"softmax"`` weighting, > 0.
        min_confidence: confidences below it fall back to the router (confidence 0), in [0, 1].
    """

    weighting: str = "similarity"
    temperature: float = 0.1
    min_confidence: float = 0.0

    # The fields as the registered ops' schemas take them (see the module doc).
    OP_FIELDS: ClassVar = (("weighting", str), ("temperature", float), ("min_confidence", float))

    def __post_init__(self):
        check_mixing("KnnMixing", self.weighting, self.temperature, self.min_confidence)
        for name in ("temperature", "min_confidence"):  # 1 and 1.0 are one value (equal and of one hash)
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "_op_args", (self.weighting, self.temperature, self.min_confidence))

    def op_args(self) -> tuple[str, float, float]:
        """The fields in order, as primitives for a ``torch.library`` schema (:attr:`OP_FIELDS`)."""
        return self._op_args

    @classmethod
    def from_op_args(cls, weighting: str, temperature: float, min_confidence: float) -> KnnMixing:
        """The value :meth:`op_args` flattened, or of these validated fields (cached, as
        :meth:`RoutingConfig.from_op_args`)."""
        args = (weighting, temperature, min_confidence)
        return cls(*args) if torch.compiler.is_compiling() else _cached_record(cls, args)


DEFAULT_MIXING = KnnMixing()


@functools.lru_cache(maxsize=512)
def _cached_record(cls: type, args: tuple):
    """``cls(*args)``, built once per distinct value (the records are frozen and hashable). The
    schema types the flat fields, so equal values never differ in type here (``True`` is never
    served for ``1``)."""
    return cls(*args)


class Activation(enum.IntEnum):
    """The gated activation of an expert MLP, ``act(gate) * up`` of the two halves of
    ``gate_up (..., 2I)``; the value is the code the Triton kernels specialise on.

    - ``SILU`` (SwiGLU), ``GELU`` (GeGLU, erf), ``GELU_TANH`` (GeGLU, tanh approximation): gate
      columns then up columns;
    - ``GPT_OSS``: interleaved gate/up columns, gate clamped above at 7, up to ``[-7, 7]``,
      ``(up + 1) * gate * sigmoid(1.702 * gate)``.

    The ops take the lower-case name (``activation="silu"``): :meth:`parse` turns it into a member.
    """

    SILU = 0
    GELU = 1
    GELU_TANH = 2
    GPT_OSS = 3

    @property
    def label(self) -> str:
        """The name the ops take: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"gpt_oss"``."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Activation:
        """The member named ``name`` (``"silu"`` -> ``Activation.SILU``; a member is itself);
        ``ValueError`` otherwise."""
        try:
            return cls[name.upper()] if isinstance(name, str) else cls(name)
        except (KeyError, ValueError):
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}") from None


def activation_name(owner: str, activation) -> str:
    """The name the ops take (``"silu"``) for an activation given as that name or as an
    :class:`Activation` member; ``TypeError`` for another kind, ``ValueError`` for an unknown
    name, each naming ``owner``."""
    if isinstance(activation, Activation):
        return activation.label
    if not isinstance(activation, str):
        kind = type(activation).__name__
        raise TypeError(f"{owner}: activation must be a str or a moe_kernels.Activation, got {kind}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


# The activation names the ops take, in code order.
ACTIVATIONS = tuple(member.label for member in Activation)
# GPT-OSS's clamp limit and sigmoid slope (its config's swiglu_limit and alpha).
GPT_OSS_LIMIT = 7.0
GPT_OSS_ALPHA = 1.702
