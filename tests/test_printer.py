"""The text IR is pinned: one node per line with its type, parameters and source location."""

from pathlib import Path

from specc.compiler.frontend import compile_source
from specc.compiler.printer import print_graph

DATA = Path(__file__).parent / "data"


def test_ir_text_is_pinned():
    _, graph = compile_source((DATA / "tiny.yaml").read_text(), "tiny.yaml")
    assert print_graph(graph) == (DATA / "tiny.ir").read_text()


def test_ir_lines_carry_real_locations():
    text = (DATA / "tiny.yaml").read_text()
    _, graph = compile_source(text, "tiny.yaml")
    lines = text.splitlines()
    for _, node in graph.nodes():
        line = lines[node.span.line - 1]
        # the span points at the text the node came from
        if node.op == "split":
            assert line[node.span.col - 1:].startswith("split(")
        if node.op == "mlp":
            assert line[node.span.col - 1:].startswith("mlp(")
        if node.op == "input":
            assert line[node.span.col - 1:].startswith("x:")


def test_explicit_initialisers_are_shown_and_defaults_are_not():
    import specc
    from specc.compiler.printer import print_graph

    text = """\
specc: 1
name: inits
dims:
  B: 2
inputs:
  x: f32[B, 8]
graph: |
  a = linear(x, 8, init=normal(0.02), bias_init=zeros)
  b = linear(a, 8)
  P = parameter(3, 8, init=zeros, frozen=true)
  y = b + mean(P, dim=0)
outputs:
  y: f32[B, 8]
"""
    ir = print_graph(specc.compile(text), show_span=False)
    a, b, p = (line for line in ir.splitlines() if "@" in line)
    assert "weight: f32[8, 8] init=normal(0.02, 0)" in a and "bias: f32[8] init=zeros" in a
    assert "init=" not in b
    assert "weight: f32[3, 8] frozen init=zeros" in p
