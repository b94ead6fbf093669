"""Call options of layers with parameters, handled by the elaborator for every such op: frozen=,
init= / bias_init=, share=. Frozen parameters get no gradient in the built module; shared ones are
one storage; every misuse is a located error (exit 2, FILE:LINE:COL with a caret, no traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import specc
from specc.cli import main

HEAD_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")


def cli_errors(capsys, *args: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Run the CLI in-process; expect exit 2 with located errors, each with its line and a caret."""
    code = main([*args, "--no-color"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    heads = [(int(m["line"]), int(m["col"]), m["msg"]) for m in map(HEAD_RE.match, err.splitlines()) if m]
    assert heads, err
    assert err.count("^") >= len(heads), err
    return err, heads


def spec_file(tmp_path: Path, graph: str, inputs: str = "x: f32[B, 8]", outputs: str = "y: null",
              extra: str = "") -> Path:
    body = "\n".join("  " + line for line in graph.strip().splitlines())
    text = (f"specc: 1\nname: m\n{extra}inputs:\n  {inputs}\ngraph: |\n{body}\noutputs:\n  {outputs}\n")
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# -- frozen= ------------------------------------------------------------------------------------

FROZEN = """\
specc: 1
name: frozen_head
inputs:
  x: f32[B, 8]
graph: |
  h = relu(linear(x, 16, frozen=true))
  n = layer_norm(h, frozen=freeze_norm)
  y = linear(n, 4)
outputs:
  y: f32[B, 4]
params:
  freeze_norm: true
"""


def test_frozen_layers_are_marked_counted_and_get_no_gradient():
    graph = specc.compile(FROZEN)
    flags = {".".join(n.path + (p.name,)): p.frozen for _, n in graph.nodes() for p in n.params}
    assert flags == {"linear.weight": True, "linear.bias": True, "n.weight": True, "n.bias": True,
                     "y.weight": False, "y.bias": False}
    s = specc.check(FROZEN)
    assert s.params == 8 * 16 + 16 + 2 * 16 + 16 * 4 + 4
    assert s.trainable_params == 16 * 4 + 4
    assert specc.check(FROZEN, freeze_norm=False).trainable_params == 16 * 4 + 4 + 2 * 16

    model = specc.load(FROZEN, opt_level=0)
    model.train()
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads == {"linear.weight": False, "linear.bias": False, "n.weight": False, "n.bias": False,
                     "y.weight": True, "y.bias": True}
    model(torch.randn(3, 8)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("y."):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None or not p.grad.any(), name


def test_frozen_survives_the_built_files(tmp_path):
    specc.build(FROZEN, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "def freeze(self)" in source and "self.freeze()" in source
    import importlib.util
    import sys
    import uuid

    name = f"frozen_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, tmp_path / "out" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = module.load(tmp_path / "out")
    assert not model.linear.weight.requires_grad and model.y.weight.requires_grad
    assert not module.Model().linear.weight.requires_grad


# -- init= and bias_init= -----------------------------------------------------------------------

def test_explicit_initialisers():
    spec = """\
specc: 1
name: inits
params:
  std: 0.02
inputs:
  x: f32[B, 64]
graph: |
  a = linear(x, 64, init=eye, bias_init=zeros)
  b = linear(a, 64, init=normal(std), bias_init=constant(0.5))
  c = linear(b, 64, init=uniform(0.1), bias_init=ones)
  d = linear(c, 64, init=zeros if std > 1 else ones, bias=false)
  e = embedding(cast(x, i64), 10, 64, init=normal(std=2.0, mean=3.0))
  n = layer_norm(d, init=constant(2.0), bias_init=constant(-1.0))
outputs:
  n: null
  e: null
"""
    inits = {".".join(n.path + (p.name,)): p.init for _, n in specc.compile(spec).nodes() for p in n.params}
    assert str(inits["a.weight"]) == "eye()" and str(inits["b.weight"]) == "normal(0.02, 0)"
    model = specc.load(spec, opt_level=0)
    w = {k: v.detach() for k, v in model.state_dict().items()}
    assert torch.equal(w["a.weight"], torch.eye(64)) and not w["a.bias"].any()
    assert abs(float(w["b.weight"].std()) - 0.02) < 0.002 and torch.all(w["b.bias"] == 0.5)
    assert float(w["c.weight"].abs().max()) <= 0.1 and torch.all(w["c.bias"] == 1.0)
    assert torch.all(w["d.weight"] == 1.0)
    assert abs(float(w["e.weight"].mean()) - 3.0) < 0.3 and abs(float(w["e.weight"].std()) - 2.0) < 0.3
    assert torch.all(w["n.weight"] == 2.0) and torch.all(w["n.bias"] == -1.0)


def test_init_applies_to_every_weight_of_a_multi_weight_layer():
    spec = """\
specc: 1
name: multi
inputs:
  x: f32[B, T, 8]
graph: |
  y = attention(x, heads=2, init=eye, bias_init=zeros)
outputs:
  y: null
"""
    model = specc.load(spec, opt_level=0)
    for proj in ("q", "k", "v", "o"):
        assert torch.equal(getattr(model.y, proj).weight.detach(), torch.eye(8))
        assert not getattr(model.y, proj).bias.any()


@pytest.mark.parametrize("graph, needle, message", [
    ("y = relu(x, frozen=true)", "frozen=true", "relu() owns no parameters, so 'frozen=' does not apply"),
    ("y = x + linear(x, 8, frozen=1)", "frozen=1", "frozen= must be true or false, got the integer 1"),
    ("y = linear(x, 4, init=eye)", "init=eye", "init=eye needs square 2-D weights, but linear has weight f32[4, 8]"),
    ("y = linear(x, 8, init=gaussian(0.1))", "gaussian", "unknown initialiser 'gaussian'"),
    ("y = linear(x, 8, init=normal())", "normal()", "normal() is missing argument 'std'"),
    ("y = linear(x, 8, init=normal(-1.0))", "-1.0", "normal(): 'std' must not be negative"),
    ("y = linear(x, 8, init=uniform(1, 2))", "uniform(1, 2)", "uniform takes 1 argument, got 2"),
    ("y = linear(x, 8, bias=false, bias_init=zeros)", "bias_init", "this layer has no bias for bias_init="),
    ("y = layer_norm(x, affine=false, frozen=true)", "frozen", "this call creates no parameters"),
    ("y = linear(x, 8, init=x)", "init=x", "unknown initialiser 'x'"),
    ("y = linear(x, 8, init=[1])", "[1]", "init= expects an initialiser"),
])
def test_option_errors_are_located(tmp_path, capsys, graph, needle, message):
    path = spec_file(tmp_path, graph)
    err, heads = cli_errors(capsys, "check", str(path))
    line = line_of(path, needle)
    col = path.read_text().splitlines()[line - 1].index(needle) + 1
    assert any(h[0] == line and message in h[2] for h in heads), err
    assert any(h[0] == line and col <= h[1] <= col + len(needle) for h in heads), err


def test_every_option_error_is_reported_at_once(tmp_path, capsys):
    path = spec_file(tmp_path, """
a = relu(x, frozen=true)
b = linear(a, 4, init=eye)
y = linear(b, 8, init=bogus)
""")
    _, heads = cli_errors(capsys, "check", str(path))
    assert [h[0] for h in heads] == [6, 7, 8]


def test_initialisers_in_an_unused_block_are_not_unknown_names():
    spec = """\
specc: 1
name: unused
blocks:
  spare(x): |
    return linear(x, 8, init=normal(0.02), bias_init=zeros) + undefined_value
inputs:
  x: f32[B, 8]
graph: |
  y = linear(x, 8, init=normal(0.02))
outputs:
  y: null
"""
    with pytest.raises(specc.SpecError) as e:  # the unused block is still checked, but 'normal' is no value
        specc.check(spec)
    assert [d.message for d in e.value.diagnostics] == ["undefined name 'undefined_value'"]


# -- share= --------------------------------------------------------------------------------------

SHARED = """\
specc: 1
name: shared
inputs:
  img: f32[B, 3, 8, 8]
  ids: i64[B, 5] in range(7)
graph: |
  a = conv2d(img, 3, 3, padding=1)
  b = conv2d(relu(a), 3, 3, padding=1, share=a)
  e1 = embedding(ids, 7, 6)
  e2 = embedding(ids + 1, 7, 6, share=e1)
  l1 = layer_norm(e1 + e2, init=constant(1.5))
  l2 = layer_norm(l1, share=l1)
  t1 = attention(l2, heads=2)
  t2 = attention(t1, heads=2, share=t1)
  m1 = linear(t2, 6)
  m2 = linear(m1, 6, share=m1)
  m3 = linear(m2, 6, share=m2)
outputs:
  b: null
  m3: null
"""


def test_share_ties_every_parameter_of_the_layer():
    graph = specc.compile(SHARED)
    tied = {".".join(n.path + (p.name,)): p.tied_to for _, n in graph.nodes() for p in n.params if p.tied_to}
    assert tied["b.weight"] == "a.weight" and tied["b.bias"] == "a.bias"
    assert tied["e2.weight"] == "e1.weight"
    assert tied["l2.weight"] == "l1.weight" and tied["l2.bias"] == "l1.bias"
    assert {k for k in tied if k.startswith("t2.")} == {f"t2.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")}
    assert tied["t2.q.weight"] == "t1.q.weight"
    assert tied["m3.weight"] == "m1.weight"  # a chain of shares ends at the owner
    alone = specc.check(SHARED.replace(", share=a", "").replace(", share=e1", "").replace(", share=l1", "")
                        .replace(", share=t1", "").replace(", share=m1", "").replace(", share=m2", ""))
    shared = specc.check(SHARED)
    per = {"conv": 3 * 3 * 9 + 3, "emb": 7 * 6, "ln": 12, "attn": 4 * (36 + 6), "lin": 42}
    assert alone.params - shared.params == sum(per.values()) + per["lin"]


@pytest.mark.parametrize("opt_level", [0, 1])
def test_shared_parameters_are_one_storage_and_train_together(opt_level):
    model = specc.load(SHARED, opt_level=opt_level)
    assert model.b.weight is model.a.weight and model.b.bias is model.a.bias
    assert model.e2.weight is model.e1.weight
    assert model.l2.weight is model.l1.weight and torch.all(model.l1.weight == 1.5)
    assert model.t2.q.weight is model.t1.q.weight and model.t2.o.bias is model.t1.o.bias
    assert model.m3.weight is model.m1.weight
    model.train()
    img, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 6, (2, 5))
    b, m3 = model(img, ids)
    (b.sum() + m3.sum()).backward()
    assert model.a.weight.grad is not None and model.t1.q.weight.grad is not None
    # one step of SGD changes both users of a shared weight alike
    with torch.no_grad():
        model.a.weight -= 0.1 * model.a.weight.grad
    assert torch.equal(model.a.weight, model.b.weight)


def test_shared_model_equals_hand_tied_reference():
    spec = """\
specc: 1
name: siamese
inputs:
  x: f32[B, 8]
  z: f32[B, 8]
graph: |
  u = linear(x, 4)
  v = linear(z, 4, share=u)
  y = u - v
outputs:
  y: null
"""
    model = specc.load(spec, opt_level=0)
    x = torch.randn(3, 8)
    assert torch.allclose(model(x, x), torch.zeros(3, 4))
    z = torch.randn(3, 8)
    ref = torch.nn.functional.linear(x, model.u.weight, model.u.bias) - \
        torch.nn.functional.linear(z, model.u.weight, model.u.bias)
    assert torch.allclose(model(x, z), ref)


@pytest.mark.parametrize("graph, needle, message", [
    ("a = linear(x, 8)\ny = linear(a, 4, share=a)", "share=a",
     "this linear would have parameters [weight f32[4, 8], bias f32[4]], but the one it shares ('a') has "
     "[weight f32[8, 8], bias f32[8]]"),
    ("a = layer_norm(x)\ny = linear(a, 8, share=a)", "share=a", "the value was computed by 'layer_norm'"),
    ("a = relu(x)\ny = linear(a, 8, share=a)", "share=a", "the value was computed by 'relu', which has no parameters"),
    ("y = linear(x, 8, share=3)", "share=3", "share= needs a value computed by another linear layer"),
    ("a = linear(x, 8)\ny = linear(a, 8, share=a, frozen=true)", "frozen=true",
     "frozen= cannot be combined with share="),
    ("a = linear(x, 8)\ny = linear(a, 8, share=a, init=zeros)", "init=zeros", "init= cannot be combined with share="),
])
def test_share_errors_are_located(tmp_path, capsys, graph, needle, message):
    path = spec_file(tmp_path, graph)
    err, heads = cli_errors(capsys, "check", str(path))
    line = line_of(path, needle)
    assert any(h[0] == line and message in h[2] for h in heads), err


def test_share_inside_repeated_blocks_shares_across_repeats():
    spec = """\
specc: 1
name: albert
params:
  layers: 3
inputs:
  x: f32[B, 8]
blocks:
  layer(h, w): |
    return h + relu(linear(h, 8, share=w))
graph: |
  w = linear(x, 8)
  y = repeat(layers, layer, w, w=w)
outputs:
  y: null
"""
    s = specc.check(spec)
    assert s.params == 8 * 8 + 8
    model = specc.load(spec, opt_level=0)
    assert all(blk.linear.weight is model.w.weight for blk in model.y)


@pytest.mark.parametrize("opt_level", [1, 2])
def test_passes_leave_the_owner_of_shared_parameters_intact(opt_level):
    spec = """\
specc: 1
name: shared_owner
inputs:
  img: f32[B, 3, 8, 8]
  x: f32[B, T, 6]
graph: |
  a = conv2d(img, 3, 3, padding=1)
  n = batch_norm(a)
  b = conv2d(n, 3, 3, padding=1, share=a)
  t1 = attention(x, heads=2)
  t2 = attention(t1, heads=2, share=t1)
outputs:
  b: null
  t2: null
"""
    gen = torch.Generator().manual_seed(0)
    weights = {"n.running_mean": torch.randn(3, generator=gen), "n.running_var": torch.rand(3, generator=gen) + 0.5}
    ref = specc.load(spec, opt_level=0, weights=weights)
    model = specc.load(spec, opt_level=opt_level, weights=weights)
    img, x = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6)
    with torch.no_grad():
        for want, got in zip(ref(img, x), model(img, x)):
            assert torch.allclose(want, got, atol=1e-5)
