"""Integer inputs that index tables on tvm-llvm: an input without a declared range that indexes an
embedding, a one_hot or a gather (directly or through reshapes, flips, ...) is checked by the runner
against that table, so an id outside it is an IndexError as torch raises one, never Relax's clipped
row (take) or a value read from outside the tensor (gather_elements, which did read past it). A gather
index the IR cannot bound (computed from floats, or a slice of an input: what the slice leaves out may
hold anything) is clamped into the dimension before it reads.

References: the torch module of the same spec (float32, exact: both only move values)."""

from __future__ import annotations

import pytest
import torch

import specc

pytest.importorskip("tvm")

from specc.backends.pytorch.weights import init_weights  # noqa: E402
from specc.backends.tvm.build import compile_graph, index_ranges  # noqa: E402

TEXT = """specc: 1
name: tables
inputs: {x: 'f32[B, 4]', i: 'i64[B, 3]', j: 'i64[B, 3]', d: 'i64[B, 3] in range(4)', k: 'i64[B, 6]'}
dims: {B: 2}
graph: |
  e = embedding(i, 5, 2)
  o = one_hot(reshape(j, B, 3, 1), 7)
  g = gather(x, flip(j, 1), dim=1)
  h = gather(x, d, dim=1)
  s = gather(x, k[:, 1:4], dim=1)
outputs:
  e:
  o:
  g:
  h:
  s:
"""


@pytest.fixture(scope="module")
def built():
    graph = specc.compile(TEXT)
    weights = init_weights(graph)
    runner = compile_graph(graph, weights=weights)
    model = specc.load(TEXT, weights=weights)
    return graph, runner, model


def inputs(i=((0, 4, 2), (1, 1, 3)), j=((0, 3, 2), (3, 1, 1)), d=((0, 1, 3), (2, 2, 0)),
           k=((9, 0, 3, 2, -1, 5), (-8, 2, 1, 0, 40, 4))):  # k: what the slice leaves out is anything
    return (torch.arange(8.0).reshape(2, 4), *(torch.tensor(v) for v in (i, j, d, k)))


def test_the_tables_an_input_indexes_bound_it():
    ranges = index_ranges(specc.compile(TEXT))
    assert ranges == {"i": (0, 5, "embedding 'e' of 5 rows"),
                      "j": (0, 4, "gather 'g' along a dimension of size 4")}  # the smaller of one_hot's 7 and 4
    # d declares its range: checked as declared, not again; k is read through a slice: clamped, not checked


def test_ids_inside_the_tables_run_as_torch(built):
    _, runner, model = built
    with torch.no_grad():
        want = model(*inputs())
    for got, w in zip(runner(*inputs()), want):
        assert torch.equal(got, w)


@pytest.mark.parametrize("bad, message", [
    ({"i": ((0, 5, 2), (1, 1, 3))}, "input i: values must lie in range(0, 5) (it indexes embedding 'e' of 5 rows), "
                                    "got values from 0 to 5"),
    ({"i": ((0, -1, 2), (1, 1, 3))}, "input i: values must lie in range(0, 5) (it indexes embedding 'e' of 5 rows), "
                                     "got values from -1 to 3"),
    ({"j": ((0, 3, 2), (1000000, 1, 1))},
     "input j: values must lie in range(0, 4) (it indexes gather 'g' along a dimension of size 4), got values "
     "from 0 to 1000000"),
    ({"d": ((0, 1, 4), (2, 2, 0))}, "input d: values must lie in range(0, 4), got values from 0 to 4"),
])
def test_an_id_outside_its_table_is_an_index_error_on_both_backends(built, bad, message):
    _, runner, model = built
    with pytest.raises(IndexError) as info:
        runner(*inputs(**bad))
    assert str(info.value) == message
    with pytest.raises((IndexError, RuntimeError)):  # torch's own errors (embedding: IndexError; gather: Runtime)
        with torch.no_grad():
            model(*inputs(**bad))


def test_a_computed_index_is_clamped_into_the_dimension():
    text = """specc: 1
name: computed
inputs: {x: 'f32[B, 4]', s: 'f32[B, 3]'}
dims: {B: 2}
graph: |
  k = cast(s, i64)
  y = gather(x, k, dim=1)
  a = gather(x, argmax(x, dim=1, keepdim=true), dim=1)
outputs:
  y:
  a:
"""
    graph = specc.compile(text)
    runner = compile_graph(graph, weights={})
    runner.bind({})
    x = torch.arange(8.0).reshape(2, 4)
    s = torch.tensor([[0.5, 3.0, 1e6], [-7.0, 2.0, 1.0]])
    y, a = runner(x, s)
    assert torch.equal(y, torch.gather(x, 1, s.long().clamp(0, 3)))  # no value from outside x
    assert torch.equal(a, x.amax(1, keepdim=True))
    from specc.backends.tvm.lowering import to_relax

    kernels = [str(gv.name_hint) for gv in to_relax(graph)[0].functions]
    assert sum("index_clamp" in k for k in kernels) == 1  # argmax's index is known to lie inside: no clamp
