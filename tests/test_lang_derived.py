"""Derived params: `derived:` maps names to expressions over params and the derived params above
them, evaluated in order after --set overrides and scale presets, with the graph's scalar arithmetic.
They are used like params (input ranges, dims bounds, graph bodies, train: recipes), recorded with the
bound params (manifest, `specc ir`), and cannot be set themselves; every mistake is a located error."""

from __future__ import annotations

import json

import pytest

import specc
from specc.cli import main
from specc.dsl.diagnostics import SpecError

SPEC = """\
specc: 1
name: derived_lm
params:
  alphabet: 10
  d_model: 32
  heads: 4
  act: gelu
  scale: s
scales:
  s: {d_model: 16}
  m: {d_model: 64, alphabet: 20}
derived:
  vocab: alphabet + 3
  d_ff: 4 * d_model
  head_dim: d_model // heads
  block_size: 2 * vocab
  wide: d_ff > 128
dims:
  B: 2
  T: {example: 8, max: block_size}
inputs:
  idx: i64[B, T] in range(vocab)
graph: |
  tok = embedding(idx, vocab, d_model)
  h = tok + mlp(tok, hidden=d_ff, act=act)
  h = reshape(h, B, T, heads, head_dim)
  h = reshape(h, B, T, heads * head_dim)
  logits = linear(h, vocab, bias=wide)
outputs:
  logits: f32[B, T, vocab]
"""


def bound(text: str = SPEC, **overrides):
    return specc.compile(text, **overrides).params


def errors_of(text: str, **overrides) -> list:
    with pytest.raises(SpecError) as e:
        specc.compile(text, **overrides)
    return e.value.diagnostics


def at(diags, line: int, col: int, text: str):
    """The diagnostic at line:col whose message holds `text`."""
    found = [d for d in diags if (d.span.line, d.span.col) == (line, col) and text in d.message]
    assert found, [(d.span.line, d.span.col, d.message) for d in diags]
    return found[0]


def test_derived_values_follow_the_default_preset():
    p = bound()
    assert p == {"alphabet": 10, "d_model": 16, "heads": 4, "act": "gelu", "scale": "s",
                 "vocab": 13, "d_ff": 64, "head_dim": 4, "block_size": 26, "wide": False}
    assert p["act"] == "gelu" and isinstance(p["act"], str)  # a string param stays a string


def test_derived_ints_reach_ranges_dims_bounds_and_ops():
    g = specc.compile(SPEC)
    (_, nid), = g.inputs
    t = g.node(nid).outputs[0]
    assert t.value_range == (0, 13)
    assert g.dims["T"] == (8, 1, 26)  # T: {max: block_size}
    out = [node for _, node in g.nodes() if node.op == "linear"][-1]
    assert str(out.outputs[0]) == "f32[B, T, 13]"
    assert dict(out.attrs)["bias"] is False
    mlp, = [node for _, node in g.nodes() if node.op == "mlp"]
    assert dict(mlp.attrs)["hidden"] == 64


def test_overrides_carry_through():
    p = bound(d_model=256, alphabet=5)
    assert (p["vocab"], p["d_ff"], p["head_dim"], p["block_size"], p["wide"]) == (8, 1024, 64, 16, True)
    assert specc.check(SPEC, d_model=256).outputs[0].type.shape[-1] == 13


def test_a_preset_carries_through_and_a_single_override_wins_over_it():
    assert bound(scale="m")["vocab"] == 23 and bound(scale="m")["d_ff"] == 256
    p = bound(scale="m", d_model=8)
    assert (p["d_ff"], p["head_dim"], p["vocab"]) == (32, 2, 23)


def test_cli_set_and_ir_show_the_derived_values(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    assert main(["ir", str(path), "--set", "d_model=256", "-O", "0"]) == 0
    out = capsys.readouterr().out
    assert "vocab=13, d_ff=1024, head_dim=64, block_size=26, wide=true" in out
    assert main(["check", str(path), "--set", "d_model=256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["outputs"][0]["type"] == "f32[B, T, 13]"


def test_the_manifest_records_the_derived_values(tmp_path):
    out = specc.build(SPEC, tmp_path / "out", d_model=64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"] == {"alphabet": 10, "d_model": 64, "heads": 4, "act": "gelu", "scale": "s",
                                  "vocab": 13, "d_ff": 256, "head_dim": 16, "block_size": 26, "wide": True}


def test_a_train_recipe_sees_derived_params():
    from specc.train import prepare

    spec = """\
specc: 1
name: m
params: {hidden: 8, base_lr: 0.05}
derived:
  lr: base_lr * 2
  width: 2 * hidden
inputs:
  x: f32[B, 2]
graph: |
  logits = linear(relu(linear(x, width)), 2)
outputs:
  logits: f32[B, 2]
train:
  data: two_moons(n=64)
  loss: cross_entropy(logits, label)
  optimizer: sgd(lr=lr)
  steps: 2
  batch: 8
"""
    _, graph, recipe = prepare(spec, {"base_lr": 0.25})
    assert graph.params["lr"] == 0.5 and graph.params["width"] == 16
    assert recipe.optimizer_args["lr"] == 0.5


def test_derived_params_may_use_earlier_ones_conditions_and_functions():
    spec = SPEC.replace("  wide: d_ff > 128\n", "  wide: d_ff > 128\n  kind: '\"big\" if wide else \"small\"'\n"
                        "  root: int(sqrt(d_ff)) + min(heads, 2) + max(1, 2.5)\n  ratio: d_model / heads\n")
    p = bound(spec)
    assert p["kind"] == "small" and p["root"] == 8 + 2 + 2.5 and p["ratio"] == 4
    assert bound(spec, d_model=64)["kind"] == "big"


def test_setting_a_derived_param_is_an_error_naming_what_it_derives_from(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    assert main(["check", str(path), "--set", "head_dim=8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "<--set>:1:1: error: 'head_dim' is a derived param and cannot be set: " \
           "derived.head_dim = d_model // heads (at " in err
    assert "spec.yaml:15:13)" in err
    assert "it derives from d_model, heads: set those instead" in err
    d, = errors_of(SPEC, block_size=4)
    assert "'block_size' is a derived param" in d.message
    assert "it derives from alphabet: set that instead" in d.notes  # through vocab


def test_a_preset_cannot_set_a_derived_param():
    d, = errors_of(SPEC.replace("  s: {d_model: 16}", "  s: {d_model: 16, d_ff: 8}"))
    assert (d.span.line, d.span.col) == (10, 20)
    assert "scales.s: 'd_ff' is a derived param and cannot be set" in d.message


BAD = """\
specc: 1
name: m
params: {alphabet: 10, d_model: 32, heads: 0, tag: x}
derived:
  vocab: alphabt + 3
  head_dim: d_model // heads
  a: b + 1
  b: a + 1
  c: c
  e: linear(d_model)
  f: 2.0 ** 5000
  g: tag + 1
  h: T * 2
  k: 13
  l: sqrt(-1)
  n: -inf
  o: d_model +
  p: "min(d_model, 3) + [1][0]"
  q: 2 ** 1000 * 2 ** 1000
  r: 'float(2 ** 1023 + (2 ** 1023 - 1))'
dims:
  T: 4
inputs:
  x: f32[B, T, 4]
graph: |
  y = linear(x, d_model)
outputs:
  y: null
"""


@pytest.mark.parametrize("line, col, text", [
    (5, 10, "unknown name 'alphabt' in derived.vocab (did you mean 'alphabet'?)"),
    (6, 13, "division by zero"),
    (7, 6, "derived.a uses 'b', which is derived after it (at "),
    (9, 6, "derived.c refers to itself"),
    (10, 6, "derived.e: 'linear' is an operator; a derived param may call only min, max, int, float, sqrt"),
    (11, 6, "result out of range"),
    (12, 6, "operator '+' is not defined for the string 'x' and the integer 1"),
    (13, 6, "derived.h: 'T' is a symbolic dimension; a derived param is computed from params alone"),
    (14, 6, "derived.k: expected an expression over params, e.g. 4 * d_model, got an integer"),
    (15, 6, "sqrt(): expects a non-negative number"),
    (16, 6, "derived.n is -inf; a param must be a finite number"),
    (17, 15, "syntax error"),
    (18, 25, "derived.p: lists and indexing are not allowed in a derived param"),
    (19, 6, "result out of range"),
    (20, 7, "float(): the integer is too large for a float"),
])
def test_errors_are_located_in_the_expression(line, col, text):
    at(errors_of(BAD), line, col, text)


def test_a_cycle_is_named_and_everything_is_reported_once_without_a_traceback(tmp_path, capsys):
    diags = errors_of(BAD)
    assert "'a' and 'b' depend on each other: a -> b -> a" in at(diags, 7, 6, "derived after it").notes
    assert len(diags) == 15
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "15 errors" in err
    assert "bad.yaml:5:10: error: unknown name 'alphabt'" in err


def test_a_later_reference_without_a_cycle_suggests_moving_it():
    spec = SPEC.replace("  vocab: alphabet + 3\n", "").replace("  wide: d_ff > 128\n",
                                                                "  wide: d_ff > 128\n  vocab: alphabet + 3\n")
    diags = errors_of(spec)
    d = at(diags, 15, 19, "derived.block_size uses 'vocab', which is derived after it")
    assert "move 'vocab' above 'block_size'" in d.notes


def test_name_clashes_are_errors():
    spec = SPEC.replace("  wide: d_ff > 128\n", "  wide: d_ff > 128\n  heads: 2 * 2\n")
    at(errors_of(spec), 18, 3, "'heads' is declared under both 'params:' and 'derived:'")
    assert len(errors_of(spec, heads=8)) == 1  # the param can still be set
    spec = SPEC.replace("  scale: s\n", "").replace("  wide: d_ff > 128\n", "  wide: d_ff > 128\n  scale: 1 / sqrt(head_dim)\n")
    at(errors_of(spec), 17, 3, "'scale' selects a preset of 'scales:' and cannot be derived")
    spec = SPEC.replace("  wide: d_ff > 128\n", "  wide: d_ff > 128\n  T: 3\n")
    at(errors_of(spec), 21, 3, "'T' is both a parameter and a dimension")
    spec = SPEC.replace("  wide: d_ff > 128\n", "  wide: d_ff > 128\n  1x: 3\n")
    at(errors_of(spec), 18, 3, "derived: '1x' is not a valid name")


def test_scale_can_be_derived_without_presets():
    spec = SPEC.replace("  scale: s\n", "").replace("scales:\n  s: {d_model: 16}\n  m: {d_model: 64, alphabet: 20}\n",
                                                     "").replace("  wide: d_ff > 128\n",
                                                                 "  wide: d_ff > 128\n  scale: 1 / sqrt(head_dim)\n")
    assert bound(spec)["scale"] == pytest.approx(1 / 8 ** 0.5)


def test_a_derived_param_written_under_params_stays_a_string_with_a_hint():
    spec = """\
specc: 1
name: m
params: {alphabet: 10, vocab: alphabet + 3, act: gelu}
inputs:
  idx: i64[B, T] in range(vocab)
graph: |
  tok = embedding(idx, vocab, 8)
outputs:
  tok: null
"""
    diags = errors_of(spec)
    d = at(diags, 5, 21, "range bounds must be integers, got the string 'alphabet + 3'")
    hint = "params.vocab is the string 'alphabet + 3'; to compute it from other params, declare it under 'derived:'"
    assert any(hint in n for n in d.notes)
    d = at(diags, 7, 24, "embedding(): argument 'num' must be an integer, got the string 'alphabet + 3'")
    assert any(hint in n for n in d.notes)
    ok = spec.replace("vocab: alphabet + 3, ", "").replace("params: {alphabet: 10, act: gelu}",
                                                             "params: {alphabet: 10, act: gelu}\nderived: {vocab: alphabet + 3}")
    assert bound(ok) == {"alphabet": 10, "act": "gelu", "vocab": 13}


def test_the_json_schema_describes_derived():
    from specc.dsl.schema import json_schema

    schema = json_schema()
    derived = schema["properties"]["derived"]
    assert derived["type"] == "object" and derived["additionalProperties"] == {"type": "string"}
    assert "after --set overrides and scale presets" in derived["description"]


def test_check_prints_the_derived_values(tmp_path, capsys):
    """specc check shows the params as bound, derived ones with the values --set gave them."""
    from specc.cli import main

    path = tmp_path / "dv.yaml"
    path.write_text("specc: 1\nname: dv\nparams:\n  alphabet: 10\nderived:\n  vocab: alphabet + 3\n"
                    "dims: {B: 2, T: {example: 4}}\ninputs:\n  ids: i64[B, T] in range(vocab)\ngraph: |\n"
                    "  y = embedding(ids, vocab, 8)\noutputs:\n  y:\n")
    assert main(["check", str(path), "--set", "alphabet=20", "--no-color"]) == 0
    assert "params      alphabet=20, vocab=23" in capsys.readouterr().out
    assert main(["check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bound_params"] == {"alphabet": 10, "vocab": 13}
