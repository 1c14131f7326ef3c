"""The one op boundary: a ``torch.library`` custom op, its fake, its registered autograd and the
equivalent eager ``torch.autograd.Function``, all built from one :class:`OpSpec`.

Each op states once:

- ``forward(*inputs) -> outputs`` and ``backward(*...) -> grads``: plain functions with type
  annotations (the schemas are inferred from them), that run the Triton launcher or the PyTorch
  path; neither records autograd. A parameter annotated with an option record
  (:class:`~moe_kernels.config.RoutingConfig`, :class:`~moe_kernels.config.KnnMixing`: a class
  with ``OP_FIELDS``) takes the record itself; in the registered op's schema it stands as its
  ``OP_FIELDS``, flattened by ``op_args()`` on the way in and rebuilt by the cached
  ``from_op_args()`` on the way out (only the dispatcher path pays that: the eager paths pass the
  record through);
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


class _Flattening:
    """How a function's arguments cross a ``torch.library`` schema: each parameter annotated with
    an option record becomes the record's ``OP_FIELDS`` (see the module doc).

    ``signature``: the flat signature (annotations evaluated), which the schema is inferred from;
    :meth:`flatten` / :meth:`unflatten` map the function's arguments to the flat ones and back.
    Rebuilt records are kept by their flat values: a compiled graph calls the registered op, and
    every call rebuilds its records (one dict lookup each).
    """

    def __init__(self, function: Callable):
        hints = typing.get_type_hints(function)
        params = []
        self.records: tuple[tuple[int, type], ...] = ()  # (argument index, record class)
        self._spans: tuple[tuple[int, int, type], ...] = ()  # (start, end, class) in the flat arguments
        for index, param in enumerate(inspect.signature(function).parameters.values()):
            hint = hints.get(param.name, param.annotation)
            fields = getattr(hint, "OP_FIELDS", None)
            if fields is None:
                params.append(param.replace(annotation=hint))
                continue
            self.records += ((index, hint),)
            self._spans += ((len(params), len(params) + len(fields), hint),)
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            params += [inspect.Parameter(name, kind, annotation=field_type) for name, field_type in fields]
        self.signature = inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty))
        names = [param.name for param in params]
        if len(set(names)) != len(names):
            raise ValueError(f"{function.__name__}: a record's fields repeat an argument name: {names}")
        self._rebuilt: dict[tuple, object] = {}

    def flatten(self, args: tuple) -> tuple:
        """The flat arguments of the function's ``args``."""
        if len(self.records) == 1:  # the common case, written out (a call pays it on the dispatcher path)
            ((index, _),) = self.records
            return args[:index] + args[index].op_args() + args[index + 1 :]
        flat, done = (), 0
        for index, _ in self.records:
            flat += args[done:index] + args[index].op_args()
            done = index + 1
        return flat + args[done:] if done else args

    def flatten_grads(self, grads: tuple) -> tuple:
        """One gradient per flat argument: None for every field of a record (a record gets none)."""
        flat, done = (), 0
        for index, record in self.records:
            flat += grads[done:index] + (None,) * len(record.OP_FIELDS)
            done = index + 1
        return flat + grads[done:] if done else grads

    def unflatten(self, flat: tuple) -> tuple:
        """The function's arguments from the flat ones."""
        if len(self._spans) == 1:  # the common case, written out
            ((start, end, record),) = self._spans
            return flat[:start] + (self._rebuild(record, flat[start:end]),) + flat[end:]
        args, done = (), 0
        for start, end, record in self._spans:
            args += flat[done:start] + (self._rebuild(record, flat[start:end]),)
            done = end
        return args + flat[done:] if done else flat

    def _rebuild(self, record: type, values: tuple):
        """The record of these flat values, kept after its first rebuild."""
        try:
            return self._rebuilt[values]
        except KeyError:
            pass
        except TypeError:  # symbolic values (torch.compile's tracing) are unhashable
            values = tuple(map(_concrete, values))
            if values in self._rebuilt:
                return self._rebuilt[values]
        if len(self._rebuilt) >= _MAX_REBUILT:
            self._rebuilt.clear()
        rebuilt = self._rebuilt[values] = record.from_op_args(*values)
        return rebuilt


# Distinct records one op keeps rebuilt (a process uses a handful of routing configurations).
_MAX_REBUILT = 256


def _concrete(value):
    """A record field as a Python value. Under ``torch.compile(dynamic=True)`` an int option (say
    ``num_groups``) may reach the fake or the autograd setup as a symbolic int: it is specialised
    (a guard on its value; options are constants of a call site, so they do not recompile)."""
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.SymFloat):
        return float(value)
    if isinstance(value, torch.SymBool):
        return bool(value)
    return value


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
        self._forward_flat, self._backward_flat = _Flattening(spec.forward), _Flattening(spec.backward)
        self.op = self._register(spec.name, spec.forward, self._forward_flat, "forward", spec.fake)
        self.backward_op = self._register(
            f"{spec.name}_backward", spec.backward, self._backward_flat, "backward", spec.backward_fake
        )
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

    def _register(self, name: str, function: Callable, flattening: _Flattening, attribute: str, fake: Callable):
        """The custom op ``moe_kernels::<name>``: a function of ``function``'s flat signature (the
        schema is inferred from it) that calls ``self.<attribute>`` with the records rebuilt, and
        ``fake`` called with ``function``'s arguments as a named tuple."""

        if flattening.records:

            def call(*flat):
                return getattr(self, attribute)(*flattening.unflatten(flat))

        else:  # nothing to rebuild (most ops): the dispatcher's arguments are the function's

            def call(*flat):
                return getattr(self, attribute)(*flat)

        call.__name__ = call.__qualname__ = function.__name__
        call.__module__, call.__doc__ = function.__module__, function.__doc__
        call.__signature__ = flattening.signature
        named = collections.namedtuple(f"{name}_inputs", tuple(inspect.signature(function).parameters))

        def named_fake(*args, **kwargs):
            bound = flattening.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return fake(named(*flattening.unflatten(tuple(bound.arguments.values()))))

        op = torch.library.custom_op(f"moe_kernels::{name}", call, mutates_args=())
        op.register_fake(named_fake)
        return op

    def _call_backward_op(self, *args):
        """The registered backward op called with the backward's arguments (records unflattened)."""
        return self.backward_op(*self._backward_flat.flatten(args))

    def flat_args(self, args: tuple) -> tuple:
        """The registered op's arguments for the forward's ``args`` (option records flattened)."""
        return self._forward_flat.flatten(tuple(args))

    def flat_backward_args(self, args: tuple) -> tuple:
        """The registered backward op's arguments for the backward's ``args``."""
        return self._backward_flat.flatten(tuple(args))

    def registered(self, *args):
        """The registered op, through the dispatcher, called with the forward's arguments."""
        return self.op(*self._forward_flat.flatten(args))

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.registered(*args)
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
        args = self._forward_flat.unflatten(tuple(inputs))
        self.spec.save(ctx, self.inputs(*args), output if isinstance(output, tuple) else (output,))

    def _registered_backward(self, ctx, *grad_outputs):
        grads = self._input_grads(self.spec.grads(ctx, self._call_backward_op, *grad_outputs))
        return self._forward_flat.flatten_grads(grads)

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
