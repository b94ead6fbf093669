"""drop_training_outputs: a deploy build is derived from training-only marks, not hand-remapped."""

import json
import subprocess
import sys

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import specc
from equivalence import outputs, perturbed_weights
from specc.backends.pytorch.build import artifacts, import_model_module, load_in_memory
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph
from specgen import specs_with

BEFORE = """specc: 1
name: dann_like
inputs:
  x: f32[B, 8]
graph: |
  f = relu(linear(x, 16))
  y = linear(f, 3)
  domain = linear(relu(linear(f, 32)), 2)
outputs:
  y: f32[B, 3]
  domain: {type: "f32[B, 2]", training_only: true}
"""

EXPECTED = """graph dann_like
  dims B=2
  %0: f32[B, 8] = input(name="x")
  %1: f32[B, 16] = linear(%0, out=16, bias=true, tie=none)  @linear {weight: f32[16, 8], bias: f32[16]}
  %2: f32[B, 16] = relu(%1)
  %3: f32[B, 3] = linear(%2, out=3, bias=true, tie=none)  @y {weight: f32[3, 16], bias: f32[3]}
  return y=%3
"""


def deploy_ctx(**kw):
    return PassContext(opt_level=0, deploy=True, verify_each=True, **kw)


def test_before_expected():
    graph, records = optimize(specc.compile(BEFORE), deploy_ctx())
    assert print_graph(graph, show_span=False) == EXPECTED
    assert records[0].notes == {"dropped_outputs": ["domain"], "removed_nodes": 3, "removed_parameters": 610}


def test_only_deploy_builds_drop_them():
    graph, _ = optimize(specc.compile(BEFORE), PassContext(opt_level=2))
    assert [n for n, _ in graph.outputs] == ["y", "domain"]


def test_check_reports_both_graphs():
    s = specc.check(BEFORE)
    assert s.params == 805 and s.training_only == ("domain",)
    assert s.deploy.params == 195 and s.deploy.example_flops < s.example_flops
    assert [o.name for o in s.deploy.outputs] == ["y"]


def test_deploy_build_keeps_main_outputs_identical(tmp_path):
    path = tmp_path / "dann.yaml"
    path.write_text(BEFORE)
    r = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(path), "--no-color"], capture_output=True,
                       text=True)
    assert "domain (training only)" in r.stdout and "deploy      without domain" in r.stdout
    full = specc.build(path, tmp_path / "full", opt_level=0)
    deploy = specc.build(path, tmp_path / "deploy", opt_level=0, deploy=True)
    manifest = json.loads((deploy / "manifest.json").read_text())
    assert manifest["deploy"] and [o["name"] for o in manifest["outputs"]] == ["y"]
    assert manifest["parameter_count"] == 195

    m_full, m_dep = import_model_module(full), import_model_module(deploy)
    x = m_full.example_inputs(seed=2, B=5)
    with torch.no_grad():
        y_full, _ = m_full.load()(*x)
        y_dep = m_dep.load()(*x)
    assert torch.equal(y_full, y_dep)  # the same ops on the same weights: bit-identical
    assert "domain" not in (deploy / "model.py").read_text()


def test_every_output_training_only_is_an_error():
    text = BEFORE.replace("  y: f32[B, 3]", "  y: {type: \"f32[B, 3]\", training_only: true}")
    try:
        specc.check(text)
    except specc.SpecError as e:
        assert "every output is training_only" in str(e)
    else:
        raise AssertionError("expected an error")


@st.composite
def with_aux_head(draw):
    text = draw(specs_with(["tanh({v})"]))
    head = draw(st.sampled_from(["aux = linear(relu(linear(x, 16)), 2)", "aux = mlp(x, hidden=8)",
                                 "aux = softmax(x @ transpose(x, 1, 2))"]))
    text = text.replace("graph: |\n", f"graph: |\n  {head}\n")
    return text + "  aux: {training_only: true}\n"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=with_aux_head(), seed=st.integers(0, 3))
def test_property_main_outputs_unchanged(text, seed):
    note(text)
    graph = specc.compile(text)
    weights = perturbed_weights(graph, seed)
    full = load_in_memory(artifacts(graph, text, "g.yaml", weights=weights, ctx=PassContext(opt_level=0)))
    dep = load_in_memory(artifacts(graph, text, "g.yaml", weights=weights, ctx=deploy_ctx()))
    inputs = full.example_inputs(seed=seed)
    want = outputs(full, inputs)
    got = outputs(dep, inputs)
    assert len(got) == len(want) - 1
    for w, g in zip(want[:-1], got):
        assert torch.equal(w, g)


SCALED = """specc: 1
name: dann_scaled
inputs:
  x: f32[B, 8]
  lambda_p: f32[]
  extra: f32[B, S]
graph: |
  f = relu(linear(x, 16))
  y = linear(f, 3)
  domain = linear(grad_reverse(f, lambda_p), 2) + mean(extra, dim=1, keepdim=true)
outputs:
  y: f32[B, 3]
  domain: {type: "f32[B, 2]", training_only: true}
"""


def test_inputs_only_training_outputs_read_are_dropped(tmp_path):
    graph, records = optimize(specc.compile(SCALED), deploy_ctx())
    assert [name for name, _ in graph.inputs] == ["x"]
    assert records[0].notes["dropped_inputs"] == ["lambda_p", "extra"]
    out = specc.build(SCALED, tmp_path / "deploy", deploy=True)
    m = import_model_module(out)
    model = m.load()
    (x,) = m.example_inputs()
    assert model(x).shape == (2, 3)
    assert [i["name"] for i in json.loads((out / "manifest.json").read_text())["inputs"]] == ["x"]


def test_an_unused_input_that_alone_carries_a_size_the_graph_uses_stays():
    text = SCALED.replace("y = linear(f, 3)", "y = linear(f, 3) + mean(cast(arange(S), f32))")
    graph, records = optimize(specc.compile(text), deploy_ctx())
    assert [name for name, _ in graph.inputs] == ["x", "extra"]
    assert records[0].notes["dropped_inputs"] == ["lambda_p"]


SHARED = """specc: 1
name: shared_owner
inputs:
  x: f32[B, 4]
graph: |
  a = linear(x, 4)
  b = relu(linear(x, 4, share=a))
  c = linear(b, 4, share=a)
outputs:
  c: f32[B, 4]
  a: {type: "f32[B, 4]", training_only: true}
"""


def test_dropping_the_owner_of_shared_parameters_rehomes_them(tmp_path):
    """The training-only layer `a` owns the weights `b` and `c` share: the deploy graph drops `a`, and
    the first sharer owns them, with a's values."""
    graph, _ = optimize(specc.compile(SHARED), deploy_ctx())
    ir = print_graph(graph, show_span=False)
    assert "@a " not in ir and "weight: f32[4, 4] = @linear.weight" in ir
    full = import_model_module(specc.build(SHARED, tmp_path / "full", opt_level=0))
    dep = import_model_module(specc.build(SHARED, tmp_path / "deploy", deploy=True))
    x = full.example_inputs(seed=3)
    with torch.no_grad():
        want, _ = full.load()(*x)
        got = dep.load()(*x)
    assert torch.equal(got, want)
    dmodel = dep.load()
    assert dmodel.linear.weight is dmodel.c.weight
