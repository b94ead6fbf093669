"""Located diagnostics through the Python API: every independent error of a spec is reported at once,
at the real line and column of the spec file (also inside `|` block scalars), with a readable
message; a failing statement never causes follow-on errors elsewhere."""

from __future__ import annotations

import math
import re

import pytest

import specc
from specc import SpecError
from specc.dsl.diagnostics import Diagnostic, Span, render
from specc.dsl.yamlpos import load_yaml

# Lines 1-6 of most specs below; the graph body then starts on line 8 at column 3.
HEAD = """\
specc: 1
name: m
params:
  d: 16
inputs:
  x: f32[B, T, d]
"""


def errors(text: str, **overrides) -> list[Diagnostic]:
    with pytest.raises(SpecError) as info:
        specc.check(text, **overrides)
    return info.value.diagnostics


def where(diags: list[Diagnostic]) -> list[tuple[int, int]]:
    return [(d.span.line, d.span.col) for d in diags]


def only(text: str, **overrides) -> Diagnostic:
    diags = errors(text, **overrides)
    assert len(diags) == 1, [f"{d.span}: {d.message}" for d in diags]
    return diags[0]


def spec(graph: str, outputs: str = "  y: null\n", head: str = HEAD, blocks: str = "") -> str:
    body = "".join("  " + line + "\n" for line in graph.splitlines())
    return head + blocks + "graph: |\n" + body + "outputs:\n" + outputs


# ---------------------------------------------------------------------------------------------
# YAML syntax
# ---------------------------------------------------------------------------------------------

def test_yaml_syntax_error_points_at_the_offending_character():
    d = only("specc: 1\nname: m\ninputs: {x: f32[B, 4]\n")
    assert (d.span.file, d.span.line, d.span.col) == ("<spec>", 3, 16)
    assert d.message.startswith("YAML syntax error: ")


def test_yaml_duplicate_keys_are_all_reported_with_the_first_definition():
    text = HEAD.replace("  d: 16\n", "  d: 16\n  d: 32\n") + "name: n\ngraph: |\n  y = x\noutputs:\n  y: null\n"
    diags = errors(text)
    assert where(diags) == [(5, 3), (8, 1)]
    assert diags[0].message == "duplicate key 'd'"
    assert diags[0].notes == ("first defined at <spec>:4:3",)
    assert diags[1].message == "duplicate key 'name'"


def test_yaml_tab_indentation_is_a_located_error():
    d = only("specc: 1\nname: m\nparams:\n\td: 1\n")
    assert d.span.line == 4 and d.message.startswith("YAML syntax error")


# ---------------------------------------------------------------------------------------------
# The YAML layer (schema)
# ---------------------------------------------------------------------------------------------

def test_spec_files_are_read_as_yaml_1_2():
    """YAML 1.1's `no`, `on`, octal `010`, `1_000` and sexagesimal `1:30` do not reach a spec."""
    text = ("a: no\nb: on\nc: 010\nd: 1_000\ne: 1:30\nf: 1e-5\ng: -.inf\nh: 0x1F\ni: 0o17\nj: ~\n"
            "k: TRUE\nl: !!float 3\nm: +4\nn: 2026-12-07\n")
    assert load_yaml(text, "s.yaml").data == {
        "a": "no", "b": "on", "c": 10, "d": "1_000", "e": "1:30", "f": 1e-5, "g": -math.inf, "h": 31,
        "i": 15, "j": None, "k": True, "l": 3.0, "m": 4, "n": "2026-12-07"}
    with pytest.raises(SpecError) as info:
        load_yaml("a: !!int 1_0\nb: !!bool yes\n", "s.yaml")
    assert [(d.span.line, d.message) for d in info.value.diagnostics] == [
        (1, "invalid !!int value '1_0'"), (2, "invalid !!bool value 'yes'")]
    d = only(HEAD + "graph: |\n  y = relu(x)\noutputs:\n  y: {type: null, training_only: yes}\n")
    assert (d.span.line, d.span.col) == (10, 34)
    assert d.message == ("outputs.y.training_only: expected a boolean, got a string ('yes': spec files are "
                         "YAML 1.2, whose booleans are true and false)")


def test_schema_errors_point_at_keys_and_values_and_suggest_names():
    text = HEAD.replace("name: m\n", "name: 1m\nnmae: m\n") + "graph: |\n  y = x\noutputs:\n  y: 3\nseed: abc\n"
    diags = errors(text)
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (2, 7, "name: '1m' is not a valid name (letters, digits and '_', not starting with a digit)"),
        (3, 1, "unknown key 'nmae' (did you mean 'name'?)"),
        (11, 6, "outputs.y: expected a string or a mapping, got an integer"),
        (12, 7, "seed: expected an integer, got a string"),
    ]


def test_every_bad_name_is_reported_at_its_own_key():
    text = """\
specc: 1
name: m
params:
  d: 4
  class: 1
  ok: [1, 2]
  "x\\n": 2
inputs:
  x: f32[B, d]
  "a b": f32[B]
  __dict__: f32[B]
graph: |
  y = x
outputs:
  y: null
"""
    diags = errors(text)
    assert [(d.span.line, d.span.col) for d in diags] == [(5, 3), (6, 7), (7, 3), (10, 3), (11, 3)]
    assert diags[0].message == "params: 'class' is a reserved word and cannot be used as a name"
    assert diags[1].message == "params.ok: expected a boolean or an integer or a number or a string, got a list"
    assert diags[2].message.startswith(r"params: 'x\n' is not a valid name")
    assert diags[3].message.startswith("inputs: 'a b' is not a valid name")
    assert "'__dict__' starts with '__'" in diags[4].message
    assert diags[1].span.end_col == 13  # the caret covers the value [1, 2]


def test_yaml_layer_errors_and_graph_errors_are_reported_together():
    text = """\
specc: 1
name: m
descripton: a typo
params:
  d: [1, 2]
  e: 4
inputs:
  x: f32[B, e]
blocks:
  blk(h): 5
graph: |
  y = lienar(x, d)
  w = blk(x) + relu(x, foo=1)
outputs:
  y: null
  w: 7
"""
    diags = errors(text)
    assert [(d.span.line, d.span.col) for d in diags] == [(3, 1), (5, 6), (10, 11), (12, 7), (13, 24), (16, 6)]
    msgs = [d.message for d in diags]
    assert msgs[0] == "unknown key 'descripton' (did you mean 'description'?)"
    assert msgs[2] == "blocks.blk(h): expected a string, got an integer"
    assert msgs[3] == "unknown operator 'lienar' (did you mean 'linear'?)"
    assert msgs[4] == "relu() has no argument 'foo'"
    # 'd' and 'blk' were left out for their own errors: using them is no further error


def test_dims_bounds_are_checked():
    text = HEAD.replace("inputs:", "dims:\n  T: {example: 0}\n  S: {example: 4, mx: 3}\n  U: 0\n"
                                   "  V: 0x8000000000000000\n  W: {example: 9, max: 4}\ninputs:") + \
        "graph: |\n  y = x\noutputs:\n  y: null\n"
    diags = errors(text)
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (6, 16, "dims.T.example: must be greater than 0, got 0"),
        (7, 19, "unknown key 'mx' in 'dims.S' (did you mean 'max'?)"),
        (8, 6, "dims.U: the example size must be positive, got 0"),
        (9, 6, "dims.V: sizes must stay below 2**63"),
        (10, 6, "dims.W: the example 9 is outside [1, 4]"),
    ]


# ---------------------------------------------------------------------------------------------
# Grammar errors, located inside block scalars
# ---------------------------------------------------------------------------------------------

def test_every_syntax_error_of_a_body_is_reported_and_the_rest_still_checked():
    text = spec("h = lienar(x, d)\ny = relu(h +)\nz = x $ 2\nw = relu(h")
    diags = errors(text)
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (8, 7, "unknown operator 'lienar' (did you mean 'linear'?)"),
        (9, 15, "syntax error: unexpected ')'"),
        (10, 9, "unexpected character '$'"),
        (11, 11, "'(' is never closed"),
    ]
    # no "output 'y' is not defined": y is assigned on a line with a syntax error


def test_syntax_error_inside_a_multiline_call_points_at_the_real_token():
    diags = errors(spec("y = linear(x,\n  d +)\nz = lienar(x)"))
    assert [(d.span.line, d.span.col) for d in diags] == [(9, 8), (10, 7)]
    assert diags[0].message == "syntax error: unexpected ')'"
    assert diags[1].message.startswith("unknown operator 'lienar'")


def test_unclosed_bracket_at_the_end_of_a_body():
    d = only(spec("y = relu(x)\nz = linear(x,\n  d"))
    assert (d.span.line, d.span.col, d.message) == (9, 13, "'(' is never closed")


def test_statement_without_assignment():
    d = only(spec("relu(x)\ny = x"))
    assert (d.span.line, d.span.col) == (8, 7)
    assert d.message.startswith("syntax error: unexpected '('")


@pytest.mark.parametrize("header, indent, line, col", [
    ("|", "  ", 9, 7),          # the usual form
    ("|-", "  ", 9, 7),         # strip chomping
    ("|+", "  ", 9, 7),         # keep chomping
    ("|   # comment", "  ", 9, 7),
    ("|", "      ", 9, 11),     # deeper indentation than needed
    ("|2", "    ", 9, 9),       # explicit indentation: two of the four spaces are content
])
def test_positions_inside_block_scalars(header, indent, line, col):
    text = HEAD + f"graph: {header}\n{indent}y = relu(x)\n{indent}z = lienar(x, 2)\noutputs:\n  y: null\n"
    d = only(text)
    assert (d.span.line, d.span.col) == (line, col), d
    assert (d.span.end_line, d.span.end_col) == (line, col + 6)


def test_positions_with_blank_lines_crlf_and_tabs_in_a_body():
    text = HEAD + "graph: |\n\n  y = relu(x)\n\n  z =\tlienar(x, 2)\noutputs:\n  y: null\n"
    assert where(errors(text)) == [(11, 7)]
    assert where(errors(text.replace("\n", "\r\n"))) == [(11, 7)]


def test_positions_inside_nested_block_bodies():
    blocks = "blocks:\n  enc(h, k=2):   |\n      h = h + lienar(h, k)\n      return h\n"
    d = only(spec("y = enc(x)", blocks=blocks))
    assert (d.span.line, d.span.col) == (9, 15)
    assert d.notes[-1] == "in block 'enc' called at <spec>:12:7"


def test_an_error_in_nested_blocks_names_the_whole_call_chain():
    """An error two blocks deep says where each block was called, innermost first (through a repeat,
    once: the steps' copies of the error are one)."""
    blocks = "blocks:\n  inner(h): |\n    return lienar(h, 2)\n  outer(h): |\n    return inner(h) + h\n"
    d = only(spec("y = repeat(2, outer, x)", blocks=blocks))
    assert (d.span.line, d.span.col) == (9, 12)
    assert d.notes[-1] == "in block 'inner' called at <spec>:11:12, in block 'outer' called at <spec>:13:7"


@pytest.mark.parametrize("value, col", [
    ("y = relu(lienar(x, 2))", 17),        # plain
    ('"y = relu(lienar(x, 2))"', 18),      # double-quoted
    ("'y = relu(lienar(x, 2))'", 18),      # single-quoted
])
def test_positions_inside_one_line_scalars(value, col):
    d = only(HEAD + f"graph: {value}\noutputs:\n  y: null\n")
    assert (d.span.line, d.span.col) == (7, col)


@pytest.mark.parametrize("value, line, col", [
    ('"y = \\u0072elu(lienar(x, 2))"', 7, 23),                      # after an escape
    ('"y = relu(x)\\nz = lienar(x, 2)"', 7, 26),                     # an escaped line break
    ('"y = relu(x)\\n\\tz = lienar(x, 2)"', 7, 28),
    ('"y = relu(x)\n\n  z = \\\n     lienar(x, 2)"', 10, 6),        # folded lines, an escaped break
    ("'y = relu(x)\n\n  z = lienar(''x'', 2)'", 9, 7),               # folded single-quoted, ''
    ("y = relu(x)\n\n  z = lienar(x, 2)", 9, 7),                     # a multi-line plain scalar
    (">\n  y = relu(x)\n\n  z = lienar(x, 2)", 10, 7),               # folded block scalars
    (">-   # comment\n    y = relu(x)\n\n\n    z = lienar(x,\n      2)", 11, 9),
])
def test_positions_inside_quoted_folded_and_multiline_scalars(value, line, col):
    """Escapes and folding change where the text stands in the file; errors still point at the token."""
    text = HEAD + f"graph: {value}\noutputs:\n  y: null\n"
    d = only(text)
    assert (d.span.line, d.span.col) == (line, col), d
    assert (d.span.end_line, d.span.end_col) == (line, col + 6)
    assert text.splitlines()[line - 1][col - 1:col + 5] == "lienar"


def test_a_syntax_error_in_a_folded_body_says_that_folding_joins_lines():
    d = errors(HEAD + "graph: >\n  h = relu(x)\n  y = relu(h)\noutputs:\n  y: null\n")[0]
    assert (d.span.line, d.span.col) == (9, 3) and d.message == "syntax error: unexpected 'y'"
    assert "folded scalar (>)" in d.notes[0] and "literal blocks (|)" in d.notes[0]


@pytest.mark.parametrize("graph", [
    ">\n  h = relu(x) +* 2\n  y = relu(h)",             # folding joins the two statements into one line
    ">\n  h, g = relu(x) +* 2, x\n  y = linear(h, 2, bias=g > 0)",
    "|\n  h = relu(x) +* 2; y = relu(h)",                # two statements on a line
])
def test_every_statement_of_a_broken_line_counts_as_defined(graph):
    """A broken line's statements all count as assigned (no 'output is not defined' after its error)."""
    ds = errors(HEAD + f"graph: {graph}\noutputs:\n  y: null\n")
    assert [d.message for d in ds] == ["syntax error: unexpected '*'"], ds


def test_errors_in_block_signatures_and_types():
    text = """\
specc: 1
name: m
inputs:
  a: f33[B, 4]
  b: f32[B, 4
  c: f32[B, -1]
blocks:
  bad sig(h): |
    return h
  ok(h, h): |
    return h
graph: |
  y = bad(a)
outputs:
  y: f32[B, q q]
"""
    diags = errors(text)
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (4, 6, "unknown dtype 'f33' (did you mean 'f32'?)"),
        (5, 9, "'[' is never closed"),
        (6, 13, "a dimension must be positive, got -1"),
        (8, 7, "syntax error: unexpected 'sig'; expected '(', a new line"),
        (10, 9, "parameter 'h' of block 'ok' is repeated"),
        (15, 15, "syntax error: unexpected 'q'"),
    ]


# ---------------------------------------------------------------------------------------------
# Unknown operators and names
# ---------------------------------------------------------------------------------------------

def test_a_positional_argument_after_a_keyword_is_located():
    """linear(out=4, x) is refused, as Python refuses it (it had bound x to the first free argument)."""
    d = only(spec("y = linear(out=4, x)"))
    assert (d.span.line, d.span.col) == (8, 21)
    assert d.message == "a positional argument after the keyword argument 'out=': give the keyword arguments last"
    assert specc.check(spec("y = linear(x, out=4, bias=false)")).params == 16 * 4  # keywords last: fine


def test_unknown_operator_with_suggestion_and_caret_width():
    d = only(spec("y = lienar(x, d)"))
    assert (d.span.line, d.span.col, d.span.end_col) == (8, 7, 13)
    assert d.message == "unknown operator 'lienar' (did you mean 'linear'?)"


def test_unknown_names_suggest_values_before_operators():
    diags = errors(spec("y = relu(xx)\nz = linear(x, dd)\nw = gelu(x, approximate=tanhh)"))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (8, 12, "undefined name 'xx' (did you mean 'x'?)"),
        (9, 17, "undefined name 'dd' (did you mean 'd'?)"),
        (10, 15, "gelu(): argument 'approximate' must be one of 'none', 'tanh', got 'tanhh' (did you mean 'tanh'?)"),
    ]  # (a bare name for a string with choices is read as that string)


def test_unknown_names_in_a_block_the_graph_never_calls():
    blocks = "blocks:\n  unused(h): |\n    a = lienar(h)\n    return a + nope\n"
    diags = errors(spec("y = relu(x)", blocks=blocks))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (9, 9, "unknown operator 'lienar' (did you mean 'linear'?)"),
        (10, 16, "undefined name 'nope'"),
    ]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def test_wrong_argument_names_and_types_are_each_located_at_the_argument():
    graph = "h = linear(x, d, bais=true)\nb = relu(h, foo=1)\nc = linear(x, 1.5)\ne = linear(x, out=x)\n" \
            "f = gelu(x, approximate='fast')\ng = linear(x)\nk = linear(x, d, d, d, d)\nm = linear(x, d, out=4)\n" \
            "y = x"
    diags = errors(spec(graph))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (8, 20, "linear() has no argument 'bais' (did you mean 'bias'?)"),
        (9, 15, "relu() has no argument 'foo'"),
        (10, 17, "linear(): argument 'out' must be an integer, got the number 1.5"),
        (11, 17, "linear(): argument 'out' must be a value computed from params, not a tensor"),
        (12, 15, "gelu(): argument 'approximate' must be one of 'none', 'tanh', got 'fast'"),
        (13, 7, "linear() is missing argument 'out'"),
        (14, 26, "linear() takes at most 4 positional arguments, got 5"),
        (15, 20, "linear() got argument 'out' twice"),
    ]
    assert diags[0].notes == ("signature: linear(x, out, bias=true, tie=none)",)


def test_block_arguments():
    blocks = "blocks:\n  enc(h, k=2): |\n    return h * k\n"
    diags = errors(spec("a = enc(x, q=1)\nb = enc(x, 1, 2)\nc = enc()\ny = x", blocks=blocks))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (11, 14, "block 'enc' has no argument 'q'"),
        (12, 7, "block 'enc' takes 2 arguments, got 3"),
        (13, 7, "block 'enc' is missing argument 'h'"),
    ]
    assert diags[0].notes == ("defined at <spec>:8:3",)


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes
# ---------------------------------------------------------------------------------------------

def test_shape_mismatch_names_both_shapes_and_the_dimension():
    diags = errors(spec("h = linear(x, 8)\na = h + x\nb = matmul(x, x)\nc = concat([h, x], dim=1)\ny = x"))
    assert where(diags) == [(9, 11), (10, 17), (11, 18)]  # concat: at the tensor that differs
    assert diags[0].message == ("add: cannot broadcast f32[B, T, 8] with f32[B, T, 16]: "
                                "dimension -1 is 8 vs 16")
    assert diags[1].message == ("matmul: inner dimensions differ: f32[B, T, 16] @ f32[B, T, 16] "
                                "(dimension -1 of x is 16, dimension -2 of y is T)")
    assert diags[2].message == ("concat: tensor 1 is f32[B, T, 16], tensor 0 is f32[B, T, 8]: "
                                "dimension 2 is 16 vs 8")


def test_declared_output_shape_and_dtype_mismatches():
    outputs = "  y: f32[B, T, 8]\n  z: i64[B, T, d]\n  w: f32[B, d]\n"
    diags = errors(spec("y = relu(x)\nz = relu(x)\nw = relu(x)", outputs=outputs))
    assert [(d.span.line, d.span.col, d.span.end_col) for d in diags] == [(12, 6, 18), (13, 6, 18), (14, 6, 15)]
    assert diags[0].message == ("output 'y': declared f32[B, T, 8] but the graph computes f32[B, T, 16]: "
                                "dimension 2 is 16, declared 8")
    assert diags[0].notes == ("computed at <spec>:8:7",)
    assert diags[1].message == "output 'z': declared dtype i64 but the graph computes f32"
    assert diags[2].message == ("output 'w': declared f32[B, 16] (rank 2) but the graph computes "
                                "f32[B, T, 16] (rank 3)")


def test_dtype_errors_name_the_tensor():
    head = HEAD + "  ids: i64[B, T] in range(100)\n"
    diags = errors(spec("a = embedding(x, 10, 4)\nb = embedding(ids, 10, 4)\nc = softmax(ids)\ny = x", head=head))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (9, 17, "embedding: ids must be an integer tensor, got f32[B, T, 16]"),
        (10, 17, "embedding: ids take values in range(0, 100), outside the table of 10 rows"),
        (11, 15, "softmax: expected a floating-point tensor for 'x', got i64[B, T]"),
    ]


# ---------------------------------------------------------------------------------------------
# Order, cycles, undefined values, recursion
# ---------------------------------------------------------------------------------------------

def test_cycle_is_named():
    diags = errors(spec("a = b + 1\nb = a + 1\ny = relu(q)\nz = y"))
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (8, 7, "'b' is used before it is defined"),
        (10, 12, "undefined name 'q'"),
    ]
    assert diags[0].notes == ("cycle: b -> a -> b",)


def test_use_before_definition_points_at_the_later_assignment():
    d = only(spec("y = relu(h)\nh = x"))
    assert (d.span.line, d.span.col) == (8, 12)
    assert d.notes == ("'h' is assigned at <spec>:9:3; statements run top to bottom",)


def test_output_not_defined_suggests_a_name():
    d = only(spec("yy = relu(x)"))
    assert (d.span.line, d.span.col) == (10, 3)
    assert d.message == "output 'y' is not defined by the graph (did you mean 'yy'?)"


def test_recursion_between_blocks():
    blocks = "blocks:\n  a(h): |\n    return b(h)\n  b(h): |\n    return a(h)\n"
    d = only(spec("y = a(x)", blocks=blocks))
    assert (d.span.line, d.span.col) == (11, 12)
    assert d.message == "block 'a' calls itself (through a -> b -> a)"


def test_input_with_a_bad_type_causes_no_follow_on_errors():
    d = only(spec("h = linear(x, d)\ny = relu(h)", head=HEAD.replace("f32[B, T, d]", "f32[B, T, d - 16]")))
    assert (d.span.line, d.span.col) == (6, 16)
    assert d.message == "a dimension must be positive, got 0"


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

def test_override_errors_through_the_api():
    """Keyword overrides from Python have no --set text: the errors say so (not `<--set>:1:1`)."""
    diags = errors(spec("y = linear(x, d)"), dd=3, d="abc")
    assert [(d.span.file, d.span.line, d.message) for d in diags] == [
        ("<keyword overrides>", 0, "unknown parameter 'dd' in override (did you mean 'd'?)"),
        ("<keyword overrides>", 0, "bad override for 'd': expected an integer, got 'abc'"),
    ]


def test_override_that_makes_the_spec_wrong_is_located_in_the_spec():
    d = only(spec("y = linear(x, d)"), d=-4)
    assert (d.span.file, d.span.line, d.span.col) == ("<spec>", 6, 16)
    assert d.message == "a dimension must be positive, got -4"


# ---------------------------------------------------------------------------------------------
# All at once
# ---------------------------------------------------------------------------------------------

ALL_AT_ONCE = """\
specc: 1
name: m
params:
  d: 16
inputs:
  x: f32[B, T, d]
blocks:
  enc(h): |
    h = h + lienar(h, d)
    return h
graph: |
  a = enc(x)
  b = relu(x +)
  c = linear(x, d, bais=true)
  e = linear(x, 8) + x
  f = g + 1
  g = f
  w = 10 ** 10 ** 10
  z = repeat(-1, enc, x)
outputs:
  y: null
  c: f32[B, T, d]
"""


def test_every_independent_error_at_once_sorted_and_without_follow_ons():
    diags = errors(ALL_AT_ONCE)
    assert [(d.span.line, d.span.col, d.message) for d in diags] == [
        (9, 13, "unknown operator 'lienar' (did you mean 'linear'?)"),
        (13, 15, "syntax error: unexpected ')'"),
        (14, 20, "linear() has no argument 'bais' (did you mean 'bias'?)"),
        (15, 22, "add: cannot broadcast f32[B, T, 8] with f32[B, T, 16]: dimension -1 is 8 vs 16"),
        (16, 7, "'g' is used before it is defined"),
        (18, 7, "result out of range"),
        (19, 14, "repeat count must be a non-negative integer, got the integer -1"),
        (21, 3, "output 'y' is not defined by the graph"),
    ]
    assert diags[0].notes[-1] == "in block 'enc' called at <spec>:12:7"


def test_render_prints_location_source_line_and_caret():
    with pytest.raises(SpecError) as info:
        specc.check(ALL_AT_ONCE)
    lines = info.value.render().splitlines()
    assert lines[:6] == [
        "<spec>:9:13: error: unknown operator 'lienar' (did you mean 'linear'?)",
        "    9 |     h = h + lienar(h, d)",
        "      |             ^~~~~~",
        "      = note: operators are listed by `specc ops`; blocks are defined under 'blocks:'",
        "      = note: in block 'enc' called at <spec>:12:7",
        "<spec>:13:15: error: syntax error: unexpected ')'",
    ]
    heads = [ln for ln in lines if re.match(r"^<spec>:\d+:\d+: error: ", ln)]
    assert len(heads) == 8


def test_render_escapes_control_characters_and_windows_long_lines():
    text = "a = " + "x" * 300 + " + lienar\nsecond \x1b[2J line\n"
    out = render([Diagnostic(Span("f.yaml", 1, 308, 1, 314), "unknown 'lie\x1bnar'"),
                  Diagnostic(Span("f.yaml", 2, 8), "here")], {"f.yaml": text})
    lines = out.splitlines()
    assert lines[0] == r"f.yaml:1:308: error: unknown 'lie\x1bnar'"
    assert lines[1].startswith("    1 | ...xxx") and lines[1].endswith("x + lienar")
    assert len(lines[1]) == len("    1 | ...") + 100
    caret = lines[2].index("^")
    assert lines[1][caret:caret + 6] == "lienar" and lines[2][caret:] == "^~~~~~"
    assert "\x1b" not in out
    assert lines[4] == "    2 | second ?[2J line"


def test_a_symbol_the_model_cannot_read_is_located_where_it_is_used():
    """A size the computation takes (a reshape's, arange's) must be readable from the inputs: a whole
    input dimension, or a * S + b with a and b numbers or sizes read so (B * T with B whole elsewhere
    gives T). One in no input, or only inside V * T, is an error at the node; V * T itself, with no node
    needing V or T alone, is fine."""
    head = ("specc: 1\nname: m\ndims:\n  U: 3\ninputs:\n  x: f32[V * T, 8]\n  y: f32[B, 2 * S + 1]\n"
            "  z: f32[B * R, S + 2 * R]\ngraph: |\n")
    diags = errors(head + "  a = reshape(x, [V, T, 8])\n  b = sum(arange(U))\noutputs:\n  a: null\n  b: null\n")
    assert [(d.span.line, d.span.col, d.message, d.notes) for d in diags] == [
        (10, 7, "symbolic dimension 'T' is only part of an input dimension (T*V of input 'x'), so its value cannot "
                "be read when the model runs", ("give an input a dimension T alone, or a * T + b with a and b "
                                                "numbers or sizes of symbols the inputs give",)),
        (10, 7, "symbolic dimension 'V' is only part of an input dimension (T*V of input 'x'), so its value cannot "
                "be read when the model runs", ("give an input a dimension V alone, or a * V + b with a and b "
                                                "numbers or sizes of symbols the inputs give",)),
        (11, 11, "symbolic dimension 'U' appears in no input's shape, so its value is unknown when the model runs",
         ())]
    specc.check(head + "  a = relu(x)\n  b = reshape(y[:, 1:], [B, S, 2])\n  c = reshape(z, [B, R, S + 2 * R])\n"
                       "outputs:\n  a: null\n  b: null\n  c: null\n")
