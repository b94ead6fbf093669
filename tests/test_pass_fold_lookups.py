"""fold_lookups: an embedding followed by per-token layers becomes one precomputed table."""

import json

from hypothesis import strategies as st

import specc
from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: lookup
params:
  vocab: 50
inputs:
  ids: i64[B, T] in range(vocab)
graph: |
  e = embedding(ids, vocab, 16)
  h = linear(gelu(layer_norm(e)), 32) * 0.5
  y = mlp(h, hidden=64) + 1.0
  z = relu(embedding(ids, vocab, 8)) + e[:, :, :8]
outputs:
  y:
  z:
"""

EXPECTED = """graph lookup
  params vocab=50
  dims B=2, T=8
  %0: i64[B, T] in range(50) = input(name="ids")
  %1: f32[B, T, 16] = embedding(%0, num=50, dim=16)  @e {weight: f32[50, 16]}
  %9: f32[B, T, 32] = embedding(%0, num=50, dim=32)  @table {weight: f32[50, 32]}
  %11: f32[B, T, 8] = embedding(%0, num=50, dim=8)  @embedding {weight: f32[50, 8]}
  %12: f32[B, T, 8] = getitem(%1, index=[:, :, :8])
  %13: f32[B, T, 8] = add(%11, %12)
  return y=%9, z=%13
"""


def test_before_expected():
    # relu(embedding(...)) folds into its table (%11); `e` is also read by the slice, so it stays for
    # the slice, and its chain becomes a second table beside it (@table, a fresh path); `+ e[...]`
    # is not per-token.
    assert ir_after(BEFORE, "fold_lookups") == EXPECTED


def test_a_single_use_chain_folds_whole():
    text = BEFORE.replace("  z = relu(embedding(ids, vocab, 8)) + e[:, :, :8]\n", "").replace("  z:\n", "")
    ir = ir_after(text, "fold_lookups")
    assert ir.count(" = ") == 2 and "embedding(%0, num=50, dim=32)  @e {weight: f32[50, 32]}" in ir


def test_manifest_says_what_was_folded(tmp_path):
    out = specc.build(BEFORE.replace("  z = relu(embedding(ids, vocab, 8)) + e[:, :, :8]\n", "")
                      .replace("  z:\n", ""), tmp_path / "b", opt_level=2)
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    (fold,) = [p for p in passes if p["pass"] == "fold_lookups"]
    assert fold["notes"]["folded"] == [{"table": "e", "ops": ["embedding", "layer_norm", "gelu", "linear", "mul",
                                                              "mlp", "add"], "rows": 50, "width": 32,
                                        "bytes": 6400}]
    assert fold["params"] == [5568, 1600]


def test_every_branch_after_a_shared_start_gets_its_own_table():
    text = """specc: 1
name: branches
inputs:
  ids: i64[B, T] in range(20)
graph: |
  e = embedding(ids, 20, 8)
  a = tanh(linear(e, 6))
  b = relu(e) * 2.0
  c = a + layer_norm(e)[:, :, :6]
outputs:
  e:
  b:
  c:
"""
    ir = ir_after(text, "fold_lookups")
    assert "@e {weight: f32[20, 8]}" in ir  # an output: kept
    tables = sorted(line.split("@")[1].split(" ")[0] for line in ir.splitlines() if "= embedding(" in line)
    assert tables == ["e", "table", "table_1", "table_2"], ir  # tanh(linear), relu * 2, layer_norm
    assert "linear(" not in ir and "tanh(" not in ir and "relu(" not in ir and "layer_norm(" not in ir


def test_cost_model_refuses_huge_tables():
    text = BEFORE.replace("vocab: 50", "vocab: 600000").replace("linear(gelu(layer_norm(e)), 32)",
                                                                "linear(gelu(layer_norm(e)), 64)")
    assert "embedding(%0, num=600000, dim=64)" not in ir_after(text, "fold_lookups")


def test_gpt_positions_are_not_per_token():
    from pathlib import Path

    gpt = (Path(__file__).resolve().parents[1] / "specs" / "gpt.yaml").read_text()
    assert ir_after(gpt, "fold_lookups").count("embedding(") == 2


@st.composite
def lookup_specs(draw):
    vocab = draw(st.integers(2, 40))
    d = draw(st.sampled_from([4, 8, 12]))
    chain = draw(st.lists(st.sampled_from([
        "layer_norm({v})", "rms_norm({v})", "linear({v}, {d})", "gelu({v})", "tanh({v})", "mlp({v}, hidden=16)",
        "{v} * 0.5", "2.0 - {v}", "dropout({v}, p=0.2)", "silu(linear({v}, {d}, bias=false))"]), min_size=1,
        max_size=4))
    expr = "embedding(ids, vocab, {d})".format(d=d)
    for step in chain:
        expr = step.format(v=expr, d=d)
    return (f"specc: 1\nname: g\nparams:\n  vocab: {vocab}\ninputs:\n  ids: i64[B, T] in range(vocab)\n"
            f"graph: |\n  y = {expr}\noutputs:\n  y:\n")


@st.composite
def branching_lookup_specs(draw):
    """An embedding read by one or two per-token chains and also, maybe, by an output or a slice."""
    vocab = draw(st.integers(2, 30))
    chains = draw(st.lists(st.sampled_from(["tanh(linear(e, 8))", "layer_norm(e) * 0.5", "relu(e)",
                                            "mlp(e, hidden=12)", "gelu(rms_norm(e))"]), min_size=1, max_size=2))
    lines = ["e = embedding(ids, vocab, 8)"] + [f"y{i} = {c}" for i, c in enumerate(chains)]
    outs = [f"y{i}" for i in range(len(chains))]
    extra = draw(st.sampled_from(["", "output", "slice"]))
    if extra == "output":
        outs.append("e")
    elif extra == "slice":
        lines.append("s = e[:, :, :4] + 1.0")
        outs.append("s")
    body = "".join(f"  {ln}\n" for ln in lines)
    return (f"specc: 1\nname: g\nparams:\n  vocab: {vocab}\ninputs:\n  ids: i64[B, T] in range(vocab)\n"
            f"graph: |\n{body}outputs:\n" + "".join(f"  {o}:\n" for o in outs))


test_property_branches = property_test("fold_lookups", [], spec_strategy=branching_lookup_specs())


def _fires_unless_only_dropout(text):
    return "dropout" not in text or any(op in text for op in ("norm", "linear", "gelu", "tanh", "mlp", "*", "-"))


test_property = property_test("fold_lookups", [], spec_strategy=lookup_specs().filter(_fires_unless_only_dropout))


CATEGORICAL = """specc: 1
name: catmlp
inputs:
  a: i64[B, T] in range(5)
  b: i64[B, T] in range(3)
  c: i64[B, T] in range(7)
graph: |
  y = mlp(concat([one_hot(a, 5), one_hot(b, 3)]), hidden=16, out=4, act=relu)
  z = tanh(linear(one_hot(c, 7), 6))
outputs:
  y:
  z:
"""

CATEGORICAL_EXPECTED = """graph catmlp
  dims B=2, T=8
  %0: i64[B, T] in range(5) = input(name="a")
  %1: i64[B, T] in range(3) = input(name="b")
  %2: i64[B, T] in range(7) = input(name="c")
  %9: f32[B, T, 6] = embedding(%2, num=7, dim=6)  @table_1 {weight: f32[7, 6]}
  %10: i64[] = scalar(value=3, dtype="i64")
  %11: i64[B, T] = mul(%0, %10)
  %12: i64[B, T] = add(%11, %1)
  %6: f32[B, T, 4] = embedding(%12, num=15, dim=4)  @table {weight: f32[15, 4]}
  return y=%6, z=%9
"""


def test_categorical_mlp_becomes_a_lookup():
    # Transformer Programs' categorical MLP over two variables: one table row per pair of values
    assert ir_after(CATEGORICAL, "fold_lookups") == CATEGORICAL_EXPECTED


def test_lookup_form_equals_the_model_on_every_input_of_the_domain():
    """SEEDS.md row 6: the discretised model equals its lookup-table form on every input."""
    import torch

    from equivalence import build, only, outputs, perturbed_weights

    graph = specc.compile(CATEGORICAL)
    w = perturbed_weights(graph)
    dense, _ = build(CATEGORICAL, only("fold_lookups", opt_level=0), w)
    table, _ = build(CATEGORICAL, only("fold_lookups"), w)
    a, b, c = torch.meshgrid(torch.arange(5), torch.arange(3), torch.arange(7), indexing="ij")
    inputs = tuple(t.reshape(1, -1) for t in (a, b, c))  # all 105 combinations, as one batch row
    want = outputs(dense, inputs, torch.float64)
    got = outputs(table, inputs)
    for wv, gv in zip(want, got):
        assert (gv.double() - wv).abs().max() < 1e-6


@st.composite
def categorical_specs(draw):
    sizes = draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))
    hidden = draw(st.sampled_from([4, 8]))
    act = draw(st.sampled_from(["relu", "gelu", "tanh"]))
    ins = "\n".join(f"  v{i}: i64[B, T] in range({n})" for i, n in enumerate(sizes))
    onehots = ", ".join(f"one_hot(v{i}, {n})" for i, n in enumerate(sizes))
    x = f"concat([{onehots}])" if len(sizes) > 1 else onehots
    return (f"specc: 1\nname: g\ninputs:\n{ins}\ngraph: |\n  y = mlp({x}, hidden={hidden}, out=3, act={act})\n"
            f"outputs:\n  y:\n")


test_property_categorical = property_test("fold_lookups", [], spec_strategy=categorical_specs())
