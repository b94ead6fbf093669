"""The recipe's in-context regression baselines `ols(x, y)` and `ridge(x, y, lam)` (specc/train/expr.py)
against numpy in float64: least squares by `numpy.linalg.lstsq` (minimum norm when underdetermined)
and closed-form ridge (X^T X + lam I)^-1 X^T Y, each fitted on the pairs before the evaluated position.
Tolerance: max abs error <= 1e-10 (float64 rounding only; predictions are of order one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specc.dsl.diagnostics import Collector, SpecError
from specc.dsl.parser import parse
from specc.dsl.yamlpos import TextOrigin
from specc.train.expr import TENSOR_FUNCTIONS, evaluate, ols, ridge

TOL = 1e-10


def task(batch=5, points=7, dim=3, seed=0):
    """x [B, points + 1, dim], y [B, points + 1] (noisy: ridge and ols then differ), float64."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (batch, points + 1, dim))
    y = np.einsum("bpd,bd->bp", x, rng.standard_normal((batch, dim))) + 0.3 * rng.standard_normal((batch, points + 1))
    return x, y


def np_ols(x, y, i):
    """lstsq on the pairs before i, evaluated at x_i (no pairs: 0)."""
    out = []
    for b in range(x.shape[0]):
        w = np.linalg.lstsq(x[b, :i], y[b, :i], rcond=None)[0] if i else np.zeros(x.shape[2])
        out.append(x[b, i] @ w)
    return np.array(out)


def np_ridge(x, y, i, lam):
    out = []
    for b in range(x.shape[0]):
        xs, ys = x[b, :i], y[b, :i]
        w = np.linalg.solve(xs.T @ xs + lam * np.eye(x.shape[2]), xs.T @ ys)
        out.append(x[b, i] @ w)
    return np.array(out)


@pytest.mark.parametrize("points, dim", [(7, 3), (2, 5), (12, 1)])  # over-, under- and one-dimensional
def test_ols_equals_numpy_lstsq_at_the_query_and_every_prefix(points, dim):
    x, y = task(points=points, dim=dim)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    got = ols(xt, yt)
    assert got.dtype == torch.float64 and tuple(got.shape) == (5,)
    assert np.abs(got.numpy() - np_ols(x, y, points)).max() <= TOL
    every = ols(xt, yt, prefixes=True)
    assert tuple(every.shape) == (5, points + 1)
    want = np.stack([np_ols(x, y, i) for i in range(points + 1)], axis=1)
    assert np.abs(every.numpy() - want).max() <= TOL
    assert (every[:, 0] == 0).all() and (every[:, -1] == got).all()


def test_ols_is_minimum_norm_when_underdetermined_and_interpolates_the_context():
    """With fewer pairs than dimensions many w fit exactly; ols takes the smallest, w = X^T (X X^T)^-1 Y."""
    x, y = task(points=2, dim=5, seed=3)
    got = ols(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for b in range(x.shape[0]):
        xs = x[b, :2]
        w = xs.T @ np.linalg.solve(xs @ xs.T, y[b, :2])
        assert abs(got[b] - x[b, 2] @ w) <= TOL
    # repeated points (rank-deficient even with enough pairs): still lstsq's minimum-norm answer
    x[:, 1:4] = x[:, :1]
    assert np.abs(ols(torch.from_numpy(x), torch.from_numpy(y)).numpy() - np_ols(x, y, 2)).max() <= TOL


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10])
def test_ridge_equals_the_closed_form(lam):
    x, y = task(points=6, dim=3, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert np.abs(ridge(xt, yt, lam).numpy() - np_ridge(x, y, 6, lam)).max() <= TOL
    every = ridge(xt, yt, lam, prefixes=True).numpy()
    want = np.stack([np_ridge(x, y, i, lam) if i else np.zeros(5) for i in range(7)], axis=1)
    assert np.abs(every - want).max() <= TOL


def test_ridge_shrinks_towards_zero_and_tends_to_ols():
    x, y = task(points=8, dim=3, seed=2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert (ridge(xt, yt, 1e-9) - ols(xt, yt)).abs().max() <= 1e-7
    assert (ridge(xt, yt, 1e6).abs() < 1e-4).all()
    assert (ridge(xt, yt, 1.0) - ols(xt, yt)).abs().max() > 1e-2  # lam matters: the check has teeth


def test_float32_inputs_give_float32_predictions_computed_in_float64():
    x, y = task(seed=4)
    got = ols(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.dtype == torch.float32
    want = ols(torch.from_numpy(x).float().double(), torch.from_numpy(y).float().double())
    assert (got.double() - want).abs().max() <= 1e-6


def _recipe_eval(text, env):
    """`text` as a recipe expression on line 1 of spec.yaml, evaluated as a metric is."""
    errors = Collector()
    e = parse(text, TextOrigin("spec.yaml", 1, 1, False, len(text), 1), "expression", errors)
    assert e is not None and not errors.diagnostics
    return evaluate(e, env, TENSOR_FUNCTIONS, {"spec.yaml": text})


@pytest.mark.parametrize("text, message", [
    ("ridge(x, y, 0.0)", "lam must be a positive number"),
    ("ridge(x, y, -1)", "lam must be a positive number"),
    ("ridge(x, y, true)", "lam must be a positive number"),
    ("ridge(x, y, x)", "lam must be a positive number"),
    ("ols(x, x)", "expected x [B, N + 1, d] and y [B, N + 1]"),
    ("ols(y, y)", "expected x [B, N + 1, d] and y [B, N + 1]"),
    ("ols(x, 1.0)", "y must be a tensor"),
    ("ols(x, y, prefixes=2)", "prefixes must be true or false"),
    ("ols(x, k)", "x and y must be float tensors"),
])
def test_bad_arguments_are_located_errors(text, message):
    x, y = task()
    env = {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "k": torch.zeros(5, 8, dtype=torch.long)}
    with pytest.raises(SpecError) as err:
        _recipe_eval(text, env)
    shown = str(err.value)
    assert message in shown and "spec.yaml:1:" in shown, shown
