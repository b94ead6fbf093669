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


def test_calls_passing_one_value_twice_share_the_block_class(tmp_path):
    # moe_router's first layer gets tok for both x and y; transformer_program's heads compare ids with ids
    for spec, names in (("moe_router", ("Block",)), ("transformer_program", ("Matches", "CatAttention"))):
        out = specc.build(ROOT / "specs" / f"{spec}.yaml", tmp_path / spec)
        src = (out / "model.py").read_text()
        for name in names:
            assert src.count(f"class {name}(nn.Module)") == 1 and f"class {name}2" not in src, (spec, name)
        module = import_model_module(out)
        built, in_memory = module.load(out), specc.load(ROOT / "specs" / f"{spec}.yaml")
        inputs = module.example_inputs(seed=1)
        with torch.no_grad():
            for a, b in zip(built(*inputs), in_memory(*inputs)):
                assert torch.equal(a, b), spec
    src = (tmp_path / "moe_router" / "model.py").read_text()
    assert "def forward(self, x: torch.Tensor, y: torch.Tensor, route: torch.Tensor):" in src
    assert "self.block[0](tok, tok, route)" in src
    src = (tmp_path / "transformer_program" / "model.py").read_text()
    assert "def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):" in src
    assert "torch.gather(v, 1, j)" in src and "a = self.a(ids, ids, ids)" in src


SHARED_ARGS = """\
specc: 1
name: shared_args
dims:
  B: 3
inputs:
  x: f32[B, 4]
  z: f32[B, 4]
  w: f32[B, 8]
blocks:
  mix(a, b): |
    return linear(a, 4) * b + b
  scale(a, b): |
    return layer_norm(a) * b - a
graph: |
  p = mix(x, x)
  q = mix(p, z)
  r = scale(q, q)
  s = scale(w, w)
  t = scale(r, z)
outputs:
  q: f32[B, 4]
  s: f32[B, 8]
  t: f32[B, 4]
"""


def test_one_class_whatever_values_the_calls_pass(tmp_path):
    spec = tmp_path / "shared_args.yaml"
    spec.write_text(SHARED_ARGS)
    out = specc.build(spec, tmp_path / "out")
    src = (out / "model.py").read_text()
    # mix: one class for mix(x, x) and mix(p, z); scale at width 4 and 8: two classes, the width-4 calls share one
    assert src.count("class Mix(nn.Module)") == 1 and "class Mix2" not in src
    assert src.count("class Scale(nn.Module)") == 1 and src.count("class Scale2(nn.Module)") == 1
    assert "class Scale3" not in src
    assert src.count("def forward(self, a: torch.Tensor, b: torch.Tensor):") == 3
    assert "self.p(x, x)" in src and "self.q(p, z)" in src
    module = import_model_module(out)
    model = module.load(out)
    assert type(model.p) is type(model.q) and type(model.r) is type(model.t) is not type(model.s)
    x, z, w = module.example_inputs(seed=5)
    with torch.no_grad():
        q, s, t = model(x, z, w)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x, z, w = x.double(), z.double(), w.double()

    def ln(v, prefix):
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    p_ref = (x @ sd["p.linear.weight"].T + sd["p.linear.bias"]) * x + x
    q_ref = (p_ref @ sd["q.linear.weight"].T + sd["q.linear.bias"]) * z + z
    r_ref = ln(q_ref, "r.layer_norm") * q_ref - q_ref
    s_ref = ln(w, "s.layer_norm") * w - w
    t_ref = ln(r_ref, "t.layer_norm") * z - r_ref
    for got, ref in ((q, q_ref), (s, s_ref), (t, t_ref)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
