"""The check's abstract evaluation of losses and metrics (specc/train/shapes.py) against torch.

A random expression over tensors of random shapes and dtypes is evaluated twice: by the recipe
interpreter on real tensors (what `specc train` does) and on shapes and dtypes alone (what `specc check`
does). Wherever the check reports a problem, torch must fail too; wherever the check knows the value,
torch must give a value of that shape and dtype. The check may leave a value unknown (then it says
nothing), never be wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specc.dsl.diagnostics import Collector
from specc.dsl.parser import parse
from specc.dsl.yamlpos import TextOrigin
from specc.train import recipe as R
from specc.train import shapes as S
from specc.train.expr import TENSOR_FUNCTIONS, ExprError, _eval
from specc.cli import main

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]


def _parse(text: str):
    errors = Collector()
    e = parse(text, TextOrigin("spec.yaml", 1, 1, False, len(text), 1), "expression", errors)
    assert e is not None and not errors.diagnostics, text
    return e


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.rand(shape, generator=g) < 0.5
    if dtype.startswith("float"):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(getattr(torch, dtype))
    # integers are 0: every class index, one_hot id and gather is in range; division by 0 is left to torch
    return torch.zeros(shape, dtype=getattr(torch, dtype))


shapes = st.lists(st.sampled_from([1, 2, 3]), min_size=0, max_size=3).map(tuple)
names = ["a", "b", "c", "d"]

LEAVES = st.one_of(st.sampled_from(names), st.sampled_from(["0", "1", "2", "-1", "0.5", "2.0", "true", "s"]))
DIMS = ["0", "1", "-1", "2"]


def _calls(sub):
    k = st.sampled_from(DIMS)
    return st.one_of(
        st.tuples(st.sampled_from(["mse", "l1", "cross_entropy", "kl", "accuracy", "exact_match", "gd_step",
                                   "ols"]), sub, sub).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(st.sampled_from(["mse", "cross_entropy", "accuracy", "exact_match", "kl"]), sub, sub, sub)
        .map(lambda t: f"{t[0]}({t[1]}, {t[2]}, mask={t[3]})"),
        st.tuples(sub, sub, st.sampled_from(["0.1", "0", "1", "2"])).map(
            lambda t: f"cross_entropy({t[0]}, {t[1]}, smoothing={t[2]})"),
        st.tuples(sub, sub).map(lambda t: f"ridge({t[0]}, {t[1]}, 0.5, prefixes=true)"),
        st.tuples(sub, sub, k).map(lambda t: f"concat([{t[0]}, {t[1]}], dim={t[2]})"),
        st.tuples(st.sampled_from(["mean", "sum", "softmax", "log_softmax", "argmax"]), sub, k)
        .map(lambda t: f"{t[0]}({t[1]}, dim={t[2]})"),
        st.tuples(st.sampled_from(["mean", "sum", "detach", "abs", "exp", "log", "sqrt", "float", "softmax"]), sub)
        .map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(sub, sub, sub).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(sub, st.sampled_from(["1", "3"])).map(lambda t: f"one_hot({t[0]}, {t[1]})"),
        st.tuples(sub, k, k).map(lambda t: f"transpose({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(sub, st.sampled_from(["-1", "2, -1", "3", "1, 2", "[-1, 1]"])).map(
            lambda t: f"reshape({t[0]}, {t[1]})"),
        st.tuples(sub, st.lists(st.sampled_from(["0", "-1", "1", "5", ":", "1:", ":2", "::2", "...", "none"]),
                                min_size=1, max_size=3)).map(lambda t: f"{t[0]}[{', '.join(t[1])}]"),
    )


EXPRS = st.recursive(
    LEAVES,
    lambda sub: st.one_of(
        st.tuples(sub, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "@", "==", "<", "and", "or"]), sub)
        .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["-", "not "]), sub).map(lambda t: f"({t[0]}{t[1]})"),
        st.tuples(sub, sub, sub).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        _calls(sub),
    ),
    max_leaves=6,
)


#: Failures that depend on the values (integers made from bools are 1, not 0), which the check cannot see.
VALUE_ERRORS = ("ids must be in range", "out of bounds", "division by zero", "modulo by zero", "math domain error",
                "zero raised to a negative power")


def _compare(text: str, types: dict[str, tuple[tuple[int, ...], str]]) -> str:
    e = _parse(text)
    abstract = {n: S.Abstract(shape, dtype) for n, (shape, dtype) in types.items()}
    abstract["s"] = S.NUMBER  # a scalar that changes during training: each branch of an `if` on it runs
    try:
        want = S.abstract_eval(e, abstract)
    except ExprError as err:
        want = err
    runs = []
    for scalar in (0.7, 0.2, 0.0):
        real = {n: _tensor(shape, dtype, i) for i, (n, (shape, dtype)) in enumerate(types.items())}
        real["s"] = scalar
        try:
            runs.append(_eval(e, real, TENSOR_FUNCTIONS))
        except ExprError as err:
            runs.append(err)
    failed = [r for r in runs if isinstance(r, ExprError)]
    got = failed[0] if failed else runs[0]
    if isinstance(want, ExprError):
        assert isinstance(got, ExprError), f"{text}: the check says '{want.message}', torch gave {got!r}"
        return "error"
    if want is S.UNKNOWN:
        return "unknown"
    if isinstance(got, ExprError) and any(v in got.message for v in VALUE_ERRORS):
        return "value"
    assert not isinstance(got, ExprError), f"{text}: torch failed ({got.message}), the check gave {want}"
    if isinstance(want, S.Abstract):
        for got in runs:
            assert isinstance(got, torch.Tensor), f"{text}: {got!r} for {want}"
            assert (tuple(got.shape), str(got.dtype).replace("torch.", "")) == (want.shape, want.dtype), text
        return "tensor"
    if want is S.NUMBER:
        assert isinstance(got, (int, float)) and not isinstance(got, bool) or isinstance(got, bool), text
        return "number"
    assert not isinstance(got, torch.Tensor), text
    assert got == want or (isinstance(got, float) and math.isnan(got) and math.isnan(want)), text
    return "constant"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=EXPRS, types=st.fixed_dictionaries({n: st.tuples(shapes, st.sampled_from(DTYPES)) for n in names}))
def test_the_check_agrees_with_torch_on_random_expressions(text, types):
    _compare(text, types)


# Cases the random search reaches rarely, each with the outcome the check must give.
@pytest.mark.parametrize("text, outcome", [
    ("cross_entropy(a, b)", "tensor"),                         # a [2, 3] f32, b [2] i64
    ("cross_entropy(a, m)", "error"),                          # bool class targets
    ("cross_entropy(a, b, smoothing=2)", "error"),
    ("cross_entropy(a, a, smoothing=0.1)", "error"),           # smoothing with soft targets
    ("mse(a, b)", "error"),                                    # [2, 3] and [2]
    ("mse(a, b[:, none])", "tensor"),                          # [2, 1] broadcasts to [2, 3]
    ("mse(a, a[:, :1])", "tensor"),
    ("mse(a, a, mask=0.5)", "error"),
    ("mse(a, a, mask=m[:, none])", "tensor"),
    ("mse(a, a, mask=b)", "error"),                            # [2] does not broadcast to [2, 3]
    ("a @ a", "error"), ("a @ transpose(a, 0, 1)", "tensor"), ("a @ b", "error"), ("b @ a[:, 0]", "error"),
    ("m - m", "error"), ("-m", "error"), ("a - m", "error"), ("not a", "error"), ("m + m", "tensor"),
    ("mean(b)", "tensor"), ("sum(m)", "tensor"), ("argmax(m)", "error"), ("b / 2", "tensor"),
    ("reshape(a, 4, -1)", "error"), ("reshape(a, 3, 2)", "tensor"), ("one_hot(a, 3)", "error"),
    ("one_hot(b, 3)", "tensor"), ("concat([a, b])", "error"), ("concat([a, a], dim=1)", "tensor"),
    ("softmax(b)", "error"), ("log_softmax(a, dim=2)", "error"), ("a[5]", "error"), ("a[0, 0, 0]", "error"),
    ("a[..., 0]", "tensor"), ("a[b]", "unknown"), ("ols(a, b)", "error"), ("where(m[:, none], a, 0.0)", "tensor"),
    ("mse(a, b) if s > 0.5 else 0.0", "error"), ("mean(a) if s > 0.5 else mean(a * 2)", "tensor"),
    ("exact_match(a[0], b[0])", "error"), ("accuracy(a, b, mask=m)", "tensor"),
])
def test_the_check_on_chosen_expressions(text, outcome):
    types = {"a": ((2, 3), "float32"), "b": ((2,), "int64"), "m": ((2,), "bool")}
    assert _compare(text, types) == outcome


SPEC = """\
specc: 1
name: cls
params: {classes: 3}
dims: {B: 4}
inputs:
  x: f32[B, 2]
graph: |
  logits = linear(x, classes)
outputs:
  logits: f32[B, classes]
train:
  data: two_moons(n=64)
  loss: LOSS
  optimizer: adam(lr=0.01)
  steps: 2
  batch: 8
  eval:
    every: 1
    metrics:
      acc: METRIC
"""


@pytest.mark.parametrize("loss, metric, message", [
    ("logits", "accuracy(logits, label)", "spec.yaml:13:9: error: loss: expected a single float (a mean), got [B, 3]"),
    ("mean(logits) > 0", "accuracy(logits, label)", "loss: expected a single float (a mean), got a single bool"),
    ("sum(label)", "accuracy(logits, label)", "loss: expected a single float (a mean), got a single int64"),
    ("cross_entropy(logits, label)", "argmax(logits)", "metric 'acc': expected a single number, got [B]"),
    ("cross_entropy(logits, label)", "'\"high\"'", "metric 'acc': expected a single number, got a string"),
    ("cross_entropy(logits, label > 0)", "accuracy(logits, label)", "the class targets are bool"),
    ("cross_entropy(logits, label, smoothing=1.5)", "accuracy(logits, label)",
     "smoothing must be a number from 0 to 1, got 1.5"),
    ("cross_entropy(logits, label) + mse(logits, x)", "accuracy(logits, label)",
     "loss: mse: shapes [B, 3] and [B, 2] do not broadcast"),
    ("cross_entropy(logits, label)", "accuracy(logits, label[:, none])",
     "metric 'acc': accuracy: class targets [B, 1] must have the logits' shape without the class axis, [B]"),
])
def test_check_reports_losses_and_metrics_that_would_fail(tmp_path, capsys, loss, metric, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("LOSS", loss).replace("METRIC", metric))
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_messages_name_the_batch_axis_as_the_spec_does(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("LOSS", "logits").replace("METRIC", "argmax(logits)").replace("B", "N"))
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "loss: expected a single float (a mean), got [N, 3]" in err and "got [N]" in err, err
    assert S.BATCH_NAME.get() == "B" and S.show((R.BATCH, 3)) == "[B, 3]"  # only while that spec was checked


def test_check_passes_losses_and_metrics_that_work(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("LOSS", "cross_entropy(logits, label, smoothing=0.1) + 0.01 * mean(logits ** 2)")
                    .replace("METRIC", "accuracy(logits, label, mask=label >= 0)"))
    assert main(["check", str(spec), "--no-color"]) == 0, capsys.readouterr().err


def test_every_tensor_function_has_a_rule():
    assert set(S.RULES) == set(TENSOR_FUNCTIONS)


def test_promotion_is_torchs():
    names = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
    for a in names:
        for b in names:
            assert S.promote(a, b) == str(torch.promote_types(getattr(torch, a), getattr(torch, b)))[6:], (a, b)
    values = [True, 2, 0.5]
    for a in names:
        for b in names + values:
            for ra, rb in [(1, 0), (0, 1), (1, 1), (0, 0)]:
                x = torch.ones((2,) * ra, dtype=getattr(torch, a))
                y = b if not isinstance(b, str) else torch.ones((2,) * rb, dtype=getattr(torch, b))
                ya = b if not isinstance(b, str) else S.Abstract((2,) * rb, b)
                want = str(torch.result_type(x, y))[6:]
                assert S.result_type(S.Abstract((2,) * ra, a), ya) == want, (a, ra, b, rb)
