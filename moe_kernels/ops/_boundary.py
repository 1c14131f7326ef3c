"""The one op boundary: a ``torch.library`` custom op, its fake, its registered autograd and the
equivalent eager ``torch.autograd.Function``, all built from one :class:`OpSpec`.

Each op states once:

- ``forward(*inputs) -> outputs`` and ``backward(*...) -> grads``: plain functions with type
  annotations (the schemas are inferred from them), that run the Triton launcher or the PyTorch
  reference; neither records autograd;
- ``fake(inputs)`` / ``backward_fake(inputs)``: the output shapes and dtypes, for ``torch.compile``
  (``inputs``: the forward's / the backward's arguments as a named tuple);
- ``save(ctx, inputs, outputs)``: what the backward needs (``inputs`` is a named tuple of the
  forward's arguments, so fields are read by name), and which outputs are not differentiable;
- ``grads(ctx, backward, *grad_outputs) -> {input name: gradient}``: calls ``backward`` (the
  registered backward op under ``torch.compile``, the plain function in eager mode) and names the
  gradient of each differentiable input; every other input gets None.

:func:`define_op` ``(forward, fake, backward, backward_fake, save, grads)`` registers
``moe_kernels::<name>`` and ``moe_kernels::<name>_backward`` (``<name>_forward`` being the forward's
name) and returns an :class:`Op` whose call picks the cheapest correct entry point:

- under ``torch.compile``: the registered op (opaque to the compiler, traced through its fake);
- eager, with an input that requires grad: the ``autograd.Function``, which has the registered
  op's forward and backward without the dispatcher (a registered op with autograd costs 20-100 us
  more per call on a 2-core CPU host, more than a routing kernel takes);
- eager, with nothing to differentiate: the forward itself.
"""

from __future__ import annotations

import collections
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OpSpec:
    """Everything :func:`define_op` needs to build one differentiable op (see the module doc)."""

    name: str
    forward: Callable
    fake: Callable
    backward: Callable
    backward_fake: Callable
    save: Callable[[Any, tuple, tuple], None]
    grads: Callable[..., dict]


class Op:
    """A registered differentiable op: call it with the forward's arguments.

    Attributes: ``op`` / ``backward_op`` (the ``torch.library`` custom ops), ``function`` (the
    eager ``autograd.Function``), ``forward`` / ``backward`` (the plain functions), ``names``
    (the forward's argument names). Every entry point calls ``self.forward`` / ``self.backward``
    at call time, so replacing them (the overhead benchmark's stub) reaches every door.
    """

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.forward = spec.forward
        self.backward = spec.backward
        self.names = tuple(inspect.signature(spec.forward).parameters)
        self.inputs = collections.namedtuple(f"{spec.name}_inputs", self.names)
        self.op = self._register(spec.name, spec.forward, "forward", spec.fake)
        self.backward_op = self._register(f"{spec.name}_backward", spec.backward, "backward", spec.backward_fake)
        self.op.register_autograd(self._registered_backward, setup_context=self._setup_context)
        self.function = self._make_function()
        # The positions of the forward's tensor arguments (from its annotations): the eager call
        # asks only these whether they require grad.
        hints = typing.get_type_hints(spec.forward)
        self._tensor_positions = tuple(
            i for i, name in enumerate(self.names) if "Tensor" in str(hints.get(name, "Tensor"))
        )
        # ``Function.apply`` without its Python wrapper (which only binds default arguments and
        # unwraps functorch's dead wrappers): used when no functorch transform is active.
        self._apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, self.function)

    def _register(self, name: str, function: Callable, attribute: str, fake: Callable):
        """The custom op ``moe_kernels::<name>``: a function with ``function``'s signature (the
        schema is inferred from it) that calls ``self.<attribute>``, and ``fake`` called with the
        arguments as a named tuple."""

        @functools.wraps(function)
        def call(*args):
            return getattr(self, attribute)(*args)

        signature = inspect.signature(function)
        named = collections.namedtuple(f"{name}_inputs", tuple(signature.parameters))

        def named_fake(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return fake(named(**bound.arguments))

        op = torch.library.custom_op(f"moe_kernels::{name}", call, mutates_args=())
        op.register_fake(named_fake)
        return op

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled():
            for i in self._tensor_positions:
                arg = args[i]
                if arg is not None and arg.requires_grad:
                    if torch._C._are_functorch_transforms_active():
                        return self.function.apply(*args)
                    return self._apply(*args)
        return self.forward(*args)

    def _input_grads(self, named: dict) -> tuple:
        unknown = set(named) - set(self.names)
        if unknown:  # a typo in an op's grads() would silently drop a gradient otherwise
            raise KeyError(f"{self.spec.name}: grads() named unknown inputs {sorted(unknown)}")
        return tuple(named.get(name) for name in self.names)

    def _setup_context(self, ctx, inputs, output):
        self.spec.save(ctx, self.inputs(*inputs), output if isinstance(output, tuple) else (output,))

    def _registered_backward(self, ctx, *grad_outputs):
        return self._input_grads(self.spec.grads(ctx, self.backward_op, *grad_outputs))

    def _make_function(self):
        op = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                outputs = op.forward(*args)
                op.spec.save(ctx, op.inputs(*args), outputs if isinstance(outputs, tuple) else (outputs,))
                return outputs

            @staticmethod
            def backward(ctx, *grad_outputs):
                return op._input_grads(op.spec.grads(ctx, op.backward, *grad_outputs))

        Function.__name__ = Function.__qualname__ = "".join(p.title() for p in self.spec.name.split("_")) + "Function"
        return Function


def define_op(
    forward: Callable, fake: Callable, backward: Callable, backward_fake: Callable, save: Callable, grads: Callable
) -> Op:
    """Register one op from the fields of :class:`OpSpec` but its name, which is the forward's
    (``<name>_forward``); returns its :class:`Op`."""
    name = forward.__name__.removesuffix("_forward")
    if name == forward.__name__:
        raise ValueError(f"define_op: the forward must be named <op name>_forward, got {forward.__name__!r}")
    return Op(OpSpec(name, forward, fake, backward, backward_fake, save, grads))
