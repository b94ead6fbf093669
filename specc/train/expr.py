"""Recipe expressions: parsed with the graph grammar, evaluated by a small interpreter (never eval).

Four kinds of expression appear in a `train:` section, all written in the grammar of graph bodies:
- constants (data and optimizer arguments): numbers, strings, booleans, lists and params;
- scalars (the learning-rate schedule and the `scalars:` entries): Python floats over `step`,
  `steps` and `progress` (step / steps, from 0 to 1);
- tensor expressions (the loss and the metrics): over the model's outputs, the batch's data fields
  and the scalars;
- draws (the `random:` entries): a call of `DRAWS` whose arguments are scalars, giving a `Sampler`
  that fills a model input with random values (the loop seeds its generator).
`inf` is infinity in each of them, as in graph bodies (`where(m, s, -inf)`); a draw's arguments must
still be finite. Every failure is a `SpecError` located at the sub-expression that failed.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import math
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from specc.dsl import ast as A
from specc.dsl.diagnostics import Diagnostic, Span, SpecError

class _OnFirstUse:
    """A module imported when first used: checking a recipe (`specc check`) never loads torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


torch = _OnFirstUse("torch")
F = _OnFirstUse("torch.nn.functional")


def _is_tensor(v: Any) -> bool:
    loaded = sys.modules.get("torch")
    return loaded is not None and isinstance(v, loaded.Tensor)


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
    "%": operator.mod, "**": operator.pow, "@": operator.matmul, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


class ExprError(Exception):
    """A located evaluation failure (turned into a SpecError by `evaluate`)."""

    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span, self.message = span, message


@dataclass(frozen=True)
class Function:
    """A function callable from recipe expressions; `fn` takes the evaluated arguments."""

    fn: Callable[..., Any]
    doc: str = ""

    def parameters(self) -> tuple[list[str], set[str], bool]:
        """(positional names, keyword names, takes *args); a builtin without a signature (min, max) takes
        any number of positional arguments and no keyword."""
        sig = self._signature()
        if sig is None:
            return [], set(), True
        pos = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kw = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        star = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
        return pos, kw, star

    def required(self) -> list[str]:
        sig = self._signature()
        if sig is None:
            return []
        return [p.name for p in sig.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def _signature(self) -> inspect.Signature | None:
        try:
            return inspect.signature(self.fn)
        except ValueError:  # builtins such as min and max have none
            return None


def evaluate(expr: A.Expr, env: Mapping[str, Any], functions: Mapping[str, Function],
             sources: Mapping[str, str]) -> Any:
    """The value of `expr`; raises SpecError located at the failing sub-expression."""
    try:
        return _eval(expr, env, functions)
    except ExprError as e:
        raise SpecError(Diagnostic(e.span, e.message), dict(sources)) from None


def _eval(e: A.Expr, env: Mapping[str, Any], functions: Mapping[str, Function]) -> Any:
    if isinstance(e, A.Const):
        return e.value
    if isinstance(e, A.Name):
        if e.id not in env:
            if e.id == INF:  # as in graph bodies (a param of that name would come first)
                return math.inf
            raise ExprError(e.span, f"unknown name '{e.id}'")
        return env[e.id]
    if isinstance(e, A.ListExpr):
        return [_eval(i, env, functions) for i in e.items]
    if isinstance(e, A.Unary):
        v = _eval(e.operand, env, functions)
        if e.op == "not":
            return _guard(e.span, lambda: ~v) if _is_tensor(v) else not v
        return _guard(e.span, lambda: -v if e.op == "-" else +v)
    if isinstance(e, A.BinOp):
        a, b = _eval(e.left, env, functions), _eval(e.right, env, functions)
        if e.op in ("and", "or"):
            if _is_tensor(a) or _is_tensor(b):
                return _guard(e.span, lambda: (a & b) if e.op == "and" else (a | b))
            return (a and b) if e.op == "and" else (a or b)
        return _guard(e.span, lambda: _binop_at(e, a, b))
    if isinstance(e, A.IfExp):
        cond = _eval(e.cond, env, functions)
        if _is_tensor(cond):
            raise ExprError(e.cond.span, "a condition must be a number, not a tensor (use where() on tensors)")
        return _eval(e.then if cond else e.other, env, functions)
    if isinstance(e, A.Index):
        value = _eval(e.value, env, functions)
        items = tuple(_index_item(i, env, functions) for i in e.items)
        return _guard(e.span, lambda: value[items if len(items) > 1 else items[0]])
    if isinstance(e, A.Call):
        name = e.func_name
        if name is None or name not in functions:
            raise ExprError(e.func.span, f"unknown function '{name}'")
        args = [_eval(a, env, functions) for a in e.args]
        kwargs = {k.name: _eval(k.value, env, functions) for k in e.kwargs}
        return _guard(e.span, lambda: functions[name].fn(*args, **kwargs), name)
    raise ExprError(getattr(e, "span", Span("<expr>", 0, 0)), "this expression is not supported here")


def _index_item(i, env, functions):
    if isinstance(i, A.Ellipsis_):
        return Ellipsis
    if isinstance(i, A.Slice):
        start = None if i.start is None else _eval(i.start, env, functions)
        stop = None if i.stop is None else _eval(i.stop, env, functions)
        step = None if i.step is None else _eval(i.step, env, functions)
        return slice(start, stop, step)
    return _eval(i, env, functions)


#: The name of infinity in every recipe expression, as in graph bodies: `where(m, s, -inf)`, `min(x, inf)`.
INF = "inf"
#: What a ZeroDivisionError of each operator means (Python's own messages name float and int types).
_ZERO_DIVISION = {"/": "division by zero", "//": "division by zero", "%": "modulo by zero",
                  "**": "zero raised to a negative power"}


def fmt_number(v: Any) -> str:
    """A number for a message as the spec would write it: true/false, whole numbers without '.0', huge
    ones in scientific notation (never 300 digits), other floats as Python writes them."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        if abs(v) < 10 ** 15:
            return str(v)
        try:
            return f"{float(v):.6g}"
        except OverflowError:
            return f"{'-' if v < 0 else ''}a number of {len(str(abs(v)))} digits"
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return repr(v)


#: Integer powers beyond this many bits are refused (a spec is untrusted: 10 ** 10 ** 10 must not hang).
MAX_POW_BITS = 4096


def _binop_at(e: A.BinOp, a: Any, b: Any) -> Any:
    """`_binop`, a division by zero said in the spec's terms (Python's says "float division by zero")."""
    try:
        return _binop(e.op, a, b)
    except ZeroDivisionError:
        def show(v):  # the operands as written: 0.0 / 0.0
            return repr(v) if isinstance(v, float) else fmt_number(v)

        what = _ZERO_DIVISION.get(e.op, "division by zero")
        raise ExprError(e.span, f"{what}: {show(a)} {e.op} {show(b)}") from None


def _binop(op: str, a: Any, b: Any) -> Any:
    """`a op b` for numbers and tensors; strings, lists and none only compare."""
    for v in (a, b):
        if (v is None or isinstance(v, (str, list))) and op not in ("==", "!="):
            raise TypeError(f"'{op}' needs numbers or tensors, got {_kind(v)}")
    if op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and \
            max(1, abs(a).bit_length()) * b > MAX_POW_BITS:
        raise OverflowError(f"the power is too large (more than {MAX_POW_BITS} bits)")
    return _BINOPS[op](a, b)


def _kind(v: Any) -> str:
    return "none" if v is None else "a string" if isinstance(v, str) else "a list"


def _guard(span: Span, thunk: Callable[[], Any], name: str | None = None) -> Any:
    """Run `thunk`; a failure of the value (shapes, dtypes, arguments) becomes a located error."""
    try:
        return thunk()
    except ExprError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExprError(span, f"{name + ': ' if name else ''}{first}") from None


# ---------------------------------------------------------------------------------------------
# Tensor functions: losses, metrics and helpers for the loss and the metrics.

#: While a distributed training step computes its loss: a function that sums a tensor over the processes
#: (all_reduce) and the number of processes. A masked mean then divides this process's sum by the count
#: of every process's mask, times the number of processes, so that DistributedDataParallel's average of
#: the gradients is the gradient of the global batch's masked mean (each shard's own masked mean, averaged,
#: weights the shards alike however many entries each mask keeps). A mean without a mask needs nothing:
#: the shards are of one size.
GLOBAL_SUM: contextvars.ContextVar[tuple[Callable[[Any], Any], int] | None] = \
    contextvars.ContextVar("specc_global_sum", default=None)


def _reduce(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `v`, over the entries where `mask` is true when a mask is given (over the global batch in
    a distributed step: GLOBAL_SUM)."""
    if mask is None:
        return v.mean()
    m = torch.broadcast_to(_tensor(mask, "mask").to(v.dtype), v.shape)
    count = m.sum()
    spread = GLOBAL_SUM.get()
    if spread is not None:
        total, world = spread
        return (v * m).sum() * world / total(count.detach()).clamp_min(1.0)
    return (v * m).sum() / count.clamp_min(1.0)


def _tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    return x


def mse(prediction, target, mask=None):
    """Mean squared error (broadcasting), over the masked entries when mask is given."""
    prediction, target = _tensor(prediction, "prediction"), _tensor(target, "target")
    d = prediction - target.to(prediction.dtype)
    return _reduce(d * d, mask)


def l1(prediction, target, mask=None):
    """Mean absolute error."""
    prediction, target = _tensor(prediction, "prediction"), _tensor(target, "target")
    return _reduce((prediction - target.to(prediction.dtype)).abs(), mask)


def class_problem(logits: tuple, target: tuple, soft: bool, show=list) -> str | None:
    """Why class targets of shape `target` do not fit logits of shape `logits` (None: they fit)."""
    if soft:
        if tuple(target) != tuple(logits):
            return f"soft targets {show(target)} must have the logits' shape {show(logits)}"
    elif tuple(target) != tuple(logits[:-1]):
        return f"class targets {show(target)} must have the logits' shape without the class axis, {show(logits[:-1])}"
    return None


def target_problem(dtype: str) -> str | None:
    """Why class targets of this dtype (a torch dtype name) are wrong: bool is neither class indices nor
    probabilities."""
    if dtype == "bool":
        return "the class targets are bool; give class indices (integers) or probabilities (floats)"
    return None


def smoothing_problem(smoothing: Any, soft: bool) -> str | None:
    """Why a label smoothing is wrong: a number from 0 to 1, and only for class-index targets."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
        return f"smoothing must be a number from 0 to 1, got {fmt_number(smoothing)}"
    if smoothing and soft:
        return "smoothing applies to class-index targets; soft targets (probabilities) are used as given"
    return None


def _check_classes(logits: torch.Tensor, target: torch.Tensor) -> None:
    problem = class_problem(tuple(logits.shape), tuple(target.shape), target.is_floating_point()) or \
        target_problem(str(target.dtype).replace("torch.", ""))
    if problem:
        raise ValueError(problem)


def cross_entropy(logits, target, mask=None, smoothing=0.0):
    """Softmax cross-entropy over the last axis; target: class indices, or probabilities (soft)."""
    logits, target = _tensor(logits, "logits"), _tensor(target, "target")
    _check_classes(logits, target)
    problem = smoothing_problem(smoothing, target.is_floating_point())
    if problem:
        raise ValueError(problem)
    logp = F.log_softmax(logits, dim=-1)
    if target.is_floating_point():
        loss = -(target * logp).sum(-1)
    else:
        loss = -logp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
        if smoothing:
            loss = (1 - smoothing) * loss - smoothing * logp.mean(-1)
    return _reduce(loss, mask)


def kl(logits, target_logits, temperature=1.0, mask=None):
    """KL(softmax(target_logits / T) || softmax(logits / T)) * T^2, summed over classes, averaged."""
    logits, target_logits = _tensor(logits, "logits"), _tensor(target_logits, "target_logits")
    if logits.shape != target_logits.shape:
        raise ValueError(f"logits {list(logits.shape)} and target_logits {list(target_logits.shape)} differ")
    t = float(temperature)
    logp, logq = F.log_softmax(logits / t, dim=-1), F.log_softmax(target_logits / t, dim=-1)
    return _reduce((logq.exp() * (logq - logp)).sum(-1) * t * t, mask)


def accuracy(logits, target, mask=None):
    """Fraction of (masked) positions whose arg-max class is the target."""
    logits, target = _tensor(logits, "logits"), _tensor(target, "target")
    _check_classes(logits, target)
    return _reduce((logits.argmax(-1) == target).float(), mask)


def exact_match(logits, target, mask=None):
    """Fraction of samples (first axis) whose every (masked) position is predicted right: with teacher
    forcing, exactly the samples that greedy decoding gets entirely right."""
    logits, target = _tensor(logits, "logits"), _tensor(target, "target")
    _check_classes(logits, target)
    wrong = logits.argmax(-1) != target
    if mask is not None:
        wrong = wrong & torch.broadcast_to(_tensor(mask, "mask").bool(), wrong.shape)
    return (~wrong.reshape(wrong.shape[0], -1).any(-1)).float().mean()


def gd_step(x, y, lr=None):
    """One gradient-descent step from w = 0 on the in-context squared loss of the pairs (x_i, y_i)
    before the last, evaluated at the last x (the query): lr / N * sum_i y_i x_i . x_query.
    x: [B, N + 1, d], y: [B, N + 1]. lr=None takes the learning rate that fits y_query best (least
    squares over the batch)."""
    x, y = _tensor(x, "x").double(), _tensor(y, "y").double()
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"expected x [B, N + 1, d] and y [B, N + 1], got {list(x.shape)} and {list(y.shape)}")
    n = x.shape[1] - 1
    g = (y[:, :n] * (x[:, :n] * x[:, n:]).sum(-1)).sum(-1) / n
    if lr is None:
        lr = float((g * y[:, n]).sum() / (g * g).sum().clamp_min(1e-30))
    return (lr * g).float()


def _regression_args(x, y, prefixes):
    """x [B, N + 1, d] and y [B, N + 1] as float64, checked (the shared part of ols and ridge)."""
    x, y = _tensor(x, "x"), _tensor(y, "y")
    if x.dim() != 3 or tuple(y.shape) != tuple(x.shape[:2]):
        raise ValueError(f"expected x [B, N + 1, d] and y [B, N + 1], got {list(x.shape)} and {list(y.shape)}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(f"x and y must be float tensors, got {x.dtype} and {y.dtype}")
    if not isinstance(prefixes, bool):
        raise TypeError(f"prefixes must be true or false, got {prefixes!r}")
    return x.double(), y.double()


def _fit_predict(x, y, prefixes, solve):
    """Predictions of the weights `solve(X [B, n, d], Y [B, n])` fitted on the pairs before the query
    (prefixes=false: [B]) or, for every position i, on the pairs before i ([B, N + 1]; no pairs: 0)."""
    n = x.shape[1] - 1
    ends = range(n + 1) if prefixes else [n]
    preds = []
    for i in ends:
        if i == 0:
            preds.append(torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        else:
            w = solve(x[:, :i], y[:, :i])  # [B, d]
            preds.append((w * x[:, i]).sum(-1))
    return torch.stack(preds, dim=1) if prefixes else preds[0]


def ols(x, y, prefixes=False):
    """Ordinary least squares on the in-context pairs: the weights w minimising sum_i (w . x_i - y_i)^2
    over the pairs before the last (the query), the minimum-norm such w when the pairs do not determine
    it (fewer pairs than dimensions, or repeated points): w = pinv(X) Y. Returns w . x_query, [B].
    With prefixes=true, [B, N + 1]: column i is the fit on the pairs before i evaluated at x_i (column 0,
    no pairs: 0), the prediction a model reading every x position should make.
    x: [B, N + 1, d], y: [B, N + 1] (y_query is not used). Computed in float64; returns x's dtype."""
    dtype = _tensor(x, "x").dtype
    x, y = _regression_args(x, y, prefixes)

    def solve(xs, ys):
        return (torch.linalg.pinv(xs) @ ys.unsqueeze(-1)).squeeze(-1)

    return _fit_predict(x, y, prefixes, solve).to(dtype)


def ridge(x, y, lam, prefixes=False):
    """Ridge regression on the in-context pairs: w = (X^T X + lam I)^-1 X^T Y over the pairs before the
    last (the query), the minimiser of sum_i (w . x_i - y_i)^2 + lam |w|^2 (lam > 0; lam -> 0 gives ols).
    Returns w . x_query, [B]; prefixes=true: [B, N + 1] as for ols. x: [B, N + 1, d], y: [B, N + 1].
    Computed in float64; returns x's dtype."""
    dtype = _tensor(x, "x").dtype
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a positive number, got {lam!r} (for lam = 0 use ols(x, y))")
    x, y = _regression_args(x, y, prefixes)

    def solve(xs, ys):
        eye = torch.eye(xs.shape[-1], dtype=xs.dtype, device=xs.device)
        gram = xs.transpose(1, 2) @ xs + float(lam) * eye
        return torch.linalg.solve(gram, (xs.transpose(1, 2) @ ys.unsqueeze(-1))).squeeze(-1)

    return _fit_predict(x, y, prefixes, solve).to(dtype)


def _concat(items, dim=0):
    if not isinstance(items, list) or not items:
        raise TypeError("concat takes a list of tensors, e.g. concat([a, b])")
    return torch.cat([_tensor(i, "each item") for i in items], dim=dim)


def _mean(x, dim=None):
    x = _tensor(x, "x")
    return x.float().mean() if dim is None else x.float().mean(dim)


def _sum(x, dim=None):
    x = _tensor(x, "x")
    return x.sum() if dim is None else x.sum(dim)


def _where(cond, a, b):
    return torch.where(_tensor(cond, "cond").bool(), a, b)


def _one_hot(ids, num):
    """one_hot(ids, num): integer ids in range(num) as float32 one-hot vectors [..., num] (targets built
    from class labels, e.g. mse(logits, one_hot(label, 10)))."""
    ids = _tensor(ids, "ids")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {str(ids.dtype).replace('torch.', '')}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive whole number, got {num!r}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num):
        raise ValueError(f"ids must be in range({num}), got values from {int(ids.min())} to {int(ids.max())}")
    return F.one_hot(ids.long(), num).float()


TENSOR_FUNCTIONS: dict[str, Function] = {
    "mse": Function(mse), "l1": Function(l1), "cross_entropy": Function(cross_entropy), "kl": Function(kl),
    "accuracy": Function(accuracy), "exact_match": Function(exact_match),
    "gd_step": Function(gd_step), "ols": Function(ols), "ridge": Function(ridge),
    "concat": Function(_concat),
    "mean": Function(_mean), "sum": Function(_sum), "where": Function(_where), "one_hot": Function(_one_hot),
    "detach": Function(lambda x: _tensor(x, "x").detach()),
    "softmax": Function(lambda x, dim=-1: F.softmax(_tensor(x, "x"), dim=dim)),
    "log_softmax": Function(lambda x, dim=-1: F.log_softmax(_tensor(x, "x"), dim=dim)),
    "argmax": Function(lambda x, dim=-1: _tensor(x, "x").argmax(dim)),
    "transpose": Function(lambda x, dim0, dim1: _tensor(x, "x").transpose(dim0, dim1)),
    "reshape": Function(lambda x, *shape: _tensor(x, "x").reshape(*shape)),
    "abs": Function(lambda x: abs(x)),
    "exp": Function(lambda x: x.exp() if isinstance(x, torch.Tensor) else math.exp(x)),
    "log": Function(lambda x: x.log() if isinstance(x, torch.Tensor) else math.log(x)),
    "sqrt": Function(lambda x: x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)),
    "float": Function(lambda x: x.float() if isinstance(x, torch.Tensor) else float(x)),
}

# ---------------------------------------------------------------------------------------------
# Scalar functions: schedules over the step. `_at` is the (step, steps) they are evaluated at.


class Clock:
    """The step a scalar expression is evaluated at (schedules read it)."""

    def __init__(self, steps: int):
        self.steps, self.step = steps, 0

    @property
    def progress(self) -> float:
        return self.step / max(1, self.steps)

    def env(self) -> dict[str, float]:
        return {"step": float(self.step), "steps": float(self.steps), "progress": self.progress}


def scalar_functions(clock: Clock) -> dict[str, Function]:
    """Schedules (factors, usually of the learning rate) and math on Python numbers."""

    def constant(value=1.0):
        """The same factor at every step."""
        return float(value)

    def warmup_cosine(warmup=0, min=0.0):  # noqa: A002 - the recipe's argument name
        """Linear warm-up over `warmup` steps, then a cosine decay to `min` at the last step."""
        if warmup < 0 or not 0 <= min <= 1:
            raise ValueError(f"needs warmup >= 0 and 0 <= min <= 1, got warmup={warmup}, min={min}")
        s = clock.step
        if s < warmup:
            return (s + 1) / warmup
        p = (s - warmup) / max(1, clock.steps - warmup)
        return min + (1 - min) * 0.5 * (1 + math.cos(math.pi * p))

    def cosine(min=0.0):  # noqa: A002
        """A cosine decay from 1 to `min`."""
        return warmup_cosine(0, min)

    def step_decay(every, gamma=0.1):
        """Multiplied by `gamma` every `every` steps."""
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        return float(gamma) ** (clock.step // every)

    def inverse_decay(alpha=10.0, beta=0.75):
        """1 / (1 + alpha * progress) ** beta: DANN's mu_p = mu_0 / (1 + 10 p)^0.75."""
        if alpha < 0:
            raise ValueError(f"alpha must be at least 0, got {alpha}")
        return 1.0 / (1.0 + alpha * clock.progress) ** beta

    def warmup(steps):
        """Linear warm-up over `steps` steps, then 1."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        return min(1.0, (clock.step + 1) / steps)

    fns = {"constant": constant, "warmup_cosine": warmup_cosine, "cosine": cosine, "step_decay": step_decay,
           "inverse_decay": inverse_decay, "warmup": warmup,
           "exp": math.exp, "log": math.log, "sqrt": math.sqrt, "cos": math.cos, "sin": math.sin,
           "tanh": math.tanh, "abs": abs, "min": min, "max": max, "float": float}
    return {k: Function(v) for k, v in fns.items()}


#: The schedule functions by name, for checking a recipe without a clock.
SCHEDULES = frozenset({"constant", "warmup_cosine", "cosine", "step_decay", "inverse_decay", "warmup"})
SCALAR_NAMES = ("step", "steps", "progress")


# ---------------------------------------------------------------------------------------------
# Random draws: what a `random:` entry feeds its model input, drawn afresh each step.


@dataclass(frozen=True)
class Sampler:
    """A draw with its arguments bound: `draw(generator, shape, dtype)` makes the tensor (on the CPU,
    from the generator alone); `problem(shape)` says why it cannot fill that shape (None: it can)."""

    name: str
    draw: Callable[[Any, tuple[int, ...], Any], Any]
    problem: Callable[[tuple[int, ...]], str | None] = lambda shape: None


def _number(name: str, v: Any) -> float:
    """A draw's argument as a float: a finite number (not a boolean; inf is a number, but no draw can use
    it; an integer too large for a float is not finite either)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {fmt_number(v)}")
    try:
        value = float(v)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {fmt_number(v)}")
    return value


def _as_dtype(mask, dtype):
    return mask if dtype == torch.bool else mask.to(dtype)


def subset(k=None, ratio=None):
    """Exactly k entries true in every row along the last axis, the k chosen uniformly at random; or
    ratio: the fraction of the axis that is true, k = ratio * n rounded half up (MP3's kept tokens at
    mask ratio 0.75: subset(ratio=0.25), 4 of 16)."""
    if (k is None) == (ratio is None):
        raise ValueError("give k (how many entries are true per row) or ratio (the fraction true), one of them")
    if k is not None:
        k = _number("k", k)
        if k != int(k) or k < 0:
            raise ValueError(f"k must be a whole number at least 0, got {fmt_number(k)}")
    else:
        ratio = _number("ratio", ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {fmt_number(ratio)}")

    def count(n: int) -> int:
        return int(k) if k is not None else math.floor(ratio * n + 0.5)

    def problem(shape):
        if not shape:
            return "subset needs an axis to choose along"
        if count(shape[-1]) > shape[-1]:
            return f"k={fmt_number(count(shape[-1]))} is larger than the last axis ({shape[-1]} entries)"
        return None

    def draw(gen, shape, dtype):
        chosen = torch.rand(shape, generator=gen, dtype=torch.float64).argsort(-1)[..., :count(shape[-1])]
        mask = torch.zeros(shape, dtype=torch.bool).scatter_(-1, chosen, True)
        return _as_dtype(mask, dtype)

    return Sampler("subset", draw, problem)


def bernoulli(p):
    """Each entry true with probability p, independently (1.0 / 0.0 for a float input)."""
    p = _number("p", p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {fmt_number(p)}")
    return Sampler("bernoulli",
                   lambda gen, shape, dtype: _as_dtype(torch.rand(shape, generator=gen, dtype=torch.float64) < p,
                                                       dtype))


def uniform(lo=0.0, hi=1.0):
    """Each entry uniform in [lo, hi), independently."""
    lo, hi = _number("lo", lo), _number("hi", hi)
    if hi < lo:
        raise ValueError(f"needs lo <= hi, got lo={fmt_number(lo)}, hi={fmt_number(hi)}")
    return Sampler("uniform", lambda gen, shape, dtype: (
        lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype))


def normal(mean=0.0, std=1.0):
    """Each entry normal with this mean and standard deviation, independently."""
    mean, std = _number("mean", mean), _number("std", std)
    if std < 0:
        raise ValueError(f"std must be at least 0, got {fmt_number(std)}")
    return Sampler("normal", lambda gen, shape, dtype: (
        mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype))


DRAWS: dict[str, Function] = {"subset": Function(subset), "bernoulli": Function(bernoulli),
                              "uniform": Function(uniform), "normal": Function(normal)}
#: The kinds of input each draw fills: a bool draw fills a float input with 1.0 and 0.0.
DRAW_KINDS: dict[str, tuple[str, ...]] = {"subset": ("bool", "float"), "bernoulli": ("bool", "float"),
                                          "uniform": ("float",), "normal": ("float",)}


def sampler(call: A.Call, env: Mapping[str, Any], functions: Mapping[str, Function]) -> Sampler:
    """The draw `call` (a call of one of DRAWS) with its arguments evaluated as scalars in `env` with
    `functions`; raises ExprError located at what failed."""
    name = call.func_name
    if name not in DRAWS:
        raise ExprError(call.func.span, f"unknown draw '{name}'")
    args = [_eval(a, env, functions) for a in call.args]
    kwargs = {k.name: _eval(k.value, env, functions) for k in call.kwargs}
    return _guard(call.span, lambda: DRAWS[name].fn(*args, **kwargs), name)
