"""`specc graph`: DOT and a pure-Python SVG of the IR, with block instances as frames and the
training-only part drawn apart."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path


import specc
from specc.cli import main
from specc.graph import layout, render, training_only

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"

AUX = """\
specc: 1
name: aux
params:
  d: 16
  layers: 2
inputs:
  x: f32[B, T, d]
blocks:
  inner(h): |
    return h + relu(linear(h, d))
  block(h): |
    g = inner(layer_norm(h))
    return g + mlp(g, hidden=2 * d)
graph: |
  h = repeat(layers, block, x)
  y = linear(h, 4)
  aux = linear(relu(linear(h, 8)), 2)
outputs:
  y: null
  aux: {type: null, training_only: true}
"""


def parse(svg: str):
    root = ET.fromstring(svg)
    rects = root.iter(f"{SVG}rect")
    nodes = [r for r in root.iter(f"{SVG}rect") if "node" in r.get("class", "").split()]
    frames = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "cluster"]
    titles = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "cluster-title"]
    del rects
    return root, nodes, frames, titles


def boxes(rects):
    return [tuple(float(r.get(k)) for k in ("x", "y", "width", "height")) for r in rects]


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_svg_has_a_box_per_node_and_titled_frames():
    graph = specc.compile(AUX)
    dot, svg = render(graph)
    root, nodes, frames, titles = parse(svg)
    assert len(nodes) == len(graph)
    assert sorted(titles) == sorted(["h.0 (block)", "h.0.g (inner)", "h.1 (block)", "h.1.g (inner)"])
    assert len(frames) == 4
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "linear" in texts and "f32[B, T, 16]" in texts and "-> aux" in texts
    # the layout: node boxes never overlap, and every frame holds its nodes
    b = boxes(nodes)
    assert not any(overlap(b[i], b[j]) for i in range(len(b)) for j in range(i))
    lay = layout(graph)
    for scope, fx, fy, fw, fh in lay.frames:
        for nid, (x, y, w, h) in lay.nodes.items():
            if graph.node(nid).scope[:len(scope)] == scope:
                assert fx <= x and x + w <= fx + fw and fy <= y and y + h <= fy + fh
    siblings = [(s, box) for s, *box in lay.frames if len(s) == 1]
    assert not any(overlap(a[1], b[1]) for i, a in enumerate(siblings) for b in siblings[:i])


def test_training_only_nodes_are_dashed_and_grey():
    graph = specc.compile(AUX)
    grey = training_only(graph)
    assert {graph.node(n).op for n in grey} == {"linear", "relu"} and len(grey) == 3
    _, svg = render(graph)
    _, nodes, _, _ = parse(svg)
    marked = [r for r in nodes if "training" in r.get("class").split()]
    assert len(marked) == 3
    assert "stroke-dasharray" in svg
    dot, _ = render(graph)
    assert dot.count("dashed") == 3


def test_dot_has_clusters_and_every_edge():
    graph = specc.compile(AUX)
    dot, _ = render(graph)
    assert dot.startswith('digraph "aux" {') and dot.rstrip().endswith("}")
    assert len(re.findall(r"subgraph cluster_\d+ \{", dot)) == 4
    assert 'label="h.0.g (inner)"' in dot
    assert len(re.findall(r"^  n\d+ -> n\d+;$", dot, re.M)) == graph.g.number_of_edges()


def test_cli_writes_svg_and_dot(tmp_path, capsys):
    spec = tmp_path / "aux.yaml"
    spec.write_text(AUX)
    out = tmp_path / "pics" / "aux.svg"
    assert main(["graph", str(spec), "-o", str(out), "--set", "layers=3"]) == 0
    assert "drew aux" in capsys.readouterr().out
    _, nodes, _, titles = parse(out.read_text())
    assert len(nodes) == len(specc.compile(AUX, layers=3)) and "h.2 (block)" in titles
    assert (tmp_path / "pics" / "aux.dot").read_text().startswith("digraph")
    # the deploy graph has no training-only part
    assert main(["graph", str(spec), "-o", str(out), "--deploy"]) == 0
    capsys.readouterr()
    _, nodes, _, _ = parse(out.read_text())
    assert not [r for r in nodes if "training" in r.get("class").split()]
    assert len(nodes) == len(specc.compile(AUX)) - 3


def test_cli_optimised_graph(tmp_path, capsys):
    out = tmp_path / "gpt.svg"
    assert main(["graph", str(ROOT / "specs" / "gpt.yaml"), "-o", str(out), "-O", "2"]) == 0
    capsys.readouterr()
    _, nodes, _, titles = parse(out.read_text())
    unoptimised = specc.compile(ROOT / "specs" / "gpt.yaml")
    assert len(nodes) < len(unoptimised)  # -O2 removed the dropouts
    assert "h.1 (block)" in titles


def test_cli_writes_dot_alone_and_refuses_other_formats(tmp_path, capsys):
    spec = tmp_path / "aux.yaml"
    spec.write_text(AUX)
    assert main(["graph", str(spec), "-o", str(tmp_path / "g.dot")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {tmp_path / 'g.dot'}")
    assert [p.name for p in tmp_path.iterdir() if p.name != "aux.yaml"] == ["g.dot"]
    assert (tmp_path / "g.dot").read_text().startswith('digraph "aux" {')
    for name in ("g.png", "g"):
        assert main(["graph", str(spec), "-o", str(tmp_path / name), "--no-color"]) == 2
        err = capsys.readouterr().err
        assert "specc graph writes SVG (FILE.svg, and FILE.dot beside it) or DOT (FILE.dot)" in err
        assert "dot -Tpng FILE.dot -o FILE.png" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aux.yaml", "g.dot"]  # nothing else written


def test_cli_graph_errors_are_located(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(AUX.replace("linear(h, 4)", "lienar(h, 4)"))
    code = main(["graph", str(spec), "-o", str(tmp_path / "x.svg"), "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and f"{spec}:16:7: error: unknown operator 'lienar'" in err and "^" in err


def yolo_like(stages: int = 4, depth: int = 4) -> str:
    return f"""\
specc: 1
name: yolo_like
params:
  stages: {stages}
  depth: {depth}
  c: 16
inputs:
  img: f32[B, 3, 64, 64]
blocks:
  conv(x, out, k=3, s=1): |
    return silu(batch_norm(conv2d(x, out, k, stride=s, padding=k // 2)))
  repconv(x): |
    return silu(conv2d(x, c, 3, padding=1) + conv2d(x, c, 1) + x)
  elan(x): |
    a, b = split(conv(x, 2 * c, 1), 2, dim=1)
    b1 = repeat(depth, repconv, b)
    b2 = conv(b1, c)
    return conv(concat([a, b, b1, b2], dim=1), c, 1)
  stage(x): |
    return elan(conv(x, c, 3, 1))
graph: |
  h = conv(img, c, 3, 2)
  h = repeat(stages, stage, h)
  p = max_pool2d(h, 5, stride=1, padding=2)
  y = conv(concat([h, p], dim=1), 8, 1)
  aux = conv(h, 4, 1)
outputs:
  y: null
  aux: {{type: null, training_only: true}}
"""


def test_a_yolo_sized_graph_renders_in_seconds():
    graph = specc.compile(yolo_like(stages=12, depth=8))
    assert len(graph) > 500
    t0 = time.perf_counter()
    dot, svg = render(graph)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"{len(graph)} nodes took {elapsed:.1f}s"
    _, nodes, frames, titles = parse(svg)
    assert len(nodes) == len(graph)
    assert len(frames) == len({n.scope[:i] for _, n in graph.nodes() for i in range(1, len(n.scope) + 1)})
    assert "h_1.0 (stage)" in titles and "h_1.11.elan.b1.7 (repconv)" in titles
    b = boxes(nodes)
    order = sorted(range(len(b)), key=lambda i: b[i][1])
    for k, i in enumerate(order):  # no two node boxes overlap (sweep over y)
        for j in order[k + 1:]:
            if b[j][1] >= b[i][1] + b[i][3]:
                break
            assert not overlap(b[i], b[j])
