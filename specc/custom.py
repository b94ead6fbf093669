"""Custom operators from Python: `@specc.custom_op(...)` declares an operator (signature, shape
rule, parameters, FLOPs) and its PyTorch implementation, in a module of the user's.

    # my_ops.py
    import specc, torch

    def scaled_tanh(x, alpha=1.0, weight=None):           # the PyTorch implementation
        return torch.tanh(alpha * x) * weight

    @specc.custom_op("scaled_tanh", args=["x", ("alpha", "float", 1.0)],
                     params=lambda c: {"weight": (c.t("x").shape[-1],)}, torch=scaled_tanh)
    def _(c):                                              # the shape rule
        return c.t("x")

A spec calls it only when it declares `imports: [my_ops]` and the user allows that import
(`specc build --allow-import my_ops`, `specc.load(..., allow_imports=["my_ops"])`). The generated
model.py then imports `my_ops` too, and calls `my_ops.scaled_tanh(x, alpha=..., weight=...)`: tensor
arguments positionally, attributes and the op's parameters by keyword. Such a model.py depends on
that module being importable where it runs.
"""

from __future__ import annotations

import keyword
import math
import sys
from typing import Any, Callable, Iterable, Mapping

from specc.backends.pytorch.lowering import LOWERINGS, custom_lowering
from specc.compiler.elaborate import CALL_OPTIONS, CONST_FUNCS
from specc.compiler.ir import DTYPES, Init, ParamSpec, TensorType
from specc.compiler.registry import (REGISTRY, REQUIRED, Arg, OpCall, OpDef, OpError, param, register,
                                     unregister as _unregister)
from specc.dsl.schema import IDENT, RESERVED, check_module_name

#: Argument kinds a custom operator may take (values the generated code can spell).
KINDS = frozenset({"tensor", "tensor?", "tensors", "int", "float", "number", "bool", "str", "dim", "dims", "axis",
                   "axes", "dtype"})


def custom_op(name: str, args: Iterable[Any] = ("x",), infer: Callable[[OpCall], Any] | None = None,
              params: Callable[[OpCall], Any] | None = None, flops: Callable[[OpCall, tuple], Any] | None = None,
              torch: Callable | str | None = None, doc: str | None = None, module: str | None = None):
    """Declare the custom operator `name`.

    args: its arguments in order: a name (a tensor), (name, kind) or (name, kind, default), or an
        `Arg`. Kinds: tensor, tensor?, tensors, int, float, number, bool, str, dim, dims, axis,
        axes, dtype. Tensors come first.
    infer: the shape rule, `infer(call) -> TensorType` (or a tuple of them): `call.t("x")` is an
        input's TensorType, `call.a("alpha")` an attribute; raise `specc.OpError(message, arg)` on
        a bad call (the spec then gets a located error at that argument). With infer=None,
        custom_op is a decorator for the shape rule.
    params: `params(call) -> {name: shape}` (or {name: (shape, Init)}, or a list of ParamSpec): the
        layer's parameters. Default initialisers: uniform(1/sqrt(fan_in)) for 2-D and larger, zeros
        otherwise; a spec may choose others with init= / bias_init=.
    flops: `flops(call, outputs) -> int` (default 0).
    torch: the PyTorch implementation, a function at the top level of an importable module (or its
        name in `module`), called as fn(*tensors, **attributes, **parameters).
    module: the module that declares the operator (default: the shape rule's module); a spec must
        import it (or a package above it) to call the operator.

    Returns the shape rule when used as a decorator, else the registered OpDef. Raises ValueError
    on a bad declaration.
    """

    def declare(rule: Callable[[OpCall], Any]) -> OpDef:
        return _declare(name, args, rule, params, flops, torch, doc, module)

    if infer is not None:
        return declare(infer)

    def decorator(rule: Callable[[OpCall], Any]) -> Callable[[OpCall], Any]:
        declare(rule)
        return rule

    return decorator


def unregister(name: str) -> None:
    """Remove a custom operator (and its PyTorch lowering)."""
    _unregister(name)
    LOWERINGS.pop(name, None)


def _declare(name, args, rule, params, flops, torch, doc, module) -> OpDef:
    if not isinstance(name, str) or not IDENT.fullmatch(name) or keyword.iskeyword(name) or name.startswith("_"):
        raise ValueError(f"custom_op: {name!r} is not a valid operator name (letters, digits and '_')")
    if name in RESERVED or name in CONST_FUNCS or name in DTYPES or name in ("identity", "repeat"):
        raise ValueError(f"custom_op: '{name}' is a word of the spec language and cannot name an operator")
    if not callable(rule):
        raise ValueError(f"custom_op '{name}': the shape rule must be a function")
    module = module or getattr(rule, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        raise ValueError(f"custom_op '{name}': declare custom operators in an importable module (not __main__), "
                         f"which a spec names under imports:")
    check_module_name(module)
    arglist = tuple(_arg(name, a) for a in args)
    seen: set[str] = set()
    for a in arglist:
        if a.name in seen:
            raise ValueError(f"custom_op '{name}': argument '{a.name}' is declared twice")
        seen.add(a.name)
    first_attr = next((i for i, a in enumerate(arglist) if not a.is_tensor), len(arglist))
    if any(a.is_tensor for a in arglist[first_attr:]):
        raise ValueError(f"custom_op '{name}': tensor arguments must come before the others")
    fn_module, fn_name = _torch_function(name, torch, module)
    opdef = OpDef(name, arglist, _checked_rule(name, rule), _params_rule(name, params) if params else None,
                  _flops_rule(flops), (doc or rule.__doc__ or f"custom operator from {module}").strip(),
                  "custom", module)
    old = REGISTRY.get(name)
    register(opdef)  # raises on a clash with a built-in or another module's operator
    try:
        LOWERINGS[name] = custom_lowering(fn_module, fn_name, arglist)
    except ValueError:
        if old is None:
            _unregister(name)
        else:
            REGISTRY[name] = old
        raise
    return opdef


def _arg(op: str, a: Any) -> Arg:
    if isinstance(a, Arg):
        arg = a
    elif isinstance(a, str):
        arg = Arg(a, "tensor")
    elif isinstance(a, (tuple, list)) and 2 <= len(a) <= 3:
        arg = Arg(a[0], a[1], a[2] if len(a) == 3 else REQUIRED)
    else:
        raise ValueError(f"custom_op '{op}': an argument is a name, (name, kind), (name, kind, default) or an Arg, "
                         f"not {a!r}")
    if not isinstance(arg.name, str) or not IDENT.fullmatch(arg.name) or keyword.iskeyword(arg.name):
        raise ValueError(f"custom_op '{op}': {arg.name!r} is not a valid argument name")
    if arg.name in CALL_OPTIONS:
        raise ValueError(f"custom_op '{op}': '{arg.name}' is a call option of every layer; choose another name")
    if arg.kind not in KINDS:
        raise ValueError(f"custom_op '{op}': argument '{arg.name}' has kind {arg.kind!r}; kinds: "
                         f"{', '.join(sorted(KINDS))}")
    if arg.variadic:
        raise ValueError(f"custom_op '{op}': variadic arguments are not supported; use kind 'tensors' or 'dims'")
    return arg


def _torch_function(op: str, fn: Callable | str | None, module: str) -> tuple[str, str]:
    """(module, name) by which generated code calls the PyTorch implementation."""
    if fn is None:
        raise ValueError(f"custom_op '{op}': torch= (the PyTorch implementation) is required")
    if isinstance(fn, str):
        return module, fn
    fn_module, fn_name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(fn_module, str) or fn_module == "__main__" or not isinstance(fn_name, str):
        raise ValueError(f"custom_op '{op}': torch= must be a function of an importable module (not __main__)")
    check_module_name(fn_module)
    owner = sys.modules.get(fn_module)
    if "." in fn_name or owner is None or getattr(owner, fn_name, None) is not fn:
        raise ValueError(f"custom_op '{op}': torch= must be a function defined at the top level of its module "
                         f"({fn_module}), so that generated code can call {fn_module}.{fn_name}")
    return fn_module, fn_name


def _checked_rule(op: str, rule: Callable[[OpCall], Any]) -> Callable[[OpCall], Any]:
    """The user's shape rule; its failures become located errors of the spec, never tracebacks."""

    def infer(call: OpCall):
        try:
            out = rule(call)
        except OpError:
            raise
        except Exception as e:  # a bug in the rule, or a call it does not handle
            raise OpError(f"{op}: the shape rule raised {type(e).__name__}: {e}") from None
        outs = out if isinstance(out, tuple) else (out,)
        if not outs or not all(isinstance(t, TensorType) for t in outs):
            raise OpError(f"{op}: the shape rule must return a TensorType (or a tuple of them), "
                          f"got {type(out).__name__}")
        for t in outs:
            if t.dtype not in DTYPES:
                raise OpError(f"{op}: the shape rule returned the unknown dtype {t.dtype!r}")
        return out

    return infer


def _params_rule(op: str, params: Callable[[OpCall], Any]) -> Callable[[OpCall], list[ParamSpec]]:
    def rule(call: OpCall) -> list[ParamSpec]:
        try:
            out = params(call)
        except OpError:
            raise
        except Exception as e:
            raise OpError(f"{op}: the parameter rule raised {type(e).__name__}: {e}") from None
        specs: list[ParamSpec] = []
        if isinstance(out, Mapping):
            for pname, value in out.items():
                shape, init = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Init) \
                    else (value, None)
                shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
                if init is None:
                    fan_in = math.prod(d for d in shape[1:] if isinstance(d, int)) if len(shape) >= 2 else 0
                    init = Init("uniform", (1.0 / math.sqrt(fan_in),)) if fan_in > 0 else Init("zeros")
                specs.append(param(str(pname), shape, init, op=op))
        else:
            specs = list(out)
        for p in specs:
            if not isinstance(p, ParamSpec) or not IDENT.fullmatch(p.name) or keyword.iskeyword(p.name) \
                    or p.buffer or p.tied_to:
                raise OpError(f"{op}: the parameter rule must give plain parameters named by identifiers, "
                              f"got {p!r}")
        if len({p.name for p in specs}) != len(specs):
            raise OpError(f"{op}: the parameter rule gives two parameters of the same name")
        return specs

    return rule


def _flops_rule(flops: Callable | None) -> Callable:
    if flops is None:
        return lambda call, outs: 0
    return lambda call, outs: flops(call, outs)


__all__ = ["custom_op", "unregister", "Arg", "OpCall", "OpError", "TensorType", "Init", "ParamSpec"]
