"""Generated model.py: standalone (torch + standard library only), deterministic, and equal to
what specc.load builds in memory."""

import ast
import sys
from pathlib import Path

import torch

import specc
from specc.backends.pytorch.build import import_model_module

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def test_generated_source_imports_only_torch_and_stdlib(tmp_path):
    for spec in sorted((ROOT / "specs").glob("*.yaml")) + [DATA / "tiny.yaml"]:
        out = specc.build(spec, tmp_path / spec.stem)
        tree = ast.parse((out / "model.py").read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names or top == "__future__", (spec, n)


def test_builds_are_byte_identical(tmp_path):
    a = specc.build(DATA / "tiny.yaml", tmp_path / "a")
    b = specc.build(DATA / "tiny.yaml", tmp_path / "b")
    for name in ("model.py", "weights.safetensors", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_load_equals_built_module(tmp_path):
    out = specc.build(DATA / "tiny.yaml", tmp_path / "tiny", hidden=24)
    module = import_model_module(out)
    built = module.load(out)
    inputs = module.example_inputs(seed=3, B=3, T=5)
    in_memory = specc.load(DATA / "tiny.yaml", hidden=24)
    with torch.no_grad():
        assert torch.equal(built(*inputs), in_memory(*inputs))
    assert built.h[0].mlp.fc1.weight.shape == (24, 8)


def test_repeat_becomes_module_list_and_loop(tmp_path):
    out = specc.build(DATA / "tiny.yaml", tmp_path / "tiny")
    src = (out / "model.py").read_text()
    assert "nn.ModuleList([Res() for _ in range(2)])" in src
    assert "for layer in self.h:" in src
    assert src.count("class Res(nn.Module)") == 1


def test_example_inputs_fit_declared_types(tmp_path):
    out = specc.build(ROOT / "specs" / "gpt.yaml", tmp_path / "gpt")
    module = import_model_module(out)
    (idx,) = module.example_inputs(B=3, T=7)
    assert idx.shape == (3, 7) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 65


def test_optimised_repeats_still_share_one_class(tmp_path):
    # passes derive per-instance weights; the instances keep one structure, so one class and a loop
    out = specc.build(ROOT / "specs" / "gpt.yaml", tmp_path / "gpt", opt_level=2, layers=4)
    src = (out / "model.py").read_text()
    assert src.count("class Block(nn.Module)") == 1 and "class Block2" not in src
    assert "nn.ModuleList([Block() for _ in range(4)])" in src and "for layer in self.h:" in src


def test_values_named_like_helpers_or_builtins_do_not_shadow_them(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "shadow.yaml"
    spec.write_text("""\
specc: 1
name: shadow
dims:
  B: 2
inputs:
  x: f32[B, 4]
  lam: f32[]
graph: |
  GradReverse = grad_reverse(x, lam)
  max = GradReverse * 2
  MultiHeadAttention = attention(reshape(max, B, 1, 4), heads=2)
  len = reshape(MultiHeadAttention, B, 4) + 1
outputs:
  len: f32[B, 4]
""")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "build", str(spec), "-o", str(out), "--run"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    source = (out / "model.py").read_text()
    assert "GradReverse_ = GradReverse.apply(x, lam)" in source and "max_ = " in source and "len_ = " in source


def test_repeated_blocks_share_one_class_whatever_their_initialisers_ties_and_frozen_marks(tmp_path):
    import re

    import specc

    text = """\
specc: 1
name: reps
dims:
  B: 2
inputs:
  x: f32[B, 8]
blocks:
  blk(h, src): |
    h = h + linear(h, 8, init_from=src) + linear(h, 8, init=normal(0.02))
    return h
graph: |
  first = linear(x, 8)
  h = repeat(3, blk, x, src=first)
  y = linear(h, 8, share=first)
freeze:
  - h.1.*
outputs:
  y: f32[B, 8]
"""
    out = specc.build(text, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert re.findall(r"^class Blk\w*\(", source, re.M) == ["class Blk("]


def test_shared_literals_are_inlined_and_value_ranges_do_not_split_classes(tmp_path):
    import re

    import specc

    text = """\
specc: 1
name: lits
params:
  vocab: 5
dims:
  B: 2
  T: 4
inputs:
  ids: i64[B, T] in range(vocab)
blocks:
  shift(x): |
    return concat([zeros(B, 1, dtype=i64) - 1, x[:, :T - 1]], dim=1)
graph: |
  a = shift(ids)
  b = shift(a)
  y = where(a == b, 1.0, 0.0) + where(a > 0, 1.0, 0.0)
outputs:
  y: f32[B, T]
"""
    source = (specc.build(text, tmp_path / "out", opt_level=2) / "model.py").read_text()
    assert "scalar" not in source  # the 1.0 and 0.0 cse shares stay literals
    assert re.findall(r"^class Shift\w*\(", source, re.M) == ["class Shift("]  # ids (ranged) and a (not)
