"""The op registry: each operator declared once, with its signature, shape/dtype rule, parameters
and FLOPs. Backends key their lowerings by the same names.

An `OpDef` takes tensors first (node inputs), then attributes (compile-time values). Rules receive
an `OpCall` (the input types and bound attributes) and raise `OpError(message, arg=...)` on a
mismatch; the elaborator turns that into a located diagnostic pointing at the offending argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .dims import Dim
from .ir import FLOAT_DTYPES, Init, ParamSpec, TensorType

REQUIRED = object()

#: The most elements one parameter may have: what a tensor size can hold (int64).
MAX_PARAM_NUMEL = 2 ** 63 - 1

#: Argument kinds. Tensor kinds become node inputs; the rest become attributes.
TENSOR_KINDS = frozenset({"tensor", "tensor?", "tensors"})
ATTR_KINDS = frozenset({"int", "float", "number", "bool", "str", "dim", "dims", "axis", "axes", "op", "dtype", "owner", "any"})


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    default: Any = REQUIRED
    choices: tuple = ()
    variadic: bool = False  # collects the remaining positional arguments (e.g. reshape(x, B, T, -1))
    doc: str = ""
    #: False: the IR text omits the attribute while it has its default (an option added after IR texts
    #: were pinned, e.g. attention's kv_heads, so that existing specs print as before).
    shown: bool = True

    @property
    def is_tensor(self) -> bool:
        return self.kind in TENSOR_KINDS

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class OpError(Exception):
    """A shape, dtype or argument error raised by a rule; `arg` names the argument to point at."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.message = message
        self.arg = arg


@dataclass(frozen=True)
class OpCall:
    """What a rule sees: input tensor types and attributes by argument name."""

    op: str
    tensors: Mapping[str, Any]  # TensorType, list[TensorType] for 'tensors', or None for an absent 'tensor?'
    attrs: Mapping[str, Any]
    bounds: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)  # symbol -> (min, max)

    def t(self, name: str) -> Any:
        return self.tensors[name]

    def a(self, name: str) -> Any:
        return self.attrs[name]


Infer = Callable[[OpCall], "TensorType | tuple[TensorType, ...]"]
Params = Callable[[OpCall], "list[ParamSpec]"]
Flops = Callable[[OpCall, "tuple[TensorType, ...]"], Dim]


@dataclass(frozen=True)
class OpDef:
    name: str
    args: tuple[Arg, ...]
    infer: Infer
    params: Params | None = None
    flops: Flops | None = None
    doc: str = ""
    category: str = "tensor"
    #: For custom operators (specc.custom_op): the Python module that declares it. A spec can call
    #: it only when it imports that module (`imports:`), which the user must allow.
    module: str | None = None

    def arg(self, name: str) -> Arg | None:
        for a in self.args:
            if a.name == name:
                return a
        return None

    @property
    def tensor_args(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.is_tensor)

    def layer_params(self, call: OpCall) -> tuple[ParamSpec, ...]:
        """The parameters of a call of this op: its parameter rule's, with the float ones (f32, the
        rules' default) in the float dtype of the call's first float input, so that a layer applied to
        f64 values holds f64 weights. Integer buffers, parameters a rule gives another dtype on
        purpose, and the parameters of an op with no float input (embedding on integer ids) keep theirs."""
        if self.params is None:
            return ()
        return with_input_dtype(tuple(self.params(call)), input_float_dtype(self, call))

    def signature(self) -> str:
        parts = []
        for a in self.args:
            s = ("*" if a.variadic else "") + a.name
            if not a.required:
                d = a.default
                s += "=" + ("none" if d is None else str(d).lower() if isinstance(d, bool) else str(d))
            parts.append(s)
        return f"{self.name}({', '.join(parts)})"


REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    """Add an operator. A custom one may replace an operator of the same module (a module imported
    again re-declares its operators); any other name clash is a ValueError."""
    old = REGISTRY.get(opdef.name)
    if old is not None and not (opdef.module is not None and old.module == opdef.module):
        owner = "a built-in operator" if old.module is None else f"an operator of module '{old.module}'"
        raise ValueError(f"operator '{opdef.name}' is already registered ({owner})")
    REGISTRY[opdef.name] = opdef
    return opdef


def unregister(name: str) -> None:
    """Remove a custom operator (built-in ones stay)."""
    opdef = REGISTRY.get(name)
    if opdef is not None and opdef.module is None:
        raise ValueError(f"'{name}' is a built-in operator")
    REGISTRY.pop(name, None)


def op(name: str, *args: Arg, params: Params | None = None, flops: Flops | None = None,
       category: str = "tensor") -> Callable[[Infer], Infer]:
    """Decorator: declare an operator whose shape rule is the decorated function."""

    def deco(infer: Infer) -> Infer:
        register(OpDef(name, tuple(args), infer, params, flops, (infer.__doc__ or "").strip(), category))
        return infer

    return deco


def input_float_dtype(opdef: OpDef, call: OpCall) -> str | None:
    """The dtype of the first float tensor argument of `call` (in the op's argument order), or None."""
    for a in opdef.tensor_args:
        t = call.tensors.get(a.name)
        for x in (t if isinstance(t, (list, tuple)) else [t]):
            if isinstance(x, TensorType) and x.dtype in FLOAT_DTYPES:
                return x.dtype
    return None


def with_input_dtype(params: tuple[ParamSpec, ...], dtype: str | None) -> tuple[ParamSpec, ...]:
    """`params` with those of the default float dtype (f32) in `dtype` (a float dtype, or None: unchanged)."""
    if dtype is None or dtype == "f32":
        return params
    return tuple(dataclasses.replace(p, dtype=dtype) if p.dtype == "f32" else p for p in params)


def get(name: str) -> OpDef | None:
    return REGISTRY.get(name)


# Small helpers shared by rules -------------------------------------------------------------

def uniform_fan_in(fan_in: int) -> Init:
    """PyTorch's default for linear and conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return Init("uniform", (1.0 / fan_in ** 0.5 if fan_in > 0 else 0.0,))


def param(name: str, shape: tuple, init: Init, *, op: str, arg: str = "x") -> ParamSpec:
    """A ParamSpec whose shape must be concrete; a symbolic size is a user error."""
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool):
            raise OpError(f"{op}: parameter '{name}' would have symbolic size {d}; "
                          f"its size must be fixed by params, not by a symbolic dimension", arg)
        if d <= 0:
            raise OpError(f"{op}: parameter '{name}' would have size {d}; sizes must be positive", arg)
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_PARAM_NUMEL:
        raise OpError(f"{op}: parameter '{name}' would have {numel} elements; at most 2**63 - 1 can be stored",
                      arg)
    return ParamSpec(name, tuple(shape), init)
