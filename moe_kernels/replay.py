"""Routing replay: record which experts every MoE layer of a model selects, and make later
forwards select exactly those (Rollout Routing Replay, R3; Megatron-LM's routing replay).

Reinforcement learning on an MoE model breaks when the experts chosen while generating (the
rollout) differ from those chosen when the same tokens are trained on. Record the rollout::

    with replay.record(model) as rollout:
        sequences = model.generate(prompt, max_new_tokens=n)      # or any forwards
    rollout.save("rollout.routing")                                # optional: atomic, checksummed

and train on the same tokens with the same experts::

    with replay.replay(model, replay.RoutingRecord.load("rollout.routing")):
        loss = policy_loss(model(sequences[:, :-1]))               # one forward, S = prompt + n - 1
    loss.backward()

``model`` is any module holding :class:`moe_kernels.MoE` blocks (with this package's routers) or
a transformers model patched by :func:`moe_kernels.integrations.transformers.apply_moe_kernels`.
Under replay the routing *weights* are the live router's (its own score function and
renormalisation, from its live logits) at the recorded ids, so the router and the experts get
gradients as in R3. Replay never falls back to live routing: a record that does not fit the
forward raises ``ValueError``. Both run eagerly (Python state per forward: not under
``torch.compile``); neither syncs the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moe_kernels.files import read_tensors, write_tensors
from moe_kernels.layers import MoELayer, Tap, attach_tap, detach_tap, find_moe_layers, require_tapped, taps_of

FORMAT = "moe_kernels.RoutingRecord"
FORMAT_VERSION = 1


class RoutingRecord:
    """The expert ids every MoE layer selected, per position (what :func:`record` fills).

    ``layers``: the layer names (the blocks' module paths), in the order the forwards first
    called them. ``ids(layer)``: ``(B, S, k)`` int64 for inputs shaped ``(B, S, H)`` (the
    forwards' positions concatenated along ``S`` in call order: a ``generate`` of ``n`` tokens
    from a prompt of ``P`` holds ``S = P + n - 1``), ``(N, k)`` for flat ``(N, H)`` inputs;
    ``-1`` in empty slots (dynamic k). ``num_experts(layer)``: the layer's E.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[torch.Tensor]] = {}
        self._num_experts: dict[str, int] = {}

    @property
    def layers(self) -> list[str]:
        return list(self._chunks)

    def ids(self, layer: str) -> torch.Tensor:
        chunks = self._chunks_of(layer, "RoutingRecord.ids")
        if len(chunks) > 1:  # keep the concatenation: the next call returns it as is
            chunks[:] = [torch.cat(chunks, dim=-2)]
        return chunks[0].long()

    def num_experts(self, layer: str) -> int:
        self._chunks_of(layer, "RoutingRecord.num_experts")
        return self._num_experts[layer]

    def _chunks_of(self, layer: str, op: str) -> list[torch.Tensor]:
        if layer not in self._chunks:
            raise KeyError(f"{op}: no layer {layer!r} in this record; its layers: {self.layers}")
        return self._chunks[layer]

    def append(self, layer: str, ids: torch.Tensor, num_experts: int) -> None:
        """Add the ids ``(..., S_i, k)`` of one forward of ``layer`` (leading dims as the
        record's); ``ValueError`` naming the layer when they do not fit it."""
        chunks = self._chunks.setdefault(layer, [])
        self._num_experts.setdefault(layer, num_experts)
        if chunks and (chunks[0].shape[:-2] != ids.shape[:-2] or chunks[0].shape[-1] != ids.shape[-1]):
            raise ValueError(
                f"RoutingRecord: layer {layer!r} recorded ids of shape {tuple(chunks[0].shape)} and now "
                f"{tuple(ids.shape)}; forwards recorded together must share the batch dims and k"
            )
        chunks.append(ids.to(torch.int32))

    def __repr__(self) -> str:
        shapes = {layer: tuple(self.ids(layer).shape) for layer in self.layers}
        return f"RoutingRecord({shapes})"

    def save(self, path) -> None:
        """Write the record to ``path`` (one safetensors file of int32 ids and a manifest),
        atomically, with a checksum over both (:mod:`moe_kernels.files`)."""
        tensors = {f"layer_{i}": self.ids(layer).to(torch.int32) for i, layer in enumerate(self.layers)}
        manifest = {"layers": [{"name": name, "num_experts": self._num_experts[name]} for name in self.layers]}
        write_tensors(path, tensors, manifest, kind=FORMAT, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path) -> RoutingRecord:
        """Read a record :meth:`save` wrote. A missing file raises ``FileNotFoundError``; a
        truncated, corrupted or foreign file, or one whose manifest does not describe its data,
        ``ValueError`` naming the file."""
        op = "RoutingRecord.load"
        tensors, manifest = read_tensors(path, kind=FORMAT, version=FORMAT_VERSION, op=op)
        entries = manifest.get("layers")
        if not isinstance(entries, list) or set(tensors) != {f"layer_{i}" for i in range(len(entries))}:
            raise ValueError(f"{op}: {path}: the manifest's layers do not match the tensors {sorted(tensors)}")
        record = cls()
        for i, entry in enumerate(entries):
            name, num_experts = (entry.get("name"), entry.get("num_experts")) if isinstance(entry, dict) else (0, 0)
            ids = tensors[f"layer_{i}"]
            if not isinstance(name, str) or name in record._chunks:
                raise ValueError(f"{op}: {path}: layer {i} has no name or a repeated one ({name!r})")
            if not isinstance(num_experts, int) or num_experts < 1:
                raise ValueError(f"{op}: {path}: layer {name!r} has num_experts {num_experts!r}")
            if ids.dtype != torch.int32 or ids.dim() < 2:
                raise ValueError(f"{op}: {path}: layer {name!r} holds {ids.dtype} {tuple(ids.shape)}, not int32 ids")
            if ids.numel() and not (-1 <= int(ids.min()) and int(ids.max()) < num_experts):
                raise ValueError(f"{op}: {path}: layer {name!r} holds ids outside [-1, {num_experts})")
            record.append(name, ids, num_experts)
        return record


class _LayerTap(Tap):
    """A tap that knows the leading dims of the block's input in the current forward (set by a
    forward pre-hook on the block, consumed by the router's call)."""

    def __init__(self, layer: MoELayer):
        self.layer = layer
        self.lead: torch.Size | None = None

    def before_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self.lead = hidden.shape[:-1] if isinstance(hidden, torch.Tensor) else None

    def take_lead(self, rows: int) -> torch.Size:
        """The forward's leading dims (``(rows,)`` when the router ran without its block)."""
        lead, self.lead = self.lead, None
        return lead if lead is not None and lead.numel() == rows else torch.Size((rows,))


class _Recorder(_LayerTap):
    def __init__(self, layer: MoELayer, record: RoutingRecord):
        super().__init__(layer)
        self.record = record

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        k = ids.shape[-1]
        lead = self.take_lead(ids.numel() // max(k, 1))
        self.record.append(self.layer.name, ids.detach().reshape(*lead, k), self.layer.num_experts)


class _Replayer(_LayerTap):
    def __init__(self, layer: MoELayer, ids: torch.Tensor):
        super().__init__(layer)
        self.ids = ids
        self.position = 0

    def forced_ids(self, rows: int, k: int) -> torch.Tensor:
        lead, recorded = self.take_lead(rows), self.ids
        steps, left = lead[-1], recorded.shape[-2] - self.position
        if lead[:-1] != recorded.shape[:-2] or k != recorded.shape[-1] or steps > left:
            raise ValueError(
                f"replay: layer {self.layer.name!r} runs a forward of {tuple(lead)} tokens with k={k}; the record "
                f"holds ids {tuple(recorded.shape)} with {left} positions left from position {self.position}: "
                "the batch dims and k must match, and the positions suffice"
            )
        forced = recorded[..., self.position : self.position + steps, :]
        self.position += steps
        return forced.reshape(rows, k)


class ReplayProgress:
    """What :func:`replay` yields: ``position(layer)`` (positions consumed so far) and
    ``remaining(layer)`` (positions left) per layer name."""

    def __init__(self, replayers: dict[str, _Replayer]):
        self._replayers = replayers

    def position(self, layer: str) -> int:
        return self._replayers[layer].position

    def remaining(self, layer: str) -> int:
        replayer = self._replayers[layer]
        return replayer.ids.shape[-2] - replayer.position


@contextlib.contextmanager
def _tapped(layers: list[MoELayer], taps: list[_LayerTap]) -> Iterator[None]:
    """``taps[i]`` attached to ``layers[i]``'s router, with its pre-hook on the block, within."""
    hooks = []
    try:
        for layer, tap in zip(layers, taps):
            attach_tap(layer.router, tap)
            hooks.append(layer.block.register_forward_pre_hook(tap.before_block, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer, tap in zip(layers, taps):
            detach_tap(layer.router, tap)


@contextlib.contextmanager
def record(model: nn.Module) -> Iterator[RoutingRecord]:
    """``with record(model) as rec:`` fills ``rec`` (a :class:`RoutingRecord`) with the ids
    every MoE layer of ``model`` selects in the forwards run inside the block (replayed ids
    inside :func:`replay`). ``ValueError`` for a model without MoE layers this package drives."""
    layers = find_moe_layers(model, "replay.record")
    require_tapped(layers, "replay.record")
    result = RoutingRecord()
    with _tapped(layers, [_Recorder(layer, result) for layer in layers]):
        yield result


@contextlib.contextmanager
def replay(model: nn.Module, routing: RoutingRecord) -> Iterator[ReplayProgress]:
    """``with replay(model, routing):`` each forward inside the block selects, in every MoE layer,
    the recorded ids of its next positions (along ``S``; for flat inputs, the next rows); the
    weights are the live router's at those ids. Yields a :class:`ReplayProgress`.

    ``ValueError`` when the model's MoE layers are not the record's (names or E), when a router
    does not run this package's taps, when ``model`` is already replaying, and, from a forward,
    when its batch dims, k or positions do not fit what the record has left for a layer.
    """
    op = "replay.replay"
    if not isinstance(routing, RoutingRecord):
        raise TypeError(f"{op}: routing must be a RoutingRecord, got {type(routing).__name__}")
    layers = find_moe_layers(model, op)
    require_tapped(layers, op)
    names = [layer.name for layer in layers]
    if sorted(names) != sorted(routing.layers):
        raise ValueError(f"{op}: the model's MoE layers {names} are not the record's {routing.layers}")
    replayers = {}
    for layer in layers:
        if any(isinstance(tap, _Replayer) for tap in taps_of(layer.router)):
            raise ValueError(f"{op}: layer {layer.name!r} is already replaying (nested replay of one model)")
        if routing.num_experts(layer.name) != layer.num_experts:
            raise ValueError(
                f"{op}: layer {layer.name!r} has {layer.num_experts} experts, the record "
                f"{routing.num_experts(layer.name)}"
            )
        device = layer.router.weight.device  # moved once: no copy per forward
        replayers[layer.name] = _Replayer(layer, routing.ids(layer.name).to(device, torch.int32))
    with _tapped(layers, list(replayers.values())):
        yield ReplayProgress(replayers)
