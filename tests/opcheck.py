"""Shared helpers of the op tests (tests/test_ops_*.py): build a small spec through specc, run it in
float64, compare with a reference at a stated tolerance, and check located errors and FLOPs."""

from __future__ import annotations

import pytest
import torch

import specc
from specc import SpecError
from specc.compiler.summary import summarize

#: Generated float64 module vs a float64 torch call or hand-written reference: the same math, in
#: places a different order of float64 operations.
TOL = 1e-10


def spec_text(inputs: str, graph: str, outputs: str = "y", *, dims: str = "B: 2, T: 5",
              params: str | None = None) -> str:
    """A small spec: `inputs` and `dims` as flow mappings, `graph` lines, `outputs` names separated by
    spaces (their types inferred). The graph body starts on line 6 (7 with `params`), at column 3."""
    body = "".join("  " + ln + "\n" for ln in graph.strip("\n").splitlines())
    outs = "".join(f"  {o}:\n" for o in outputs.split())
    head = "specc: 1\nname: m\n" + (f"params: {params}\n" if params else "")
    return head + f"inputs: {{{inputs}}}\ndims: {{{dims}}}\ngraph: |\n{body}outputs:\n{outs}"


def output_types(text: str) -> list[str]:
    """The inferred types of a spec's outputs, as text."""
    return [str(o.type) for o in specc.check(text).outputs]


def load64(text: str, opt_level: int = 1):
    """The built module of a spec, in float64."""
    return specc.load(text, opt_level=opt_level).double()


def inputs64(model, seed: int = 0, **dims):
    return tuple(t.double() if t.is_floating_point() else t for t in model.example_inputs(seed=seed, **dims))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Same shape and dtype; bool and integer results equal, float ones within `tol` (max abs error)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    if a.dtype == torch.bool or not a.is_floating_point():
        assert torch.equal(a, b)
        return
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def only_error(text: str):
    """The one diagnostic `specc check` reports for `text`."""
    with pytest.raises(SpecError) as info:
        specc.check(text)
    diags = info.value.diagnostics
    assert len(diags) == 1, [f"{d.span}: {d.message}" for d in diags]
    return diags[0]


def assert_error(text: str, line: int, col: int, message: str) -> None:
    d = only_error(text)
    assert (d.span.line, d.span.col, d.message) == (line, col, message)


def flops_of(text: str, op: str, **dims) -> int:
    return summarize(specc.compile(text), dims).flops_by_op.get(op, 0)
