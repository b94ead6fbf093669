"""Generated model.py: standalone (torch + standard library only), deterministic, and equal to
what specc.load builds in memory."""

import ast
import sys
from pathlib import Path

import pytest
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


CHECKED = """\
specc: 1
name: checked
dims:
  H: {example: 2, max: 8}
  T: {example: 4, max: 32}
inputs:
  x: f32[B, 3, 4 * H, 4 * H]
  ids: i64[B, T] in range(5)
  tail: f32[B, T - 2]
graph: |
  y = mean(max_pool2d(relu(conv2d(x, 4, 3, padding=1)), 2), dim=[2, 3])
  z = embedding(ids, 5, 4)
  w = sum(tail, dim=1)
outputs:
  y: f32[B, 4]
  z: f32[B, T, 4]
  w: f32[B]
"""


def test_example_inputs_refuse_unknown_names_and_sizes_out_of_bounds(tmp_path):
    import pytest

    module = import_model_module(specc.build(CHECKED, tmp_path / "out"))
    x, ids, tail = module.example_inputs(B=3, T=32, H=8)
    assert x.shape == (3, 3, 32, 32) and ids.shape == (3, 32) and tail.shape == (3, 30)
    for dims, message in (({"T": 40}, "example_inputs: T=40, outside [1, 32]"),
                          ({"T": 0}, "example_inputs: T=0, outside [1, 32]"),
                          ({"B": -1}, "example_inputs: B=-1, outside [1, inf]"),
                          ({"Q": 3}, "example_inputs: Q is not a symbolic dimension of this model "
                                     "(its dimensions: H, T, B)"),
                          ({"T": 2.5}, "example_inputs: T=2.5 is not a whole number"),
                          ({"T": 2}, "example_inputs: input tail: dimension 1 is T - 2 = 0 with B=2, H=2, T=2, "
                                     "but must be at least 1")):
        with pytest.raises(ValueError) as info:
            module.example_inputs(**dims)
        assert str(info.value) == message, dims


def test_the_model_checks_its_inputs_against_the_declared_shapes(tmp_path):
    import pytest

    out = specc.build(CHECKED, tmp_path / "out")
    assert "        check_inputs(self, x, ids, tail)  # ranks, dtypes and sizes as INPUTS declares\n" in \
        (out / "model.py").read_text()
    module = import_model_module(out)
    model = module.load(out)
    x, ids, tail = module.example_inputs()
    long_ids = torch.zeros(2, 40, dtype=torch.int64)
    for inputs, message in (
            ((torch.randn(1, 3, 16, 20), ids[:1], tail[:1]),
             "input x: dimension 3 is 20, but must be 4*H = 16 with B=1, H=4, T=4"),
            ((torch.randn(1, 3, 18, 18), ids[:1], tail[:1]), "input x: dimension 2 is 18, but must be 4*H for a whole H >= 1"),
            ((torch.randn(2, 3, 36, 36), ids, tail), "input x: dimension 2 (4*H) gives H=9, outside [1, 8]"),
            ((x[0], ids, tail), "input x: rank 3, expected 4"),
            ((torch.randn(2, 4, 8, 8), ids, tail), "input x: dimension 1 is 4, expected 3"),
            ((x, ids.float(), tail), "input ids: dtype torch.float32, expected torch.int64"),
            ((x, ids, tail[:1]), "input tail: dimension 0 is 1, but input x: dimension 0 (B) gives B=2"),
            ((x, ids, tail[:, :1]), "input tail: dimension 1 is 1, but must be T - 2 = 2 with B=2, H=2, T=4"),
            ((x, long_ids, torch.zeros(2, 38)), "input ids: dimension 1 (T) gives T=40, outside [1, 32]"),
            ((x[:0], ids[:0], tail[:0]), "input x: dimension 0 (B) gives B=0, outside [1, inf]")):
        with pytest.raises(ValueError) as info:
            model(*inputs)
        assert str(info.value) == message
    with pytest.raises(ValueError) as info:  # another float dtype than the model's: named, not torch's error
        model(x.double(), ids, tail)
    assert str(info.value) == ("input x: dtype torch.float64, expected torch.float32 (the model's floats are "
                               "torch.float32; convert the input, or the model with .to(torch.float64))")
    with torch.no_grad():  # an f32 input may have the module's own float dtype
        y, z, w = model.double()(x.double(), ids, tail.double())
        assert y.dtype == torch.float64 and z.shape == (2, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts where it needs to
            y, _, _ = model.float()(x.bfloat16(), ids, tail)
        assert y.shape == (2, 4)


def test_torch_compile_and_export_trace_the_checked_model(tmp_path):
    out = specc.build(CHECKED, tmp_path / "out")
    module = import_model_module(out)
    model = module.load(out)
    inputs = module.example_inputs(seed=1)
    with torch.no_grad():
        want = model(*inputs)
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break in the check
        for a, b in zip(compiled(*inputs), want):
            assert torch.equal(a, b)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(model, inputs, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
        for a, b in zip(exported.module()(*inputs), want):
            assert torch.equal(a, b)


def test_a_model_loaded_with_torch_compile_still_checks_its_inputs(tmp_path):
    """load(compile=True) (the default of a `--torch-compile` build) wraps the model in torch.compile, whose
    traced forward skips the input checks: they run before each call of the wrapper instead, positional
    or by keyword, so a wrong input is the same ValueError and nothing is compiled for it."""
    out = specc.build(CHECKED, tmp_path / "out", torch_compile=True)
    module = import_model_module(out)
    model = module.load(out)
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    x, ids, tail = module.example_inputs(seed=1)
    for args, kwargs, message in (((x[0], ids, tail), {}, "input x: rank 3, expected 4"),
                                  ((x,), {"ids": ids.float(), "tail": tail}, "input ids: dtype torch.float32, "
                                                                             "expected torch.int64"),
                                  ((), {"x": x, "ids": ids, "tail": tail[:1]},
                                   "input tail: dimension 0 is 1, but input x: dimension 0 (B) gives B=2")):
        with pytest.raises(ValueError) as info:
            model(*args, **kwargs)
        assert str(info.value) == message
    for args, kwargs, message in (((x, ids), {}, "missing inputs: tail"),
                                  ((x, ids, tail, tail), {}, "takes 3 inputs but 4 were given"),
                                  ((x, ids, tail), {"ids": ids}, "multiple values for argument 'ids'"),
                                  ((x, ids, tail), {"y": ids}, "unexpected keyword argument 'y'")):
        with pytest.raises(TypeError, match=message):  # as the model's own forward would
            model(*args, **kwargs)


def test_a_symbol_given_only_as_a_times_s_plus_b_is_solved_from_the_input(tmp_path):
    """A symbol that no input axis is whole (T, with x: [B, 2 * T + 1, 4]) is read as (size - b) // a,
    at the top level and in a block whose argument carries it so."""
    spec = """
specc: 1
name: affine_dims
dims:
  B: 2
  T: 3
inputs:
  x: f32[B, 2 * T + 1, 4]
blocks:
  halves(h): |
    return reshape(h[:, 1:, :], [B, T, 8])
graph: |
  a = halves(x)
  b = reshape(x[:, :2 * T, :], [B, T, 8])
outputs:
  a: f32[B, T, 8]
  b: f32[B, T, 8]
"""
    out = specc.build(spec, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert "T = (x.shape[1] - 1) // 2  # symbolic dimension: x's axis 1 is 2*T + 1" in source
    module = import_model_module(out)
    model = module.load(out)
    for t in (1, 3, 6):
        x = torch.randn(2, 2 * t + 1, 4)
        a, b = model(x)
        assert torch.equal(a, x[:, 1:].reshape(2, t, 8))
        assert torch.equal(b, x[:, :2 * t].reshape(2, t, 8))
    with pytest.raises(ValueError, match="must be 2\\*T \\+ 1 for a whole T >= 1"):
        model(torch.randn(2, 6, 4))


def test_a_symbol_solved_with_the_sizes_of_others_sizes_the_computation(tmp_path):
    """K given only as w: [B, T * K + 1] and H only as z: [B, 2 * T + H], T whole in x: read after T, as
    (size - 1) // T and size - 2 * T, before they size a reshape and a slice (at the top level and in a
    block that takes z and x), in the order they need whatever the symbols' names."""
    spec = """
specc: 1
name: solved
dims: {B: 2, T: 3, H: 4, K: 5}
inputs:
  w: f32[B, T * K + 1]
  z: f32[B, 2 * T + H]
  x: f32[B, T]
blocks:
  head(z, x): |
    return z[:, :H] * sum(x, dim=-1, keepdim=true)
graph: |
  v = reshape(w[:, 1:], [B, T, K])
  y = head(z, x)
outputs:
  v: f32[B, T, K]
  y: f32[B, H]
"""
    out = specc.build(spec, tmp_path / "out")
    source = (out / "model.py").read_text()
    assert "        T = x.shape[1]  # symbolic dimension\n        K = (w.shape[1] - 1) // T  # symbolic dimension: " \
           "w's axis 1 is K*T + 1\n" in source
    assert "H = (z.shape[1] - 2 * T)  # symbolic dimension: z's axis 1 is H + 2*T" in source
    model = import_model_module(out).load(out)
    for t, h, k in ((3, 4, 5), (1, 1, 1), (6, 2, 3)):
        w, z, x = torch.randn(2, t * k + 1), torch.randn(2, 2 * t + h), torch.randn(2, t)
        v, y = model(w, z, x)
        assert torch.equal(v, w[:, 1:].reshape(2, t, k))
        assert torch.equal(y, z[:, :h] * x.sum(-1, keepdim=True))
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 11), torch.randn(2, 10), torch.randn(2, 3))
    assert str(info.value) == "input w: dimension 1 is 11, but must be K*T + 1 for a whole K >= 1 with T=3"


def test_an_input_axis_of_several_symbols_is_checked_with_the_known_ones_sizes():
    """x: [B, 2 * T + S] with s: [S]: T is solved as (size - S) // 2, S's size read from s (it was read as
    (size - 0) // (2 + 1), which rejected good inputs); a float input takes the module's own float dtype."""
    text = """specc: 1
name: mixed_dims
dims: {B: 2, T: 3, S: 2}
inputs:
  x: f32[B, 2 * T + S]
  s: f32[S]
graph: |
  y = sum(x, dim=-1) + sum(s)
outputs:
  y:
"""
    model = specc.load(text)
    for t, s in ((3, 2), (1, 5), (4, 1)):
        x, v = torch.randn(2, 2 * t + s), torch.randn(s)
        assert torch.allclose(model(x, v), x.sum(-1) + v.sum())
    for shape, n, message in (((2, 9), 2, "dimension 1 is 9, but must be S + 2*T for a whole T >= 1 with S=2"),
                              ((2, 8), 3, "dimension 1 is 8, but must be S + 2*T for a whole T >= 1 with S=3"),
                              ((2, 2), 2, "dimension 1 is 2, but must be S + 2*T for a whole T >= 1 with S=2")):
        with pytest.raises(ValueError) as info:
            model(torch.randn(*shape), torch.randn(n))
        assert str(info.value) == f"input x: {message}"
    half = specc.load(text.replace("f32[", "f16[")).double()  # the float64 oracle of an f16 model
    assert half(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="input s: dtype torch.int64, expected torch.float16"):
        specc.load(text.replace("f32[", "f16["))(torch.randn(2, 8).half(), torch.ones(2, dtype=torch.int64))
