"""Hypothesis properties of the recipe machinery: data files read back exactly what was written, in
both formats; schedules stay within their bounds and follow their formulas (float64 reference)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from specc.train import prepare
from specc.train.expr import Clock, scalar_functions
from specc.train.loop import load_data

SPEC = """\
specc: 1
name: f
inputs:
  x: f32[B, {w}]
graph: |
  y = linear(x, 2)
outputs:
  y: f32[B, 2]
train:
  data:
    file: {file}
    fields:
      x: {x_type}
      label: i64[N] in range({k})
  split: 0.0
  loss: cross_entropy(y, label)
  steps: 1
  batch: 1
"""

floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def tables(draw):
    n, w, k = draw(st.integers(1, 30)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    x = draw(arrays(np.float32, (n, w), elements=floats))
    label = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return x, label, k


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables(), csv=st.booleans())
def test_data_files_read_back_exactly(tmp_path, table, csv):
    x, label, k = table
    w = x.shape[1]
    if csv:
        cols = [f"c{i}" for i in range(w)]
        rows = ["label," + ",".join(cols)] + [f"{lab}," + ",".join(repr(float(v)) for v in row)
                                              for lab, row in zip(label, x)]
        (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
        x_type = f"{{type: 'f32[N, {w}]', columns: [{', '.join(cols)}]}}"
        name = "d.csv"
    else:
        np.savez(tmp_path / "d.npz", x=x, label=label)
        x_type, name = f"f32[N, {w}]", "d.npz"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(w=w, file=name, x_type=x_type, k=k))
    _, _, recipe = prepare(spec)
    train, val = load_data(recipe)
    assert len(val["x"]) == 0
    assert np.array_equal(train["x"].numpy(), x) and np.array_equal(train["label"].numpy(), label)


@settings(max_examples=50, deadline=None)
@given(steps=st.integers(1, 500), warmup=st.integers(0, 50), low=st.floats(0, 1), alpha=st.floats(0, 20),
       beta=st.floats(0, 2))
def test_schedules_stay_in_bounds_and_follow_their_formulas(steps, warmup, low, alpha, beta):
    clock = Clock(steps)
    fns = scalar_functions(clock)
    previous = None
    for step in range(steps):
        clock.step = step
        f = fns["warmup_cosine"].fn(warmup=warmup, min=low)
        if step < warmup:
            assert f == (step + 1) / warmup
        else:
            p = (step - warmup) / max(1, steps - warmup)
            assert math.isclose(f, low + (1 - low) * 0.5 * (1 + math.cos(math.pi * p)), rel_tol=1e-12, abs_tol=1e-15)
            assert low - 1e-12 <= f <= 1 + 1e-12
            assert previous is None or step == warmup or f <= previous + 1e-12  # decays after the warm-up
        previous = f
        d = fns["inverse_decay"].fn(alpha=alpha, beta=beta)
        assert math.isclose(d, (1 + alpha * step / steps) ** -beta, rel_tol=1e-12) and 0 < d <= 1
