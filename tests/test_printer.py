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
