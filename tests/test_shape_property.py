"""Property: for random valid parameter overrides and bindings of the symbolic dimensions, the
shapes and dtypes that `specc check` infers are those the built module actually produces, for
every shipped spec."""

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import specc
from specc.api import summary_of
from specc.compiler.ir import DTYPES
from specc.dsl.schema import read_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def override_strategy(spec_path: Path):
    params = read_spec(spec_path.read_text(), str(spec_path)).spec.params
    fields = {}
    for name, default in params.items():
        if isinstance(default, bool):
            fields[name] = st.booleans()
        elif isinstance(default, int):
            if default <= 4:
                fields[name] = st.integers(1, default + 1)
            else:
                fields[name] = st.sampled_from(sorted({max(1, default // 2), default, default + default // 2}))
    return st.fixed_dictionaries({}, optional=fields)


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_inferred_types_match_the_built_module(spec_path):
    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(overrides=override_strategy(spec_path), data=st.data())
    def prop(overrides, data):
        try:
            graph = specc.compile(spec_path, **overrides)
        except specc.SpecError:
            assume(False)  # e.g. widths not divisible by heads: a located error, not a shape bug
        bindings = {}
        for sym, (example, lo, hi) in graph.dims.items():
            bindings[sym] = data.draw(st.integers(lo, min(hi or example * 2, max(example * 2, lo))), label=sym)
        summary = summary_of(graph)  # the architecture's summary (check() also checks the recipe,
        # which an override such as features=1 may no longer fit)
        model = specc.load(spec_path, **overrides)
        inputs = model.example_inputs(seed=1, **bindings)
        with torch.no_grad():
            result = model(*inputs)
        results = result if isinstance(result, tuple) else (result,)
        assert len(results) == len(summary.outputs)
        for out, tensor in zip(summary.outputs, results):
            assert tuple(tensor.shape) == out.type.concrete(bindings), (out.name, bindings, overrides)
            assert tensor.dtype == getattr(torch, DTYPES[out.type.dtype]), out.name
            assert torch.isfinite(tensor.float()).all() if tensor.is_floating_point() else True

    prop()
