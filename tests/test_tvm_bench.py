"""The TVM benchmark tool (backends/tvm/bench.py) on a small spec: it measures every variant asked for,
compares each output of a model with several outputs, and lists the whole zoo for --zoo."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tvm")

from specc.backends.tvm import bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SPEC = """specc: 1
name: two_convs
dims:
  B: 2
inputs:
  x: f32[B, 3, 8, 8]
graph: |
  a = relu(conv2d(x, 4, 3, padding=1))
  b = mean(conv2d(a, 6, 3, stride=2, padding=1), dim=[2, 3])
outputs:
  a: f32[B, 4, 8, 8]
  b: f32[B, 6]
"""


def test_bench_measures_each_variant_and_compares_every_output(tmp_path):
    path = tmp_path / "two_convs.yaml"
    path.write_text(SPEC)
    lines: list[str] = []
    rows = bench.bench_spec(str(path), {}, {}, [1, 2], ["scheduled", "im2col"], None, 0.02, out=lines.append)
    got = {(r["variant"], r["B"]) for r in rows}
    assert got == {(v, b) for v in ("torch eager", "scheduled", "im2col") for b in (1, 2)}
    for r in rows:
        assert r["ms"] > 0 and r["err"] <= 1e-4, r
        if r["variant"] != "torch eager":
            assert r["build_s"] > 0 and r["ratio"] > 0


def test_max_diff_over_outputs():
    import torch

    a, b = torch.zeros(2, 3), torch.ones(4)
    assert bench.max_diff((a, b), (a + 0.5, b)) == 0.5
    assert bench.max_diff(torch.empty(0, 3), torch.empty(0, 3)) == 0.0


def test_zoo_is_every_spec():
    names = {Path(p).stem for p, _, _ in bench.zoo()}
    assert names == {p.stem for p in (ROOT / "specs").glob("*.yaml")}
    gpt = next(ov for p, ov, _ in bench.zoo() if Path(p).stem == "gpt")
    assert gpt == {"d_model": 256, "layers": 4, "block_size": 128}
