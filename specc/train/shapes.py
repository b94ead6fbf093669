"""The loss and the metrics checked without torch: every sub-expression's shape and dtype.

`specc check` evaluates a recipe's tensor expressions over `Abstract` values (a shape of concrete sizes
and a torch dtype name) in place of tensors, with torch's own rules: broadcasting, type promotion
(`result_type`), matmul, indexing, and a rule for each function of `expr.TENSOR_FUNCTIONS`. A problem
that would certainly make the real evaluation fail (shapes that do not broadcast, class targets of the
wrong shape or dtype, a loss that is not a single float) is a `Problem`, located at the sub-expression.
Where the outcome depends on values the check does not know (a scalar that changes with the step, a
tensor used as an index, a reshape to sizes that hold the batch), the value is `UNKNOWN` and nothing
later is reported: a problem found here is always one that `specc train` would hit. The batch axis
stands as the prime size `recipe.BATCH`, so that it never equals another axis by chance.

`tests/test_train_shapes.py` runs random expressions both ways (here and through torch) and requires the
same shapes and dtypes, and a failure in torch wherever this module reports one.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from specc.dsl import ast as A
from specc.dsl.diagnostics import Span

from .expr import INF, TENSOR_FUNCTIONS, ExprError, _binop_at, _kind


@dataclass(frozen=True)
class Abstract:
    """A tensor known by its shape and dtype (a torch dtype name: float32, int64, bool, ...)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Unknown:
    """A value the check cannot know; everything computed from it is unknown too."""

    def __repr__(self) -> str:
        return "UNKNOWN"


class _Number:
    """A number known only to be one: a `scalars:` entry or the step, which change during training."""

    def __repr__(self) -> str:
        return "NUMBER"


UNKNOWN, NUMBER = _Unknown(), _Number()


class Problem(Exception):
    """Why an operation would fail (turned into an ExprError at the call that failed)."""


# -- dtypes ------------------------------------------------------------------------------------------

_INTS = ("uint8", "int8", "int16", "int32", "int64")
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_BITS = {"uint8": 8, "int8": 8, "int16": 16, "int32": 32, "int64": 64,
         "float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def is_float(dtype: str) -> bool:
    return dtype in _FLOATS


def is_int(dtype: str) -> bool:
    return dtype in _INTS


def promote(a: str, b: str) -> str:
    """torch.promote_types(a, b)."""
    if a == b:
        return a
    if a == "bool" or b == "bool":
        return b if a == "bool" else a
    if is_float(a) != is_float(b):
        return a if is_float(a) else b
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    if {a, b} == {"uint8", "int8"}:
        return "int16"
    return a if _BITS[a] >= _BITS[b] else b


def _combine(higher: str | None, lower: str | None) -> str | None:
    """torch's combine_categories: the dimensioned operands' dtype unless a lower-priority group is of a
    higher category."""
    if higher is None:
        return lower
    if lower is None or is_float(higher):
        return higher
    if higher == "bool" or is_float(lower):
        return promote(higher, lower)
    return higher


def _scalar_dtype(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "int64" if isinstance(v, int) else "float32"


def result_type(*operands: Any) -> str:
    """torch.result_type over tensors (Abstract) and Python numbers: dimensioned tensors first, then
    zero-dimensional ones, then numbers, a later group counting only when of a higher category."""
    groups: list[str | None] = [None, None, None]
    for v in operands:
        i, d = (0 if v.shape else 1, v.dtype) if isinstance(v, Abstract) else (2, _scalar_dtype(v))
        groups[i] = d if groups[i] is None else promote(groups[i], d)
    out = _combine(groups[0], _combine(groups[1], groups[2]))
    assert out is not None
    return out


# -- shapes ------------------------------------------------------------------------------------------

def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        sizes = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0} - {1}
        if len(sizes) > 1:
            raise Problem("shapes " + " and ".join(show(s) for s in shapes) + " do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def broadcast_to(shape: tuple[int, ...], to: tuple[int, ...], what: str) -> None:
    if len(shape) > len(to) or any(a not in (1, b) for a, b in zip(reversed(shape), reversed(to))):
        raise Problem(f"{what} {show(shape)} does not broadcast to {show(to)}")


def show(shape: tuple[int, ...]) -> str:
    """A shape for a message, the batch axis by its name (`batch_named`)."""
    from .recipe import BATCH

    name = BATCH_NAME.get()

    def dim(d: int) -> str:
        if d and d % BATCH == 0:
            return name if d == BATCH else f"{d // BATCH} * {name}"
        return str(d)

    return "[" + ", ".join(dim(d) for d in shape) + "]"


#: The batch axis's name in messages, while a recipe's expressions are checked (`batch_named`).
BATCH_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("specc_batch_name", default="B")


@contextlib.contextmanager
def batch_named(name: str) -> Iterator[None]:
    """Within: messages (`show`) call the batch axis `name`, the spec's symbol for it."""
    token = BATCH_NAME.set(name)
    try:
        yield
    finally:
        BATCH_NAME.reset(token)


def _holds_batch(shape: tuple[int, ...]) -> bool:
    from .recipe import BATCH

    return math.prod(shape) % BATCH == 0 and math.prod(shape) > 0


def _axis(dim: Any, rank: int) -> int:
    """A dim argument as a non-negative axis (torch's wrap of -rank..rank-1; a 0-d tensor takes -1 and 0)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise _Stop
    n = max(rank, 1)
    if not -n <= dim < n:
        raise Problem(f"dim {dim} is out of range for a tensor of {rank} axes")
    return dim % n


class _Stop(Exception):
    """The outcome depends on something unknown: the value is UNKNOWN."""


def _tensor(x: Any, what: str) -> Abstract:
    if isinstance(x, Abstract):
        return x
    if x is UNKNOWN:
        raise _Stop
    kind = "float" if x is NUMBER else type(x).__name__
    raise Problem(f"{what} must be a tensor, got {kind}")


# -- the functions -------------------------------------------------------------------------------------

def _reduce(v: Abstract, mask: Any) -> Abstract:
    if mask is None:
        if not is_float(v.dtype):
            raise Problem(f"the mean of a {v.dtype} tensor (the mean needs floats; give float data or a mask)")
        return Abstract((), v.dtype)
    mask = _tensor(mask, "mask")
    broadcast_to(mask.shape, v.shape, "the mask")
    return Abstract((), v.dtype if is_float(v.dtype) else "float32")


def _difference(prediction: Any, target: Any) -> Abstract:
    p, t = _tensor(prediction, "prediction"), _tensor(target, "target")
    if p.dtype == "bool":
        raise Problem("the prediction is a bool tensor (subtraction of bool tensors is not supported)")
    return Abstract(broadcast(p.shape, t.shape), p.dtype)


def _classes(logits: Any, target: Any) -> tuple[Abstract, Abstract]:
    from .expr import class_problem, target_problem

    lg, t = _tensor(logits, "logits"), _tensor(target, "target")
    problem = class_problem(lg.shape, t.shape, is_float(t.dtype), show) or target_problem(t.dtype)
    if problem:
        raise Problem(problem)
    return lg, t


def _softmaxable(x: Abstract, what: str) -> None:
    if not is_float(x.dtype):
        raise Problem(f"{what} must be floats, got {x.dtype}")


def _known(*values: Any) -> None:
    if any(v is UNKNOWN or v is NUMBER for v in values):
        raise _Stop


def mse(prediction, target, mask=None):
    return _reduce(_difference(prediction, target), mask)


def cross_entropy(logits, target, mask=None, smoothing=0.0):
    lg, t = _classes(logits, target)
    _softmaxable(lg, "logits")
    _known(smoothing)
    from .expr import smoothing_problem

    problem = smoothing_problem(smoothing, is_float(t.dtype))
    if problem:
        raise Problem(problem)
    dtype = promote(t.dtype, lg.dtype) if is_float(t.dtype) else lg.dtype
    return _reduce(Abstract(lg.shape[:-1], dtype), mask)


def kl(logits, target_logits, temperature=1.0, mask=None):
    lg, t = _tensor(logits, "logits"), _tensor(target_logits, "target_logits")
    if lg.shape != t.shape:
        raise Problem(f"logits {show(lg.shape)} and target_logits {show(t.shape)} differ")
    _known(temperature)
    if not lg.shape or not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise _Stop

    def scaled(d: str) -> str:  # logits / temperature
        return d if is_float(d) else "float32"

    return _reduce(Abstract(lg.shape[:-1], promote(scaled(lg.dtype), scaled(t.dtype))), mask)


def _hard_classes(logits: Any, target: Any) -> tuple[Abstract, Abstract]:
    lg, t = _classes(logits, target)
    if is_float(t.dtype):
        raise _Stop  # arg-max classes against probabilities: left to torch
    if lg.dtype == "bool":
        raise Problem("logits must be numbers, got bool")
    return lg, t


def accuracy(logits, target, mask=None):
    lg, t = _hard_classes(logits, target)
    return _reduce(Abstract(lg.shape[:-1], "float32"), mask)


def exact_match(logits, target, mask=None):
    lg, t = _hard_classes(logits, target)
    if len(lg.shape) < 2:
        raise Problem(f"logits {show(lg.shape)} have no sample axis")
    if mask is not None:
        broadcast_to(_tensor(mask, "mask").shape, lg.shape[:-1], "the mask")
    return Abstract((), "float32")


def _pairs(x: Any, y: Any) -> tuple[Abstract, Abstract]:
    x, y = _tensor(x, "x"), _tensor(y, "y")
    if len(x.shape) != 3 or y.shape != x.shape[:2]:
        raise Problem(f"expected x [B, N + 1, d] and y [B, N + 1], got {show(x.shape)} and {show(y.shape)}")
    return x, y


def gd_step(x, y, lr=None):
    x, y = _pairs(x, y)
    if x.dtype == "bool" or y.dtype == "bool" or x.shape[1] < 2:
        raise _Stop
    return Abstract(x.shape[:1], "float32")


def _regression(x, y, prefixes):
    x, y = _pairs(x, y)
    if not is_float(x.dtype) or not is_float(y.dtype):
        raise Problem(f"x and y must be float tensors, got {x.dtype} and {y.dtype}")
    _known(prefixes)
    if not isinstance(prefixes, bool):
        raise Problem(f"prefixes must be true or false, got {prefixes!r}")
    return Abstract(x.shape[:2] if prefixes else x.shape[:1], x.dtype)


def ols(x, y, prefixes=False):
    return _regression(x, y, prefixes)


def ridge(x, y, lam, prefixes=False):
    _known(lam)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise Problem(f"lam must be a positive number, got {lam!r} (for lam = 0 use ols(x, y))")
    return _regression(x, y, prefixes)


def concat(items, dim=0):
    if items is UNKNOWN:
        raise _Stop
    if not isinstance(items, list) or not items:
        raise Problem("concat takes a list of tensors, e.g. concat([a, b])")
    ts = [_tensor(i, "each item") for i in items]
    ts = [t for t in ts if t.shape != (0,)] or ts[:1]  # torch skips empty 1-d tensors
    rank = len(ts[0].shape)
    if rank == 0:
        raise Problem("concat needs tensors with at least one axis")
    axis = _axis(dim, rank)
    for t in ts[1:]:
        if len(t.shape) != rank:
            raise Problem(f"concat: tensors of {rank} and {len(t.shape)} axes")
        for i, (a, b) in enumerate(zip(ts[0].shape, t.shape)):
            if i != axis and a != b:
                raise Problem(f"concat along dim {dim}: shapes {show(ts[0].shape)} and {show(t.shape)} "
                              f"differ in axis {i}")
    shape = list(ts[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ts)
    return Abstract(tuple(shape), result_type(*ts))


def _reduced(x: Abstract, dim: Any, dtype: str) -> Abstract:
    if dim is None:
        return Abstract((), dtype)
    dims = dim if isinstance(dim, list) else [dim]
    if not dims:
        raise _Stop
    axes = {_axis(d, len(x.shape)) for d in dims}
    if len(axes) != len(dims):
        raise Problem(f"dim {dim} names an axis twice")
    return Abstract(tuple(s for i, s in enumerate(x.shape) if i not in axes), dtype)


def mean(x, dim=None):
    return _reduced(_tensor(x, "x"), dim, "float32")


def sum_(x, dim=None):
    x = _tensor(x, "x")
    return _reduced(x, dim, x.dtype if is_float(x.dtype) else "int64")


def where(cond, a, b):
    c = _tensor(cond, "cond")
    if not all(isinstance(v, (Abstract, int, float)) for v in (a, b)):
        raise _Stop  # unknown, or a scalar of unknown value
    shapes = [v.shape for v in (c, a, b) if isinstance(v, Abstract)]
    return Abstract(broadcast(*shapes), result_type(a, b))


def one_hot(ids, num):
    ids = _tensor(ids, "ids")
    if not is_int(ids.dtype):
        raise Problem(f"ids must be an integer tensor, got {ids.dtype}")
    _known(num)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise Problem(f"num must be a positive whole number, got {num!r}")
    return Abstract(ids.shape + (num,), "float32")


def detach(x):
    return _tensor(x, "x")


def _softmax(x, dim=-1):
    x = _tensor(x, "x")
    _softmaxable(x, "x")
    _axis(dim, len(x.shape))
    return x


def argmax(x, dim=-1):
    x = _tensor(x, "x")
    if x.dtype == "bool":
        raise Problem("argmax does not take a bool tensor")
    if dim is None:
        return Abstract((), "int64")
    return _reduced(x, dim, "int64")


def transpose(x, dim0, dim1):
    x = _tensor(x, "x")
    a, b = _axis(dim0, len(x.shape)), _axis(dim1, len(x.shape))
    if not x.shape:
        return x
    shape = list(x.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return Abstract(tuple(shape), x.dtype)


def reshape(x, *shape):
    x = _tensor(x, "x")
    if len(shape) == 1 and isinstance(shape[0], list):
        shape = tuple(shape[0])
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise _Stop
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        raise _Stop
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known == 0 or x.numel % known:
            raise _Stop if _holds_batch(x.shape) else Problem(
                f"cannot reshape {show(x.shape)} ({x.numel} values) to {list(shape)}")
        shape = tuple(x.numel // known if s == -1 else s for s in shape)
    elif known != x.numel:
        if _holds_batch(x.shape):
            raise _Stop  # sizes written for the real batch
        raise Problem(f"cannot reshape {show(x.shape)} ({x.numel} values) to {list(shape)}")
    return Abstract(tuple(shape), x.dtype)


def _math(name: str, fn: Callable[[float], float], keeps_ints: bool = False):
    def rule(x):
        if isinstance(x, Abstract):
            if x.dtype == "bool" and keeps_ints:
                raise Problem(f"{name} of a bool tensor is not supported")
            return Abstract(x.shape, x.dtype if is_float(x.dtype) or keeps_ints else "float32")
        if x is NUMBER or x is UNKNOWN:
            return x
        if isinstance(x, (int, float)):
            try:
                return fn(x)
            except (ValueError, OverflowError) as e:
                raise Problem(f"{name}({x!r}): {e}") from None
        raise Problem(f"x must be a tensor or a number, got {type(x).__name__}")
    return rule


def _float(x):
    if isinstance(x, Abstract):
        return Abstract(x.shape, "float32")
    if x is NUMBER or x is UNKNOWN:
        return x
    if isinstance(x, (int, float)):
        return float(x)
    raise _Stop


#: The rule of each tensor function (the keys of expr.TENSOR_FUNCTIONS, whose signatures bind the call).
RULES: dict[str, Callable[..., Any]] = {
    "mse": mse, "l1": mse, "cross_entropy": cross_entropy, "kl": kl, "accuracy": accuracy,
    "exact_match": exact_match, "gd_step": gd_step, "ols": ols, "ridge": ridge, "concat": concat,
    "mean": mean, "sum": sum_, "where": where, "one_hot": one_hot, "detach": detach,
    "softmax": _softmax, "log_softmax": _softmax, "argmax": argmax, "transpose": transpose, "reshape": reshape,
    "abs": _math("abs", abs, keeps_ints=True), "exp": _math("exp", math.exp), "log": _math("log", math.log),
    "sqrt": _math("sqrt", math.sqrt),
    "float": lambda x: _float(x),
}


# -- operators -------------------------------------------------------------------------------------------

def _matmul(a: Abstract, b: Abstract) -> Abstract:
    if not a.shape or not b.shape:
        raise Problem("matmul needs tensors with at least one axis")
    if a.dtype != b.dtype:
        raise Problem(f"matmul of {a.dtype} and {b.dtype} tensors (convert one with float())")
    if a.dtype == "bool":
        raise Problem("matmul of bool tensors is not supported")
    x, y = a.shape, b.shape
    if x[-1] != (y[0] if len(y) == 1 else y[-2]):
        raise Problem(f"matmul: {show(x)} @ {show(y)}: the inner sizes {x[-1]} and "
                      f"{y[0] if len(y) == 1 else y[-2]} differ")
    if len(x) == 1 and len(y) == 1:
        return Abstract((), a.dtype)
    if len(y) == 1:
        return Abstract(x[:-1], a.dtype)
    if len(x) == 1:
        return Abstract(y[:-2] + y[-1:], a.dtype)
    return Abstract(broadcast(x[:-2], y[:-2]) + (x[-2], y[-1]), a.dtype)


def binop(op: str, a: Any, b: Any) -> Any:
    """`a op b` where a tensor is involved."""
    for v in (a, b):
        if not isinstance(v, (Abstract, int, float)) and v is not NUMBER:
            if op in ("==", "!="):
                raise _Stop
            raise Problem(f"'{op}' needs numbers or tensors, got {_kind(v)}")
    if a is NUMBER or b is NUMBER:  # a float of unknown value
        a, b = (0.5 if v is NUMBER else v for v in (a, b))
    if op == "@":
        if not (isinstance(a, Abstract) and isinstance(b, Abstract)):
            raise Problem("'@' needs two tensors")
        return _matmul(a, b)
    shape = broadcast(*(v.shape for v in (a, b) if isinstance(v, Abstract)))
    dtype = result_type(a, b)
    if op in ("==", "!=", "<", "<=", ">", ">="):
        return Abstract(shape, "bool")
    if op in ("and", "or"):
        if is_float(dtype):
            raise Problem(f"'{op}' takes bool or integer tensors, got {dtype}")
        return Abstract(shape, dtype)
    if op == "/":
        return Abstract(shape, dtype if is_float(dtype) else "float32")
    if dtype == "bool" and op in ("//", "%", "**") and not (isinstance(a, Abstract) and isinstance(b, Abstract)):
        raise _Stop  # a bool tensor and a Python bool: torch takes some of these
    if dtype == "bool" and op != "+" and op != "*":
        raise Problem(f"'{op}' on bool tensors is not supported" + (
            " (to invert a mask use `not`)" if op == "-" else ""))
    if op == "-" and any(isinstance(v, bool) or isinstance(v, Abstract) and v.dtype == "bool" for v in (a, b)):
        raise Problem("'-' with a bool is not supported on tensors (to invert a mask use `not`)")
    if op in ("//", "%", "**") and not is_float(dtype):
        raise _Stop  # a zero divisor or a negative power of integers fails on values
    return Abstract(shape, dtype)


# -- the interpreter ------------------------------------------------------------------------------------

def abstract_eval(e: A.Expr, env: Mapping[str, Any]) -> Any:
    """The abstract value of `e` over `env` (names to Abstract, NUMBER, UNKNOWN or constants); raises
    ExprError located at the sub-expression that would fail."""
    try:
        return _eval(e, env)
    except _Stop:
        return UNKNOWN


def _at(span: Span, thunk: Callable[[], Any], args: list[Any], name: str | None = None) -> Any:
    try:
        return thunk()
    except Problem as p:
        if any(isinstance(a, Abstract) and a.numel == 0 for a in args):
            raise _Stop from None  # torch checks little on empty tensors
        raise ExprError(span, f"{name + ': ' if name else ''}{p}") from None


def _eval(e: A.Expr, env: Mapping[str, Any]) -> Any:
    if isinstance(e, A.Const):
        return e.value
    if isinstance(e, A.Name):
        if e.id in env:
            return env[e.id]
        if e.id == INF:
            return math.inf
        raise _Stop  # reported by the name check
    if isinstance(e, A.ListExpr):
        return [_eval(i, env) for i in e.items]
    if isinstance(e, A.Unary):
        v = _eval(e.operand, env)
        if v is UNKNOWN:
            raise _Stop
        if isinstance(v, Abstract):
            if e.op == "not":
                if is_float(v.dtype):
                    raise ExprError(e.span, "'not' takes bool or integer tensors, got " + v.dtype)
                return v
            if e.op == "-" and v.dtype == "bool":
                raise ExprError(e.span, "'-' of a bool tensor is not supported (to invert a mask use `not`)")
            return v
        if v is NUMBER:
            return NUMBER
        if e.op == "not":
            return not v
        try:
            return -v if e.op == "-" else +v
        except TypeError as err:
            raise ExprError(e.span, str(err)) from None
    if isinstance(e, A.BinOp):
        a, b = _eval(e.left, env), _eval(e.right, env)
        if a is UNKNOWN or b is UNKNOWN:
            raise _Stop
        if isinstance(a, Abstract) or isinstance(b, Abstract):
            return _at(e.span, lambda: binop(e.op, a, b), [a, b])
        if e.op in ("and", "or") and (a is NUMBER or b is NUMBER):
            return UNKNOWN
        if a is NUMBER or b is NUMBER:  # the operator's failures on any number (a stand-in), else NUMBER
            try:
                _binop_at(e, *(0.5 if v is NUMBER else v for v in (a, b)))
            except (TypeError, ValueError, OverflowError) as err:
                raise ExprError(e.span, str(err)) from None
            return NUMBER if e.op not in ("and", "or", "==", "!=", "<", "<=", ">", ">=") else UNKNOWN
        if e.op in ("and", "or"):
            return (a and b) if e.op == "and" else (a or b)
        try:
            return _binop_at(e, a, b)
        except (TypeError, ValueError, OverflowError) as err:
            raise ExprError(e.span, str(err)) from None
    if isinstance(e, A.IfExp):
        cond = _eval(e.cond, env)
        if isinstance(cond, Abstract):
            raise ExprError(e.cond.span, "a condition must be a number, not a tensor (use where() on tensors)")
        if cond is UNKNOWN or cond is NUMBER:  # changes during training: both branches run
            then, other = abstract_eval(e.then, env), abstract_eval(e.other, env)
            if then == other:
                return then
            raise _Stop
        return _eval(e.then if cond else e.other, env)
    if isinstance(e, A.Index):
        value = _eval(e.value, env)
        items = [_item(i, env) for i in e.items]
        if not isinstance(value, Abstract):
            raise _Stop
        return _index(value, items, e)
    if isinstance(e, A.Call):
        name = e.func_name
        if name not in RULES:
            raise _Stop
        args = [_eval(a, env) for a in e.args]
        kwargs = {k.name: _eval(k.value, env) for k in e.kwargs}
        signature = inspect.signature(TENSOR_FUNCTIONS[name].fn)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            raise _Stop from None  # reported by the name check
        bound.apply_defaults()
        params = signature.parameters
        pos = [bound.arguments[p] for p, v in params.items() if v.kind == v.POSITIONAL_OR_KEYWORD]
        star = [a for p, v in params.items() if v.kind == v.VAR_POSITIONAL for a in bound.arguments.get(p, ())]
        kw = {p: bound.arguments[p] for p, v in params.items() if v.kind == v.KEYWORD_ONLY}
        every = [*args, *kwargs.values(), *(i for a in args if isinstance(a, list) for i in a)]
        return _at(e.span, lambda: RULES[name](*pos, *star, **kw), every, name)
    raise _Stop


def _item(i: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(i, A.Ellipsis_):
        return Ellipsis
    if isinstance(i, A.Slice):
        parts = [None if p is None else _eval(p, env) for p in (i.start, i.stop, i.step)]
        if any(not (p is None or isinstance(p, int) and not isinstance(p, bool)) for p in parts):
            raise _Stop
        return slice(*parts)
    v = _eval(i, env)
    if isinstance(v, bool) or not (v is None or isinstance(v, int)):
        raise _Stop  # a tensor (or a number that is not a whole one): left to torch
    return v


def _index(value: Abstract, items: list[Any], e: A.Index) -> Abstract:
    from .recipe import BATCH

    taken = sum(1 for i in items if i is not None and i is not Ellipsis)
    if items.count(Ellipsis) > 1:
        raise _Stop
    if taken > len(value.shape):
        raise ExprError(e.span, f"{taken} indices for a tensor of {len(value.shape)} axes {show(value.shape)}")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (len(value.shape) - taken) + items[at + 1:]
    else:
        items = items + [slice(None)] * (len(value.shape) - taken)
    shape, axis = [], 0
    for i in items:
        if i is None:
            shape.append(1)
            continue
        size = value.shape[axis]
        if isinstance(i, slice):
            if i.step is not None and i.step <= 0:
                raise ExprError(e.span, "a slice's step must be positive")
            if i == slice(None):
                shape.append(size)
            elif size % BATCH == 0:
                raise _Stop  # a slice of the batch axis: its size depends on the real batch
            else:
                shape.append(len(range(size)[i]))
        elif not -size <= i < size:
            if size % BATCH == 0:
                raise _Stop
            raise ExprError(e.span, f"index {i} is out of range for axis {axis} of size {size}")
        axis += 1
    return Abstract(tuple(shape), value.dtype)
