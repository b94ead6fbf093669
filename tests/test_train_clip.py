"""Per-group gradient clipping: a `groups:` entry with `clip: N` clips the norm of its own parameters'
gradient alone; every other trainable parameter (of the groups without a clip, and of no group) falls
under the global `clip:` when it is given. A parameter belongs to the first group that matches it.

Checked exactly (torch.equal): the loop's clipping equals torch.nn.utils.clip_grad_norm_ applied by hand
to each set of gradients (the same calls on the same tensors), a group's clip leaves the other
groups' gradients bitwise as they were, and one SGD step with lr 1 moves the weights by exactly the
hand-clipped gradients. A bad clip value, or a clip on a group that holds no trainable parameter, is a
located error at check time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specc
from specc.dsl.diagnostics import SpecError
from specc.train import prepare, train
from specc.train import loop as L

SPEC = """\
specc: 1
name: clipped
params:
  hidden: 8
dims:
  B: 4
inputs:
  x: f32[B, 2]
graph: |
  h = relu(linear(x, hidden))
  h2 = relu(linear(h, hidden))
  logits = linear(h2, 2)
outputs:
  logits: f32[B, 2]
train:
  data: two_moons(n=256, rotation=0.0)
  seed: 1
  loss: 100 * cross_entropy(logits, label)
  optimizer: sgd(lr=1.0)
  groups:
    - {params: "linear.*", clip: 0.01}
    - {params: "linear_1.weight", clip: 0.02}
    - {params: "logits.*", weight_decay: 0.0}
  clip: 0.03
  steps: 1
  batch: 32
  checkpoint: {every: 1}
"""
GROUPS = [["linear.weight", "linear.bias"], ["linear_1.weight"], ["linear_1.bias", "logits.weight", "logits.bias"]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gradients(text):
    """The model of the recipe and its gradients on the first batch of the run (unclipped)."""
    src, graph, recipe = prepare(text)
    torch.manual_seed(recipe.section.seed)
    model = L.build_model(src, graph, recipe)
    train_split, _ = L.load_data(recipe)
    idx = L.Batches(len(train_split["x"]), recipe.section.batch, recipe.section.seed, L.Dist()).indices(0)
    batch = {k: v[idx] for k, v in train_split.items()}
    stepper = L.Stepper(model, graph, recipe, 1)
    loss = stepper.loss(stepper.env(batch, stepper.forward(model, batch, {}), {}, 0))
    loss.backward()
    return model, recipe


def by_hand(model, clips):
    """Clone of the gradients, each named set clipped with clip_grad_norm_."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for names, max_norm in clips:
        params = [torch.nn.Parameter(torch.zeros_like(grads[n])) for n in names]
        for p, n in zip(params, names):
            p.grad = grads[n]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    return grads


def test_the_loop_clips_each_group_alone_and_the_rest_together():
    model, recipe = gradients(SPEC)
    names = {id(p): n for n, p in model.named_parameters()}
    sets = L.clip_sets(model, recipe)
    assert [([names[id(p)] for p in ps], c) for ps, c in sets] == list(zip(GROUPS, (0.01, 0.02, 0.03)))
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    norms = [torch.cat([raw[n].flatten() for n in g]).norm().item() for g in GROUPS]
    assert all(n > 0.1 for n in norms)  # every set is really clipped
    want = by_hand(model, zip(GROUPS, (0.01, 0.02, 0.03)))
    for ps, c in sets:
        torch.nn.utils.clip_grad_norm_(ps, c)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, want[n]), n
    for g, c in zip(GROUPS, (0.01, 0.02, 0.03)):
        assert torch.cat([want[n].flatten() for n in g]).norm().item() == pytest.approx(c, rel=1e-5)


def test_a_groups_clip_does_not_touch_the_other_gradients():
    text = SPEC.replace("  clip: 0.03\n", "").replace("    - {params: \"linear_1.weight\", clip: 0.02}\n", "")
    model, recipe = gradients(text)
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    sets = L.clip_sets(model, recipe)
    assert len(sets) == 1 and len(sets[0][0]) == 2  # linear.* alone; no global clip: the rest unclipped
    for ps, c in sets:
        torch.nn.utils.clip_grad_norm_(ps, c)
    got = {n: p.grad for n, p in model.named_parameters()}
    for n in ("linear_1.weight", "linear_1.bias", "logits.weight", "logits.bias"):
        assert torch.equal(got[n], raw[n]), n
    clipped = torch.cat([got["linear.weight"].flatten(), got["linear.bias"].flatten()])
    assert clipped.norm().item() == pytest.approx(0.01, rel=1e-5)
    assert not torch.equal(got["linear.weight"], raw["linear.weight"])


def test_one_sgd_step_moves_each_group_by_its_clipped_gradient(tmp_path):
    model, _ = gradients(SPEC)
    want = by_hand(model, zip(GROUPS, (0.01, 0.02, 0.03)))
    spec = tmp_path / "clipped.yaml"
    spec.write_text(SPEC)
    train(spec, tmp_path / "run")
    before = specc.load(spec, opt_level=0).state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000001" / "model.safetensors"))
    for n in want:  # SGD with lr 1: the weights move by minus the clipped gradient
        assert torch.equal(after[n], before[n] - want[n]), n


def error_of(text):
    with pytest.raises(SpecError) as e:
        prepare(text)
    return [(d.span.line, d.span.col, d.message) for d in e.value.diagnostics]


@pytest.mark.parametrize("old, new, where, message", [
    ("clip: 0.01}", "clip: 0}", (21, 34), "train.groups.0.clip: must be greater than 0.0, got 0"),
    ("clip: 0.01}", "clip: -1.5}", (21, 34), "train.groups.0.clip: must be greater than 0.0, got -1.5"),
    ("clip: 0.01}", "clip: big}", (21, 34), "train.groups.0.clip: expected a number, got a string"),
    ("linear_1.weight\", clip: 0.02}", "linear.weight\", clip: 0.02}", (22, 33),
     "groups: clip: the group holds no trainable parameter"),
    ("  clip: 0.03\n", "  clip: 0.03\n  freeze: [linear_1.weight]\n", (22, 35),
     "groups: clip: the group holds no trainable parameter"),
])
def test_bad_group_clips_are_located_errors(old, new, where, message):
    assert SPEC.count(old) == 1
    errors = error_of(SPEC.replace(old, new))
    assert any((ln, c) == where and m.startswith(message) for ln, c, m in errors), errors


def test_counter_current_clips_each_network_alone():
    """specs/counter_current.yaml: the forward network's gradient and the feedback network's, each
    clipped to norm 1 by itself, as the authors do."""
    spec = Path(__file__).resolve().parents[1] / "specs" / "counter_current.yaml"
    src, graph, recipe = prepare(spec)
    model = L.build_model(src, graph, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(sorted(names[id(p)] for p in ps), c) for ps, c in L.clip_sets(model, recipe)] == \
        [(["f1.weight", "f2.weight", "f3.weight"], 1.0), (["g1.weight", "g2.weight", "g3.weight"], 1.0)]
    assert recipe.section.clip is None
