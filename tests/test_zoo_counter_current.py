"""specs/counter_current.yaml (SEEDS.md row 15): counter-current learning's layer-local losses, with
every layer of the forward and the feedback network reading a detached input, so that no gradient
crosses a layer boundary: each local loss reaches exactly the two layers that meet at its depth.

The local losses are the recipe's (the authors' C2Loss_Classification): depth 3, cross-entropy of the
logits (trains f3); depths 2 and 1, 128 / width * mse(a_l b_l^T, one-hot target) (trains f_l and
g_l+1); depth 0, the same for the input against g1's output (trains g1). The checks run autograd over
the built module in float64, parameter by parameter: the owners of a loss get a non-zero gradient, which
equals the gradient of the same loss computed by hand on the layer's own (detached) input, and every
other parameter gets none at all (grad None: no backward path reaches it). The same spec without the
detaches sends the depth-2 loss into f1, so the check has teeth.

Tolerances (float64 throughout): the module against the hand-written reference and the local gradients
against the hand-computed ones, max abs error <= 1e-12 (the same float64 operations, in places in
another order; measured about 1e-16 on values of order 1); the gradient of the summed loss equals the
sum of the local ones exactly (each parameter is reached by one local loss only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

NAME = "counter_current"
SPEC = Path(__file__).resolve().parents[1] / "specs" / f"{NAME}.yaml"
TOL = 1e-12
PIXELS, HIDDEN, CLASSES = 64, 32, 10
f64 = torch.float64
#: depth -> the parameters its local loss must train: the forward layer that computes a_l and the
#: feedback layer that computes b_l
OWNERS = {3: {"f3.weight"}, 2: {"f2.weight", "g3.weight"}, 1: {"f1.weight", "g2.weight"}, 0: {"g1.weight"}}
WIDTH = {2: HIDDEN, 1: HIDDEN, 0: PIXELS}


def load64(source, opt_level=0):
    return specc.load(source, opt_level=opt_level).double()


def batch(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen, dtype=f64), torch.randint(0, CLASSES, (n,), generator=gen)


def reference(sd, x, label):
    """Counter-current learning's two networks written out by hand in float64 (the authors' C2Linear
    layers without biases, tanh between layers, the feedback network run on every class's one-hot)."""
    w = {k: v.double() for k, v in sd.items()}
    a0 = x.reshape(x.shape[0], -1)
    a1 = torch.tanh(a0 @ w["f1.weight"].T)
    a2 = torch.tanh(a1 @ w["f2.weight"].T)
    logits = a2 @ w["f3.weight"].T
    b3 = torch.eye(CLASSES, dtype=f64)
    b2 = torch.tanh(b3 @ w["g3.weight"].T)
    b1 = torch.tanh(b2 @ w["g2.weight"].T)
    b0 = b1 @ w["g1.weight"].T
    target = F.one_hot(label, CLASSES).to(f64)
    return {"logits": logits, "a0": a0, "a1": a1, "a2": a2, "b0": b0, "b1": b1, "b2": b2, "target": target}


def outputs(model, x, label):
    names = ("logits", "a0", "a1", "a2", "b0", "b1", "b2", "target")
    return dict(zip(names, model(x, label)))


def local_loss(out, depth, label):
    """The recipe's loss term at `depth`."""
    if depth == 3:
        return F.cross_entropy(out["logits"], label)
    a, b = out[f"a{depth}"], out[f"b{depth}"]
    return 128 / WIDTH[depth] * F.mse_loss(a @ b.T, out["target"])


def gradients(model, depth, x, label):
    """The gradient of one local loss for every parameter (None where no backward path reaches it), and
    for the input."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    local_loss(outputs(model, x, label), depth, label).backward()
    return {n: p.grad for n, p in model.named_parameters()}, x.grad


def by_hand(sd, depth, x, label):
    """The gradients of the owners of a local loss, computed on the layer pair alone: the activations
    below it are plain (constant) tensors, the owners' weights the only leaves."""
    ref = reference(sd, x, label)
    w = {k: v.detach().double().clone().requires_grad_(True) for k, v in sd.items()}
    fwd_in = {3: ref["a2"], 2: ref["a1"], 1: ref["a0"]}
    fb_in = {2: torch.eye(CLASSES, dtype=f64), 1: ref["b2"], 0: ref["b1"]}
    fwd = {3: lambda h: h @ w["f3.weight"].T, 2: lambda h: torch.tanh(h @ w["f2.weight"].T),
           1: lambda h: torch.tanh(h @ w["f1.weight"].T)}
    fb = {2: lambda h: torch.tanh(h @ w["g3.weight"].T), 1: lambda h: torch.tanh(h @ w["g2.weight"].T),
          0: lambda h: h @ w["g1.weight"].T}
    out = dict(ref)
    if depth == 3:
        out["logits"] = fwd[3](fwd_in[3])
    else:
        out[f"a{depth}"] = fwd[depth](fwd_in[depth]) if depth in fwd else ref["a0"]
        out[f"b{depth}"] = fb[depth](fb_in[depth])
    local_loss(out, depth, label).backward()
    return {n: w[n].grad for n in OWNERS[depth]}


def perturbed_model(opt_level=0):
    model = load64(SPEC, opt_level)
    gen = torch.Generator().manual_seed(3)
    model.load_state_dict({k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=f64)
                           for k, v in model.state_dict().items()})
    return model


def assert_matches_reference(model, seed=0):
    x, label = batch(seed)
    with torch.no_grad():
        got = outputs(model, x, label)
    want = reference(model.state_dict(), x, label)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == f64, k
        assert (got[k] - want[k]).abs().max() <= TOL, k


def test_module_equals_the_float64_reference():
    assert_matches_reference(load64(SPEC))
    assert_matches_reference(perturbed_model(), seed=1)


@pytest.mark.parametrize("opt_level", [0, 1])
@pytest.mark.parametrize("depth", [3, 2, 1, 0])
def test_no_gradient_crosses_a_layer_boundary(depth, opt_level):
    model = perturbed_model(opt_level)
    x, label = batch(2)
    grads, x_grad = gradients(model, depth, x, label)
    assert set(grads) == set().union(*OWNERS.values())
    # the input reaches no layer's loss through f1 (its input is detached); only the depth-0 loss reads
    # the input itself (a0, no layer below it)
    assert (x_grad is None) == (depth != 0)
    for name, g in grads.items():
        if name in OWNERS[depth]:
            assert g is not None and g.abs().min() > 0, name  # every entry of the pair's weights moves
        else:
            assert g is None, f"the depth-{depth} loss reaches {name}"
    want = by_hand(model.state_dict(), depth, x, label)
    for name in OWNERS[depth]:
        assert (grads[name] - want[name]).abs().max() <= TOL * max(1.0, want[name].abs().max().item()), name


def test_summed_loss_gradient_is_the_local_gradients():
    model = perturbed_model()
    x, label = batch(4)
    local = {}
    for depth in OWNERS:
        grads, _ = gradients(model, depth, x, label)
        local.update({n: grads[n] for n in OWNERS[depth]})
    model.zero_grad(set_to_none=True)
    out = outputs(model, x, label)
    sum(local_loss(out, d, label) for d in OWNERS).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, local[name]), name


def test_the_check_has_teeth():
    """Without the detaches the depth-2 loss sends gradient down into f1 (and the depth-1 loss into g3)."""
    text = SPEC.read_text()
    plain = text.replace("detach(a0)", "a0").replace("detach(a1)", "a1").replace("detach(a2)", "a2") \
        .replace("detach(b1)", "b1").replace("detach(b2)", "b2").replace("detach(b3)", "b3")
    assert "detach(" not in plain.split("graph: |")[1].split("outputs:")[0]
    model = load64(plain)
    model.load_state_dict(perturbed_model().state_dict())
    x, label = batch(2)
    grads, x_grad = gradients(model, 2, x, label)
    assert grads["f1.weight"] is not None and grads["f1.weight"].abs().max() > 0
    grads, _ = gradients(model, 1, x, label)
    assert grads["g3.weight"] is not None and grads["g3.weight"].abs().max() > 0


def test_deploy_keeps_only_the_forward_network(tmp_path, zoo):
    graph = specc.compile(SPEC)
    deploy, _ = optimize(graph, PassContext(opt_level=2, deploy=True))
    ir = print_graph(deploy, show_span=False)
    assert [n for n, _ in deploy.inputs] == ["x"]  # the label feeds the losses only
    assert [n for n, _ in deploy.outputs] == ["logits"]
    assert "@f1 " in ir and "@f2 " in ir and "@f3 " in ir and "@g" not in ir and "one_hot" not in ir
    s = specc.check(SPEC)
    assert s.deploy.params == HIDDEN * PIXELS + HIDDEN * HIDDEN + CLASSES * HIDDEN == s.params // 2
    # the training graph's -O2 build keeps every detach (six layer inputs)
    full = print_graph(optimize(graph, PassContext(opt_level=2))[0], show_span=False)
    assert full.count("= detach(") == 6
    out = specc.build(SPEC, tmp_path / "deploy", deploy=True)
    module, dmodel = zoo.load_dir(out)
    model = perturbed_model()
    dmodel = dmodel.double()
    dmodel.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("f")})
    x, label = batch(5)
    (xs,) = module.example_inputs()
    assert xs.shape == (8, 1, 8, 8)
    with torch.no_grad():
        got = dmodel(x)
        want = model(x, label)[0]
    assert torch.equal(got[0] if isinstance(got, tuple) else got, want)


def test_cli_check_and_build(zoo):
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(SPEC), "--no-color"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "logits" in proc.stdout and "b0 (training only)" in proc.stdout and "deploy" in proc.stdout
    out = zoo.build_cli(NAME, run=True)
    assert "a1 = torch.tanh(f1)" in (out / "model.py").read_text()
    assert (out / "model.py").read_text().count(".detach())") == 6
    _, model = zoo.load_dir(out)
    assert_matches_reference(model.double(), seed=6)


def test_specc_train_lowers_the_loss(tmp_path, zoo):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "train", str(SPEC), "-o", str(run),
                           "--set", "train.steps=200", "--set", "train.eval.every=200", "--threads", "1",
                           "--no-color"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in lines if "split" not in r]
    evals = [r for r in lines if r.get("split") == "val"]
    assert len(steps) == 200 and sum(steps[-20:]) / 20 < 0.5 * sum(steps[:20]) / 20
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert evals[0]["acc"] < 0.3 and evals[-1]["acc"] > 0.8  # 10 classes: chance is 0.1
    _, trained = zoo.load_dir(run / "model")
    assert_matches_reference(trained.double(), seed=7)  # the trained weights, same function
