"""Structured pruning (OPTIN, SEEDS.md row 13): compiler/passes/prune.py removes attention heads and MLP
neurons physically; specc/pruning.py ranks them by the distortion their masking causes in later layers
and removes the least important per FLOP until the FLOPs are within the budget; `specc prune` writes
the pruned build.

Oracle: the unpruned -O0 model in float64 with the removed heads' (neurons') slice of the hidden
activations zeroed before the output projection (fc2), by a forward pre-hook written here.
Tolerances: pruned model vs that oracle, both float64 with the same float32 weight values (the derived
weights are exact slices): max abs error <= 1e-12 (the same sums, some terms 0 * w instead of absent).
FLOPs and parameter counts are integers and compared exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import specc
from specc.backends.pytorch.build import artifacts, import_model_module, load_in_memory
from specc.backends.pytorch.weights import init_weights
from specc.cli import main
from specc.compiler.passes import PassContext
from specc.compiler.passes.prune import Layer, PruneError, prunable_layers, prune_structure
from specc.compiler.summary import summarize
from specc.pruning import select

TOL = 1e-12
GPT = {"d_model": 32, "heads": 4, "layers": 2}  # hidden 128, head width 8


def gpt_graph():
    return specc.compile("specs/gpt.yaml", **GPT)


def masked_model(graph, weights, keep: dict[str, list[int]]):
    """The unpruned -O0 model in float64 with the units not in `keep` zeroed before the output projection."""
    model = load_in_memory(artifacts(graph, "x", "m.yaml", weights=weights, ctx=PassContext(opt_level=0))).double()
    layers = {layer.path: layer for layer in prunable_layers(graph)}
    for path, kept in keep.items():
        layer = layers[path]
        mask = torch.zeros(layer.units * layer.unit_width, dtype=torch.float64)
        for u in kept:
            mask[u * layer.unit_width:(u + 1) * layer.unit_width] = 1.0
        module = model.get_submodule(path)
        inner = module.o if layer.op == "attention" else module.fc2
        inner.register_forward_pre_hook(lambda m, args, mask=mask: (args[0] * mask,))
    return model


def pruned_model(graph, weights, keep, opt_level=0):
    pruned = prune_structure(graph, keep).graph
    return pruned, load_in_memory(artifacts(pruned, "x", "m.yaml", weights=weights,
                                            ctx=PassContext(opt_level=opt_level))).double()


def assert_same(a, b, inputs_of, seeds=(0, 1, 2)):
    for seed in seeds:
        inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs_of(seed))
        with torch.no_grad():
            x, y = a(*inputs), b(*inputs)
        x, y = (x if isinstance(x, tuple) else (x,)), (y if isinstance(y, tuple) else (y,))
        for u, v in zip(x, y):
            assert u.shape == v.shape
            err = (u - v).abs().max().item()
            assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


KEEPS = {
    "one-head": {"h.0.attention": [0, 1, 3]},
    "neurons": {"h.1.mlp": list(range(0, 128, 3))},
    "across-layers": {"h.0.attention": [2], "h.1.attention": [0, 3], "h.0.mlp": [5, 6, 7, 100],
                      "h.1.mlp": list(range(64, 128))},
}


@pytest.mark.parametrize("opt_level", [0, 2])  # -O2: the narrower q/k/v fused into one projection, sdpa
@pytest.mark.parametrize("case", sorted(KEEPS))
def test_masked_units_equal_the_physically_removed_ones(case, opt_level):
    graph = gpt_graph()
    weights = init_weights(graph)
    keep = KEEPS[case]
    pruned, model = pruned_model(graph, weights, keep, opt_level)
    oracle = masked_model(graph, weights, keep)
    assert_same(model, oracle, model.example_inputs)
    state = model.state_dict()
    for path, kept in keep.items():
        node = next(n for _, n in pruned.nodes() if ".".join(n.path) == path)
        if path.endswith("attention"):
            assert node.attr("heads") == len(kept) and node.attr("head_dim") == 8
            if opt_level == 0:
                assert state[f"{path}.q.weight"].shape == (8 * len(kept), 32)
                assert state[f"{path}.o.weight"].shape == (32, 8 * len(kept))
        else:
            assert node.attr("hidden") == len(kept)
            assert state[f"{path}.fc1.weight"].shape == (len(kept), 32)
            assert state[f"{path}.fc2.weight"].shape == (32, len(kept))
    # the parameters that remain are the old ones' rows and columns, exactly
    if "h.0.attention" in keep and opt_level == 0:
        rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in keep["h.0.attention"]])
        assert torch.equal(state["h.0.attention.k.weight"], weights["h.0.attention.k.weight"][rows].double())
        assert torch.equal(state["h.0.attention.o.weight"], weights["h.0.attention.o.weight"][:, rows].double())


SMALL = """specc: 1
name: small
inputs: {x: 'f32[B, T, 12]', c: 'f32[B, S, 6]'}
dims: {B: 2, T: 5, S: 3}
graph: |
  a = attention(x, heads=3, kv=c)
  f = attention(a, heads=2, qkv=true, causal=true, bias=false)
  y = mlp(f, hidden=10, act=relu, bias=false) + mlp(f, hidden=7, out=4, act=silu)[:, :, :1]
outputs:
  y:
"""


def test_cross_attention_fused_qkv_and_mlp_variants_prune_exactly():
    """Cross-attention (k, v from a kv of another width), a spec's own qkv=true layer, mlps without bias
    and with out=: masked equals removed."""
    graph = specc.compile(SMALL)
    gen = torch.Generator().manual_seed(3)
    weights = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in init_weights(graph).items()}
    keep = {"a": [1], "f": [0], "mlp": [0, 2, 3, 9], "mlp_1": [6]}
    for level in (0, 2):
        _, model = pruned_model(graph, weights, keep, level)
        assert_same(model, masked_model(graph, weights, keep), model.example_inputs)


SHARED = """specc: 1
name: shared
inputs: {x: 'f32[B, T, 12]', m: 'bool[B, 3, T, T]'}
dims: {B: 2, T: 5}
graph: |
  s = mlp(x, 4)
  y = mlp(s, 4, share=s)
  a = attention(y, heads=3, mask=m)
  b = attention(a, heads=3, mask=m[:, :1])
outputs:
  b:
"""


def test_rewrite_errors_and_layers_left_whole():
    graph = gpt_graph()
    with pytest.raises(PruneError, match="must keep one head at least"):
        prune_structure(graph, {"h.0.attention": []})
    with pytest.raises(PruneError, match=r"distinct and in range\(4\)"):
        prune_structure(graph, {"h.0.attention": [0, 4]})
    with pytest.raises(PruneError, match="'tok' is not an attention or mlp layer"):
        prune_structure(graph, {"tok": [0]})
    assert not prune_structure(graph, {"h.0.attention": [0, 1, 2, 3]}).modified
    shared = specc.compile(SHARED)
    reasons = {layer.path: layer.reason for layer in prunable_layers(shared)}
    assert reasons == {"s": "its parameters are shared with another layer (tie= or share=)", "y": reasons["s"],
                       "a": "its mask has one slice per head", "b": None}
    with pytest.raises(PruneError, match="cannot be pruned: its parameters are shared"):
        prune_structure(shared, {"s": [0, 1]})


# ---------------------------------------------------------------------------------------------
# ranking and the budget
# ---------------------------------------------------------------------------------------------

def test_select_removes_least_important_per_flop_first_and_keeps_one_unit():
    a = Layer("a", "attention", 0, 3, 4, 300)  # 100 FLOPs a head
    m = Layer("m", "mlp", 1, 4, 1, 40)  # 10 FLOPs a neuron
    importance = {"a": torch.tensor([5.0, 0.5, 1.0]), "m": torch.tensor([0.04, 0.2, 0.03, 0.5])}
    # per FLOP: a [0.05, 0.005, 0.01], m [0.004, 0.02, 0.003, 0.05] -> m2, m0, a1, a2, m1, a0, m3
    assert select([a, m], importance, 340, 330) == {"m": [0, 1, 3]}
    assert select([a, m], importance, 340, 320) == {"m": [1, 3]}
    assert select([a, m], importance, 340, 220) == {"a": [0, 2], "m": [1, 3]}
    assert select([a, m], importance, 340, 0) == {"a": [0], "m": [3]}  # one unit each, however low the target
    assert select([a, m], importance, 340, 340) == {}


@pytest.mark.parametrize("budget", [0.95, 0.7, 0.4])
def test_flops_after_pruning_are_within_the_budget(budget):
    report = specc.prune("specs/gpt.yaml", flops=budget, calib="example", **GPT)
    before = summarize(gpt_graph()).example_flops
    assert report.flops_before == before
    assert report.flops_after == summarize(report.graph).example_flops <= budget * before
    # greedy and tight: putting back the cheapest removed unit would break the budget
    cheapest = min(layer.flops // layer.units for layer in prunable_layers(gpt_graph()))
    assert report.flops_after + cheapest > budget * before
    assert report.params_after == summarize(report.graph).params < report.params_before
    assert all(layer.after >= 1 for layer in report.layers)


def test_the_budget_applies_at_the_sizes_given():
    """Attention's score FLOPs grow with T squared and the rest with T, so a budget met at the example
    T = 16 is not met at T = 64 by the same pruned model; pruned at T = 64 it is, counted there."""
    at_16 = specc.prune("specs/gpt.yaml", flops=0.6, calib="example", **GPT)
    at_64 = specc.prune("specs/gpt.yaml", flops=0.6, calib="example", at={"T": 64}, **GPT)
    assert at_16.sizes == {"B": 2, "T": 16} and at_64.sizes == {"B": 2, "T": 64}
    before_64 = summarize(gpt_graph(), {"T": 64}).example_flops
    assert at_64.flops_before == before_64
    assert at_64.flops_after == summarize(at_64.graph, {"T": 64}).example_flops <= 0.6 * before_64
    assert summarize(at_16.graph, {"T": 64}).example_flops > 0.6 * before_64  # the example-size choice misses it
    assert at_64.to_json()["sizes"] == {"B": 2, "T": 64}


def test_a_head_whose_output_projection_is_zero_goes_first_with_zero_importance():
    graph = gpt_graph()
    weights = init_weights(graph)
    weights["h.1.attention.o.weight"][:, 16:24] = 0.0  # head 2 of layer 1 writes nothing
    layer = next(x for x in prunable_layers(graph) if x.path == "h.1.attention")
    total = summarize(graph).example_flops
    budget = (total - layer.flops_per_unit + 0.5) / total  # room for removing exactly one head
    report = specc.prune("specs/gpt.yaml", flops=budget, calib="example", weights=weights, **GPT)
    removed = {x.path: x.removed for x in report.layers if x.removed}
    assert removed == {"h.1.attention": (2,)}
    scores = {x.path: x.importance for x in report.layers}
    assert scores["h.1.attention"][2] == 0.0
    assert min(v for x in report.layers for i, v in enumerate(x.importance)
               if (x.path, i) != ("h.1.attention", 2)) > 1e-8
    assert report.flops_after == total - layer.flops_per_unit


def test_importance_is_the_later_layers_distortion():
    """Units of the last mlp only reach the model's output; masking one changes the logits by fc2's
    column times its activation: a unit whose fc2 column is zero has importance 0, one with a large
    column more than the others."""
    graph = gpt_graph()
    weights = init_weights(graph)
    weights["h.1.mlp.fc2.weight"][:, 7] = 0.0
    weights["h.1.mlp.fc2.weight"][:, 9] *= 50.0
    report = specc.prune("specs/gpt.yaml", flops=0.99, calib="example", weights=weights, **GPT)
    mlp = next(x for x in report.layers if x.path == "h.1.mlp")
    assert mlp.importance[7] == 0.0
    assert mlp.importance[9] == max(mlp.importance) > 100 * sorted(mlp.importance)[-2] / 50
    assert 7 in mlp.removed


# ---------------------------------------------------------------------------------------------
# the build and the command
# ---------------------------------------------------------------------------------------------

def test_pruned_build_runs_equals_the_masked_model_and_counts_its_parameters(tmp_path):
    out = tmp_path / "p"
    report = specc.prune("specs/gpt.yaml", out, flops=0.7, calib="example", **GPT)
    module = import_model_module(out)
    model = module.load(out)
    count = sum(p.numel() for p in model.parameters())  # tied parameters once
    manifest = json.loads((out / "manifest.json").read_text())
    assert count == report.params_after == manifest["parameter_count"]
    assert manifest["prune"]["flops"] == [report.flops_before, report.flops_after]
    assert manifest["prune"]["budget"] == 0.7 and manifest["prune"]["parameters"] == [report.params_before, count]
    assert {x["layer"]: x["after"] for x in manifest["prune"]["layers"]} == {x.path: x.after for x in report.layers}
    graph = gpt_graph()
    oracle = masked_model(graph, init_weights(graph), report.keep)
    assert_same(model.double(), oracle, module.example_inputs)


def test_cli_prunes_gpt_with_its_data_set(tmp_path, capsys):
    out = tmp_path / "gpt"
    code = main(["prune", "specs/gpt.yaml", "--set", "d_model=32", "--flops", "0.6", "--samples", "16", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())["prune"]
    assert manifest["flops"][1] <= 0.6 * manifest["flops"][0]
    assert "16 samples of the train split of arithmetic" in manifest["calibration"]
    assert f"pruned gpt -> {out}/" in text and "h.0.attention  heads" in text
    assert "(0.5" in text and "budget 0.6)" in text  # FLOPs 7.05M -> ... (0.599 of the original; budget 0.6)
    for x in manifest["layers"]:
        assert f"{x['layer']}" in text and f"{x['after']}/{x['before']}" in text



def test_cli_prunes_with_inputs_the_recipe_draws(tmp_path, capsys):
    """position_prediction feeds `keep` from `random: subset(...)`, not from its data set: calibration
    takes the recipe's evaluation draws for it (it failed with a KeyError when only data fields fed)."""
    out = tmp_path / "pp"
    code = main(["prune", "specs/position_prediction.yaml", "--flops", "0.8", "--samples", "16", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())["prune"]
    assert manifest["flops"][1] <= 0.8 * manifest["flops"][0]
    assert "16 samples of the train split of digit_patches" in manifest["calibration"]

NO_LAYERS = """specc: 1
name: plain
inputs: {x: 'f32[B, 4]'}
dims: {B: 2}
graph: |
  y = linear(x, 3)
outputs:
  y:
"""


@pytest.mark.parametrize("argv,message", [
    (["--flops", "0"], "<--flops>: error: the FLOP budget must be a fraction of the model's FLOPs in (0, 1], "
                       "e.g. 0.6, got 0.0"),
    (["--flops", "1.5"], "got 1.5"),
    (["--flops", "nan"], "got nan"),
    (["--flops", "lots"], "<--flops>: error: --flops takes a fraction of the model's FLOPs in (0, 1], e.g. 0.6, "
                          "got 'lots'"),
    (["--flops", "0.01"], "<--flops>: error: the FLOP budget 0.01 cannot be met: with one head or neuron left in "
                          "every prunable layer the model still needs 0.174 of its FLOPs (341568 of 1961984)"),
    (["--flops", "0.6", "--calib", "nowhere.npz"], "nowhere.npz: error: cannot read the calibration file: no such file"),
    (["--flops", "0.6", "--samples", "0"], "<--calib>: error: the calibration sample count must be a positive "
                                           "integer, got 0"),
    (["--flops", "0.6", "--at", "Q=64"], "<--at>: error: 'Q' is not a symbolic dimension of gpt (its dimensions: "
                                         "B, T)"),
    (["--flops", "0.6", "--at", "T=65"], "<--at>: error: T=65 is outside the sizes gpt accepts (1 to 64)"),
    (["--flops", "0.6", "--at", "T=0"], "<--at>: error: T: a size must be a positive integer, got 0"),
    (["--flops", "0.6", "--at", "T=-3"], "<--at>: error: --at takes DIM=SIZE with a positive integer size, "
                                         "e.g. T=128, got 'T=-3'"),
    (["--flops", "0.6", "--at", "T=8", "--at", "T=16"], "<--at>: error: --at T is given twice (8 and 16)"),
])
def test_cli_errors_are_located_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    code = main(["prune", "specs/gpt.yaml", "--set", "d_model=32", *argv, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_cli_errors_of_the_spec_and_the_calibration_file(tmp_path, capsys):
    spec = tmp_path / "plain.yaml"
    spec.write_text(NO_LAYERS)
    out = tmp_path / "o"
    assert main(["prune", str(spec), "--flops", "0.5", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:5:1: error: prune: plain has no attention or mlp layer" in err
    spec.write_text(SMALL)
    assert main(["prune", str(spec), "--flops", "0.5", "--calib", "data", "-o", str(out)]) == 2
    assert "<--calib>: error: --calib data needs the spec's train: section" in capsys.readouterr().err
    import numpy as np

    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 5, 12), np.float32))
    assert main(["prune", str(spec), "--flops", "0.5", "--calib", str(tmp_path / "calib.npz"), "-o", str(out)]) == 2
    assert "calib.npz: error: the calibration file has no tensor 'c' (the model's inputs: x, c; it has: x)" \
        in capsys.readouterr().err
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 5, 12), np.float32), c=np.ones((4, 2), np.float32))
    assert main(["prune", str(spec), "--flops", "0.5", "--calib", str(tmp_path / "calib.npz"), "-o", str(out)]) == 2
    assert "calib.npz: error: calibration tensor 'c' is float32[4, 2], but the input is f32[B, S, 6]" \
        in capsys.readouterr().err
    assert not out.exists()
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=gen.normal(size=(6, 5, 12)).astype(np.float32),
             c=gen.normal(size=(6, 3, 6)).astype(np.float32))
    assert main(["prune", str(spec), "--flops", "0.5", "--calib", str(tmp_path / "calib.npz"), "-o", str(out)]) == 0
    assert "calib.npz (all 6 of its samples, 64 asked for)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["prune"]["flops"][1] <= 0.5 * \
        json.loads((out / "manifest.json").read_text())["prune"]["flops"][0]


# ---------------------------------------------------------------------------------------------
# accuracy after pruning a briefly trained model
# ---------------------------------------------------------------------------------------------

def test_pruning_a_trained_gpt_to_80_percent_of_its_flops_keeps_its_accuracy(tmp_path):
    """gpt's recipe (reversed 3-digit addition, 1500 steps: about 25 s on one core) reaches an exact-match
    accuracy of about 0.999 on its validation split; pruned to 0.8 of its FLOPs without retraining, the
    exact-match and digit accuracies stay within 0.02 of it (measured: 0.9997 -> 0.992 exact, 0.99993 ->
    0.9985 digits; the paper: at most 2 points lost at 0.6 of the FLOPs on GLUE, where this 2-layer model's
    exact match falls to about 0.1)."""
    from safetensors.torch import load_file

    from specc.train import prepare
    from specc.train.loop import Stepper, load_data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this small model trains fastest on one thread
    try:
        result = specc.train.train("specs/gpt.yaml", tmp_path / "run", train={"eval.every": 1500})
    finally:
        torch.set_num_threads(threads)
    before = result.metrics
    assert before["exact"] > 0.95
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-0001500" / "model.safetensors"))
    report = specc.prune("specs/gpt.yaml", tmp_path / "p", flops=0.8, weights=trained)
    assert report.flops_after <= 0.8 * report.flops_before
    model = import_model_module(tmp_path / "p").load(tmp_path / "p")
    src, graph, recipe = prepare("specs/gpt.yaml")
    _, val = load_data(recipe)
    stepper = Stepper(model, graph, recipe, 1)
    after = stepper.evaluate(model, val, 0, stepper.scalars(0), 4096)
    for metric in ("exact", "digit_acc"):
        assert math.isfinite(after[metric]) and after[metric] >= before[metric] - 0.02, (metric, before, after)
