"""Shared body of the per-pass tests: a Hypothesis property that the pass fires on specs built
around its target pattern and keeps the outputs (float64 oracle, tolerances in equivalence.py)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from equivalence import assert_equivalent, only
from specgen import specs_with


def property_test(name: str, templates: list[str], examples: int = 15, spec_strategy=None):
    strategy = specs_with(templates) if spec_strategy is None else spec_strategy

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=strategy, seed=st.integers(0, 3))
    def test(text, seed):
        note(text)
        _, files = assert_equivalent(text, only(name), seed=seed)
        ran = [p["pass"] for p in json.loads(files["manifest.json"])["passes"]]
        assert ran == [name], f"{name} did not fire on\n{text}"

    return test
