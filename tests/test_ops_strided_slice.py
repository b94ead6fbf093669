"""Strided slices in index expressions: `x[a:b:s]`, `x[::2]`, `x[1::2, :, 0:5:2]`.

A step is a positive integer (a constant or a param expression); 0, a negative step, a float or a
symbolic dimension is a located error at the step (torch's slices take no negative steps either). The
result has ceil((stop - start) / step) elements; on a symbolic size that must be a polynomial in its
symbols (x[:, ::2] of a 2 * S axis is S; of a T axis it is a located error that says what to write). A
step of 1 is recorded as the plain ('slice', start, stop) item, so x[0:4:1] is x[0:4] in the IR, the
generated code and the passes; any other step is a fourth element of the item.

The oracle is torch's own slicing of the same float64 inputs: a slice copies values (and e's one
multiply and subtract are the reference's), so the built module (float64, at -O0, -O1 and -O2) must
equal it exactly; tvm-llvm (float32, one library for every batch size and S) is compared with the
float64 torch module at tests/test_tvm_ops.py's tolerance. Recipe expressions (losses and metrics) share
the grammar and slice torch tensors with Python's slice, steps included.
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, inputs64, load64, only_error, output_types, spec_text
from specc.compiler.printer import print_graph

spec = functools.partial(spec_text, dims="B: 2, T: 5, S: 3")

# x: f32[B, 7, 12] (fixed sizes), z: f32[B, 2 * S, 6] (a symbolic axis of a multiple of 2), r: f32[S]
# (S itself, which the generated code reads for the bound 2 * S - 3), k = 3
GRAPH = """\
a = x[:, ::2]
b = x[:, 1::3, 2:11:4]
c = x[0, -5:-1:2]
d = x[..., ::5]
e = z[:, ::2] - z[:, 1::2] * r[None, :, None]
f = z[:, 1:-1:2, ::4]
g = x[:, ::k, k:]
h = x[:, None, ::2, 0]
i = x[:, 2:4:5, 0:12:1]
j = z[:, 2 * S - 3::2]
l = z[:, -3::2, 1:]
"""
OUTS = "a b c d e f g h i j l"
TEXT = spec_text("x: 'f32[B, 7, 12]', z: 'f32[B, 2 * S, 6]', r: 'f32[S]'", GRAPH, OUTS, dims="B: 2, S: {example: 3, min: 2}",
                 params="{k: 3}")


def reference(x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch's slicing of the same values (k = 3)."""
    s = r.shape[0]
    return {"a": x[:, ::2], "b": x[:, 1::3, 2:11:4], "c": x[0, -5:-1:2], "d": x[..., ::5],
            "e": z[:, ::2] - z[:, 1::2] * r[None, :, None], "f": z[:, 1:-1:2, ::4], "g": x[:, ::3, 3:],
            "h": x[:, None, ::2, 0], "i": x[:, 2:4:5], "j": z[:, 2 * s - 3::2], "l": z[:, -3::2, 1:]}


# -- shapes ---------------------------------------------------------------------------------------------

def test_lengths_are_ceil_of_the_span_over_the_step():
    assert output_types(TEXT) == ["f32[B, 4, 12]", "f32[B, 2, 3]", "f32[2, 12]", "f32[B, 7, 3]", "f32[B, S, 6]",
                                  "f32[B, (S - 1), 2]", "f32[B, 3, 9]", "f32[B, 1, 4]", "f32[B, 1, 12]",
                                  "f32[B, 2, 6]", "f32[B, 2, 5]"]


def test_symbolic_lengths_that_divide_exactly():
    text = spec("x: 'f32[B, 2 * T, 3 * S + 1]'", "y = x[:, 1::2, ::3]\nw = x[:, :-2:2, 1::3]", "y w")
    # (2T - 1 + 1) // 2 = T; (3S + 1 + 2) // 3 = S + 1; (2T - 2 + 1) // 2 = T - 1; 3S // 3 = S
    assert output_types(text) == ["f32[B, T, (S + 1)]", "f32[B, (T - 1), S]"]


def test_a_symbolic_length_that_does_not_divide_is_a_located_error():
    assert_error(spec("x: 'f32[B, T, 4]'", "y = x[:, ::2]"), 6, 12,
                 "index: the strided length of a symbolic dimension must be exact: dimension 1 of f32[B, T, 4] "
                 "takes T elements by steps of 2, and ceil(T / 2) is not a polynomial in its symbols; declare the "
                 "dimension as a multiple of 2 (e.g. 2 * T2 in the input's type) or give it a fixed size")
    # of a multiple of 2, a step of 3 does not divide either; the batch axis likewise
    assert "ceil((2*T - 1) / 3)" in only_error(spec("x: 'f32[B, 2 * T]'", "y = x[:, 1::3]")).message
    assert "dimension 0 of f32[B, 2*T]" in only_error(spec("x: 'f32[B, 2 * T]'", "y = x[::2]")).message


def test_empty_strided_slices_are_errors_as_unstrided_ones():
    assert_error(spec("x: 'f32[B, 6]'", "y = x[:, 4:2:2]"), 6, 12, "index: the slice of dimension 1 is empty")
    assert_error(spec("x: 'f32[B, 6]'", "y = x[:, 8::2]"), 6, 12,
                 "index: slice start 8 is out of range for dimension 1 of size 6")


# -- errors at the step ---------------------------------------------------------------------------------

@pytest.mark.parametrize("index, col, got", [
    ("x[:, ::0]", 14, "the integer 0"),
    ("x[:, ::-1]", 14, "the integer -1"),
    ("x[1::-2, :]", 12, "the integer -2"),
    ("x[:, 0:4:k - 3]", 16, "the integer 0"),
    ("x[:, ::1.5]", 14, "the number 1.5"),
    ("x[:, ::T]", 14, "the dimension T"),
    ("x[:, ::true]", 14, "the boolean true"),
])
def test_a_step_that_is_not_positive_is_located_at_the_step(index, col, got):
    text = spec_text("x: 'f32[B, T, 4]'", f"y = {index}", dims="B: 2, T: 5", params="{k: 3}")
    d = only_error(text)
    assert (d.span.line, d.span.col, d.message) == (7, col, f"slice steps must be positive integers, got {got}")
    negative = got in ("the integer -1", "the integer -2")
    assert any("no negative steps" in n for n in d.notes) == negative, d.notes


def test_specc_check_reports_the_step_with_a_caret(tmp_path):
    from test_cli_errors import failed, write

    path = write(tmp_path, spec("x: 'f32[B, T, 4]'", "y = x[:, 1::-1]"))
    err, heads = failed("check", str(path))
    assert heads == [(str(path), 6, 15, "slice steps must be positive integers, got the integer -1")]
    assert "    6 |   y = x[:, 1::-1]\n      |               ^~\n" in err, err


def test_a_step_in_a_param_expression():
    text = spec_text("x: 'f32[B, 12]'", "y = x[:, ::k - 1]\nw = x[:, ::max(k, 4)]", "y w", dims="B: 2",
                     params="{k: 3}")
    assert output_types(text) == ["f32[B, 6]", "f32[B, 3]"]


# -- the IR: printed with the step, step 1 unchanged, passes that read indices -----------------------------

def test_ir_prints_the_step_and_records_step_1_as_before():
    graph = specc.compile(TEXT)
    text = print_graph(graph)
    for index in ("[:, ::2]", "[:, 1::3, 2:11:4]", "[0, -5:-1:2]", "[:, :, ::5]", "[:, 1:-1:2, ::4]",
                  "[:, ::3, 3:]", "[:, 2:4:5, 0:12]", "[:, (2*S - 3)::2]"):
        assert f"index={index})" in text, (index, text)
    items = {n.name: n.attr("index") for _, n in graph.nodes() if n.op == "getitem"}
    assert items["a"] == (("slice", None, None), ("slice", None, None, 2))
    assert items["i"] == (("slice", None, None), ("slice", 2, 4, 5), ("slice", 0, 12))  # 0:12:1 is 0:12


def test_generated_code_writes_the_steps():
    from specc.backends.pytorch.build import artifacts

    source = artifacts(specc.compile(TEXT), TEXT, "m.yaml")["model.py"].decode()
    for line in ("a = x[:, ::2]", "b = x[:, 1::3, 2:11:4]", "c = x[0, -5:-1:2]", "i = x[:, 2:4:5, 0:12]"):
        assert f"        {line}  #" in source, (line, source)


def test_cse_merges_equal_strides_only():
    from equivalence import ir_after

    text = spec("x: 'f32[B, 8]'",
                "y = relu(x[:, ::2]) + relu(x[:, ::2]) + relu(x[:, 0:4]) + relu(x[:, 0:4:1]) + relu(x[:, :8:2])")
    ir = ir_after(text, "cse")
    # one x[:, ::2], one x[:, 0:4] (0:4:1 is 0:4), and x[:, :8:2] apart (as x[:, :4] is from x[:, 0:4])
    assert ir.count("getitem(") == 3 and ir.count("relu(") == 3, ir
    assert "index=[:, ::2]" in ir and "index=[:, 0:4]" in ir and "index=[:, :8:2]" in ir, ir


def test_a_strided_step_picked_out_of_a_stack_is_no_identity():
    from equivalence import ir_after

    text = """specc: 1
name: stack
inputs:
  x: f32[B, 4]
blocks:
  step(h): |
    return relu(linear(h, 4))
graph: |
  hs = repeat(3, step, x, stack=true)
  y = hs[1, :, ::2]
  w = hs[2, ::1, 0:4:1]
outputs:
  y:
  w:
"""
    ir = ir_after(text, "eliminate_identity")
    assert ir.count("getitem(") == 1 and "index=[1, :, ::2]" in ir, ir  # w is step 2 itself


# -- values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_torch_matches_torch_slicing(opt_level):
    model = load64(TEXT, opt_level=opt_level)
    for seed, s in ((0, 3), (1, 2), (2, 5)):
        x, z, r = inputs64(model, seed=seed, B=3, S=s)
        with torch.no_grad():
            got = model(x, z, r)
        want = reference(x, z, r)
        for name, g in zip(OUTS.split(), got):
            assert g.shape == want[name].shape, (name, g.shape, want[name].shape)
            assert torch.equal(g, want[name]), f"-O{opt_level} {name} at S={s}"


def test_tvm_llvm_matches_torch():
    """One library for every B and S: strided_slice with strides, a symbolic end (2 * S) among them."""
    pytest.importorskip("tvm")
    from test_tvm_ops import check

    check(TEXT, [dict(B=1, S=2), dict(B=3, S=5)], "strided")


def test_tvm_cuda_codegen():
    """The CUDA path without a GPU (as tests/test_tvm_cuda.py): every strided copy scheduled, CUDA C made."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source

    src = device_source(specc.compile(TEXT), {"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in src and "threadIdx.x" in src


# -- recipe expressions (losses and metrics) share the grammar ------------------------------------------

def _recipe_eval(text: str, env: dict):
    """`text` as a recipe expression on line 1 of spec.yaml, evaluated as a loss or a metric is."""
    from specc.dsl.diagnostics import Collector
    from specc.dsl.parser import parse
    from specc.dsl.yamlpos import TextOrigin
    from specc.train.expr import TENSOR_FUNCTIONS, evaluate

    errors = Collector()
    e = parse(text, TextOrigin("spec.yaml", 1, 1, False, len(text), 1), "expression", errors)
    assert e is not None and not errors.diagnostics
    return evaluate(e, env, TENSOR_FUNCTIONS, {"spec.yaml": text})


def test_recipe_expressions_take_steps_as_torch_does():
    from specc import SpecError

    e = torch.arange(24.0).reshape(2, 12)
    assert torch.equal(_recipe_eval("mean(e[:, 1::3])", {"e": e}), e[:, 1::3].mean())
    with pytest.raises(SpecError) as info:  # torch's own error, at the index
        _recipe_eval("mean(e[:, ::-1])", {"e": e})
    d = info.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (1, 6) and "step must be greater than zero" in d.message, d


def test_an_error_of_one_dimension_points_at_its_item():
    """The item of the dimension at fault, not the whole index (counted after what '...' takes)."""
    assert_error(spec("x: 'f32[B, T, 4]'", "y = x[0, 1:T:2, :]"), 6, 12, only_error(
        spec("x: 'f32[B, T, 4]'", "y = x[0, 1:T:2, :]")).message)
    assert_error(spec("x: 'f32[B, 4, 5]'", "y = x[..., 7]"), 6, 14, "index: 7 is out of range for dimension 2 of size 5")
    assert_error(spec("x: 'f32[B, 4, 5]'", "y = x[..., 2:2, 0]"), 6, 14, "index: the slice of dimension 1 is empty")


# -- bounds on symbolic dimensions ---------------------------------------------------------------------

@pytest.mark.parametrize("index, col, message", [
    ("x[:, 0:8]", 12, "index: slice stop 8 needs dimension 1 of f32[B, T, 4] to be at least 8, but T may be 1; "
                      "declare T: {min: 8} in dims"),
    ("x[:, -4:]", 12, "index: slice start -4 needs dimension 1 of f32[B, T, 4] to be at least 4, but T may be 1; "
                      "declare T: {min: 4} in dims"),
    ("x[:, 6]", 12, "index: index 6 needs dimension 1 of f32[B, T, 4] to be at least 7, but T may be 1; "
                    "declare T: {min: 7} in dims"),
    ("x[:, -6]", 12, "index: index -6 needs dimension 1 of f32[B, T, 4] to be at least 6, but T may be 1; "
                     "declare T: {min: 6} in dims"),
    ("x[1]", 9, "index: index 1 needs dimension 0 of f32[B, T, 4] to be at least 2, but B may be 1; "
                "declare B: {min: 2} in dims"),
    ("x[:, 1:1 + T]", 12, "index: slice stop (T + 1) of dimension 1 of f32[B, T, 4] may lie outside 0 <= start <= "
                          "stop <= T at sizes the dims allow (torch would clamp it, and its length not be stop - "
                          "start); declare minimums in dims that keep it inside, or slice with bounds that do"),
    ("x[:, T - 2:]", 12, "index: slice start (T - 2) of dimension 1 of f32[B, T, 4] may lie outside 0 <= start <= "
                         "stop <= T at sizes the dims allow (torch would clamp it, and its length not be stop - "
                         "start); declare minimums in dims that keep it inside, or slice with bounds that do"),
])
def test_a_bound_the_dims_allow_outside_a_symbolic_dimension_is_a_located_error(index, col, message):
    """A constant (or symbolic) bound that some allowed size puts outside the dimension: torch clamps the
    slice (or raises) and TVM read past the tensor, so the declared type was wrong; now a located error."""
    assert_error(spec("x: 'f32[B, T, 4]'", f"y = {index}"), 6, col, message)


def test_declared_minimums_make_bounds_safe():
    text = spec_text("x: 'f32[B, T, 4]'", "a = x[:, 0:3]\nb = x[:, -4:]\nc = x[:, 3]\nd = x[:, T - 2:]\ne = x[1, 1:T]",
                     "a b c d e", dims="B: {example: 2, min: 2}, T: {example: 5, min: 4}")
    assert output_types(text) == ["f32[B, 3, 4]", "f32[B, 4, 4]", "f32[B, 4]", "f32[B, 2, 4]", "f32[(T - 1), 4]"]
    model = load64(text, 2)
    for t in (4, 6):  # the least size and above
        (x,) = inputs64(model, T=t)
        got = model(x)
        want = (x[:, 0:3], x[:, -4:], x[:, 3], x[:, t - 2:], x[1, 1:t])
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="outside \\[4, inf\\]"):  # the input check keeps T within its bounds
        model(torch.zeros(2, 3, 4, dtype=torch.float64))
