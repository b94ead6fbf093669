"""A recipe's `freeze:` and `groups:` take the names of tied parameters: a later step of
`repeat(..., share=true)`, or a step of `repeat(..., share=g)`, names the tensor it is tied to (the stored
one, step 0's or g's), which the pattern then selects, once. A pattern that names some steps of a tied
tensor only (its stored name not among them) asks for a per-step choice one tensor cannot follow: a
located error that names the stored parameter. Training runs one SGD step on CPU and the checkpoint
shows which tensors moved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specc
from specc.cli import main
from specc.dsl.diagnostics import SpecError
from specc.train import prepare, train
from specc.train import loop as L

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

#: `h`: a 3-step shared repeat (h.0.* stored, h.1.* and h.2.* tied to them); `g`: per-step weights that
#: `k` reuses step by step (k.i.* tied to g.i.*)
SPEC = """\
specc: 1
name: tied
params: {{d: 4, n: {n}}}
inputs:
  x: f32[B, 2]
blocks:
  step(h): |
    u = linear(h, d)
    u = tanh(u)
    return h + linear(u, d, bias=false)
graph: |
  h0 = linear(x, d)
  h = repeat(n, step, h0, share=true)
  g = repeat(2, step, h0)
  k = repeat(2, step, h + g, share=g)
  logits = linear(k, 2)
outputs:
  logits: f32[B, 2]
train:
  data: two_moons(n=64, rotation=0.0)
  seed: 0
  loss: cross_entropy(logits, label)
  optimizer: sgd(lr=0.5)
{recipe}
  steps: 1
  batch: 16
  checkpoint: {{every: 1}}
"""

STEP0 = ["h.0.u.weight", "h.0.u.bias", "h.0.linear.weight"]


def spec(recipe: str, n: int = 3) -> str:
    return SPEC.format(n=n, recipe=recipe)


def moved(tmp_path: Path, text: str) -> dict[str, bool]:
    """Stored parameter -> whether one training step changed it."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    train(path, tmp_path / "run")
    before = specc.load(path, opt_level=0).state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert "h.1.u.weight" not in after and "k.0.u.weight" not in after  # tied ones are stored once
    return {n: not torch.equal(after[n], before[n]) for n in after}


def where(text: str, line_has: str) -> tuple[int, int]:
    """(line, column), 1-based, of the first `line_has` in `text`."""
    for n, line in enumerate(text.splitlines(), start=1):
        if line_has in line:
            return n, line.index(line_has) + 1
    raise AssertionError(f"no line has {line_has!r}")


def errors_of(text: str) -> list[tuple[int, int, str, tuple[str, ...]]]:
    with pytest.raises(SpecError) as e:
        prepare(text)
    return [(d.span.line, d.span.col, d.message, d.notes) for d in e.value.diagnostics]


# -- aliases select the stored tensor -------------------------------------------------------------

def test_freezing_every_later_step_freezes_step_0s_tensor(tmp_path):
    text = spec('  freeze: ["h.[12].u.*"]')
    _, _, recipe = prepare(text)
    assert recipe.frozen == {"h.0.u.weight", "h.0.u.bias"}
    changed = moved(tmp_path, text)
    assert not changed["h.0.u.weight"] and not changed["h.0.u.bias"]
    assert changed["h.0.linear.weight"] and changed["h0.weight"] and changed["logits.weight"]


def test_the_later_step_of_a_two_step_repeat_names_step_0(tmp_path):
    """With two steps, step 1's names are every name tied to step 0's: `h.1.*` is the shared block."""
    text = spec('  freeze: ["h.1.*"]', n=2)
    _, _, recipe = prepare(text)
    assert recipe.frozen == set(STEP0)
    changed = moved(tmp_path, text)
    assert not any(changed[n] for n in STEP0)
    assert changed["g.0.u.weight"] and changed["h0.weight"]


def test_a_group_naming_the_later_steps_holds_step_0s_tensor_once(tmp_path):
    text = spec('  groups:\n    - {params: ["h.0.linear.weight", "h.[12].linear.*", "h.*.linear.weight"], lr: 0.0}')
    src, graph, recipe = prepare(text)
    model = L.build_model(src, graph, recipe)
    opt = L.make_optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    [zero] = [g for g in opt.param_groups if g["lr"] == 0.0]
    assert [names[id(p)] for p in zero["params"]] == ["h.0.linear.weight"]  # once, not once per name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    changed = moved(tmp_path, text)
    assert not changed["h.0.linear.weight"]  # lr 0: the group's argument reached the shared tensor
    assert changed["h.0.u.weight"] and changed["logits.weight"]


def test_the_steps_of_a_repeat_that_reuses_anothers_layers_name_that_repeats(tmp_path):
    """share=g: k.i.* is tied to g.i.*; freezing k's names freezes g's tensors, and groups take them."""
    text = spec('  freeze: ["k.*.u.*"]\n  groups:\n    - {params: "k.1.linear.weight", lr: 0.0}')
    _, _, recipe = prepare(text)
    assert recipe.frozen == {"g.0.u.weight", "g.0.u.bias", "g.1.u.weight", "g.1.u.bias"}
    changed = moved(tmp_path, text)
    assert not any(changed[f"g.{i}.u.{w}"] for i in (0, 1) for w in ("weight", "bias"))
    assert not changed["g.1.linear.weight"]
    assert changed["g.0.linear.weight"] and changed["h.0.u.weight"]


def test_check_params_says_what_a_name_is_tied_to(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(spec('  freeze: ["h.[12].u.*"]'))
    assert main(["check", str(path), "--params", "--no-color"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["h.2.u.weight"].endswith("(tied to h.0.u.weight)")
    assert lines["k.1.linear.weight"].endswith("(tied to g.1.linear.weight)")
    assert "tied" not in lines["h.0.u.weight"] and "tied" not in lines["g.1.linear.weight"]


# -- a choice of steps of one tensor is a located error -------------------------------------------

def test_freezing_one_later_step_of_a_tied_tensor_is_a_located_error(tmp_path, capsys):
    text = spec('  freeze: ["h.0.linear.weight", "h.2.u.*"]')
    [(line, col, message, notes)] = errors_of(text)
    assert (line, col) == where(text, '"h.2.u.*"')
    assert message == ("freeze: 'h.2.u.*' matches h.2.u.weight, tied to h.0.u.weight: the same tensor as "
                       "h.1.u.weight, so freezing it freezes every one of them, not only the name the pattern "
                       "matches (1 more tied parameter alike)")
    assert "name h.0.u.weight (the stored name" in notes[0]
    path = tmp_path / "spec.yaml"  # the CLI: exit 2, FILE:LINE:COL
    path.write_text(text)
    assert main(["check", str(path), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}:{col}: error: freeze: 'h.2.u.*' matches h.2.u.weight, tied to h.0.u.weight" in err
    assert "Traceback" not in err
    assert main(["train", str(path), "-o", str(tmp_path / "run"), "--no-color"]) == 2
    assert not (tmp_path / "run").exists()


def test_grouping_one_later_step_of_a_tied_tensor_is_a_located_error():
    text = spec('  groups:\n    - {params: "*.bias", weight_decay: 0.0}\n    - {params: ["h0.*", "h.1.*"], lr: 0.1}')
    [(line, col, message, notes)] = errors_of(text)
    assert (line, col) == where(text, '"h.1.*"')
    assert message.startswith("groups: 'h.1.*' matches h.1.u.weight, tied to h.0.u.weight: the same tensor as "
                              "h.2.u.weight, so the group's arguments apply to every one of them")
    assert "put it in this group, name h.0.u.weight" in notes[0]
    # the stored name, or every name, is fine: the whole shared block takes the group
    prepare(spec('  groups:\n    - {params: ["h0.*", "h.0.*"], lr: 0.1}'))
    prepare(spec('  groups:\n    - {params: ["h0.*", "h.[12].*"], lr: 0.1}'))


def test_a_tied_name_taken_by_an_earlier_group_is_the_overlap_error():
    """The first group that matches any name of a tensor holds it; a later one left with nothing is the
    error it always was, which says the names are one tensor."""
    text = spec('  groups:\n    - {params: "h.0.*", lr: 0.1}\n    - {params: "h.[12].*", lr: 0.2}')
    [(line, col, message, _)] = errors_of(text)
    assert (line, col) == where(text, '{params: "h.[12].*"')
    first, _ = where(text, '{params: "h.0.*"')
    assert f"belong to the group on line {first} (h.1.u.weight is tied to h.0.u.weight: the same tensor)" in message


def test_a_pattern_matching_nothing_suggests_tied_names_too():
    text = spec('  freeze: ["h.3.u.*"]')
    [(_, _, message, notes)] = errors_of(text)
    assert message == "freeze: 'h.3.u.*' matches no parameter"
    assert notes[0].startswith("close names: ") and "h.2.u." in notes[0]  # a tied name, written as seen
