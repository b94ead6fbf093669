"""Checks of a recipe's parameter groups, clips, losses at the initial weights and draw arguments, each
found by fuzzing: a group's optimizer arguments take the values the optimizer's own may (lr at least 0
at `specc check`, torch's constructor checks when training starts, located at the group's key); a group
that holds no parameter is an error whatever it sets; booleans are no numbers (`clip: true`); a loss
that is not finite before any update is a located error that blames the initial weights (and the drawn
inputs), not the learning rate, and writes no run folder; metrics.jsonl is JSON (non-finite values as
null); `inf` is a name in recipe expressions, and bad draw arguments read clearly, with their step.
Every case goes through `specc.cli.main` in-process: exit 2, FILE:LINE:COL, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specc.cli import main

ROOT = Path(__file__).resolve().parents[1]
COUNTER = (ROOT / "specs" / "counter_current.yaml").read_text()
POSITION = (ROOT / "specs" / "position_prediction.yaml").read_text()
F_GROUP = '    - {params: "f*", clip: 1.0}'

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run(tmp_path: Path, text: str, capsys, *args: str, command: str = "check") -> tuple[int, str, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    extra = ["-o", str(tmp_path / "run")] if command == "train" else []
    code = main([command, str(spec), "--no-color", *extra, *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return code, out, err


def where(text: str, line_has: str, at: str) -> str:
    """'spec.yaml:LINE:COL' of the first `at` on the first line containing `line_has` (1-based)."""
    for n, line in enumerate(text.splitlines(), start=1):
        if line_has in line:
            return f"spec.yaml:{n}:{line.index(at) + 1}"
    raise AssertionError(f"no line has {line_has!r}")


def edited(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# -- 1. a group's optimizer arguments take what the optimizer's own may ---------------------------

def test_a_groups_negative_lr_is_an_error_at_its_key_as_the_optimizers_is(tmp_path, capsys):
    text = edited(COUNTER, F_GROUP, '    - {params: "f*", clip: 1.0, lr: -1}')
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    assert f"{where(text, 'lr: -1', 'lr')}: error: groups: lr must be a number at least 0, got -1" in err, err
    text = edited(COUNTER, "optimizer: sgd(lr=0.5)", "optimizer: sgd(lr=-0.5)")
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    assert f"{where(text, 'sgd(lr=-0.5)', 'lr=')}: error: optimizer: lr must be a number at least 0, got -0.5" \
        in err, err


@pytest.mark.parametrize("group, key, message", [
    ("lr: true", "lr", "groups: 'lr' must be a number (or a list of numbers, e.g. betas), got true"),
    ("lr: .inf", "lr", "groups: lr must be a finite number, got inf"),
    ("nesterov: 1", "nesterov", "groups: nesterov must be true or false, got 1"),
])
def test_a_groups_argument_values_are_checked_like_the_optimizers(tmp_path, capsys, group, key, message):
    text = edited(COUNTER, F_GROUP, '    - {params: "f*", clip: 1.0, ' + group + '}')
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    line = where(text, group, key)
    if "must be a number (or" in message:  # a value of the wrong type: at the value, as before
        line = where(text, group, group.split(": ")[1])
    assert f"{line}: error: {message}" in err, err


def test_booleans_are_no_numbers_in_the_optimizers_arguments(tmp_path, capsys):
    text = edited(COUNTER, "optimizer: sgd(lr=0.5)", "optimizer: sgd(lr=0.5, momentum=true)")
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    assert f"{where(text, 'momentum=true', 'momentum')}: error: optimizer: momentum must be a finite number, " \
           f"got true" in err, err


def test_a_groups_values_torch_refuses_are_located_at_the_groups_key_and_write_nothing(tmp_path, capsys):
    """weight_decay: -5 is torch's to judge, as the optimizer's own weight_decay is (`specc check`
    passes both); torch checks only the optimizer's, so the group's goes through the same constructor
    when training starts, before anything is written."""
    text = edited(COUNTER, F_GROUP, '    - {params: "f*", clip: 1.0, weight_decay: -5}')
    assert run(tmp_path, text, capsys)[0] == 0
    code, _, err = run(tmp_path, text, capsys, "--set", "train.steps=2", command="train")
    assert code == 2
    assert f"{where(text, 'weight_decay: -5', 'weight_decay')}: error: groups: SGD: Invalid weight_decay value: -5" \
        in err, err
    assert not (tmp_path / "run").exists()
    top = edited(COUNTER, "optimizer: sgd(lr=0.5)", "optimizer: sgd(lr=0.5, weight_decay=-5)")
    code, _, err = run(tmp_path, top, capsys, "--set", "train.steps=2", command="train")
    assert code == 2 and "error: optimizer: SGD: Invalid weight_decay value: -5" in err, err


def test_groups_with_good_values_train_with_them(tmp_path, capsys):
    text = edited(COUNTER, F_GROUP, '    - {params: "f*", clip: 1.0, lr: 0.25, weight_decay: 0.001, nesterov: true, '
                                    'momentum: 0.5}')
    code, _, err = run(tmp_path, text, capsys, "--set", "train.steps=2", command="train")
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"], g["nesterov"], g["momentum"]) for g in groups] == \
        [(0.25, 0.001, True, 0.5), (0.5, 0, False, 0)]


# -- 2. a group that holds no parameter -------------------------------------------------------------

def test_a_group_whose_parameters_an_earlier_group_took_is_an_error_at_the_group(tmp_path, capsys):
    text = edited(COUNTER, '    - {params: "g*", clip: 1.0}', '    - {params: "g*", clip: 1.0}\n'
                                                              '    - {params: "f1*", lr: 0.1}')
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    first = where(text, '{params: "f*"', "{").split(":")[1]
    assert f"{where(text, 'f1*', '{')}: error: groups: the group holds no trainable parameter (each parameter " \
           f"belongs to the first group that matches it; frozen ones to none), so its lr would apply to nothing: " \
           f"the trainable ones it matches belong to the group on line {first}" in err, err
    # before the group that would take them, it holds them
    text = edited(COUNTER, F_GROUP, '    - {params: "f1*", lr: 0.1}\n' + F_GROUP)
    assert run(tmp_path, text, capsys)[0] == 0


def test_a_group_of_frozen_parameters_is_an_error(tmp_path, capsys):
    text = edited(COUNTER, "  steps: 600\n", "  steps: 600\n  freeze: [f1.weight]\n")
    text = edited(text, F_GROUP, '    - {params: "f1*", momentum: 0.9}\n    - {params: "f[23]*", clip: 1.0}')
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    assert f"{where(text, 'f1*', '{')}: error: groups: the group holds no trainable parameter" in err, err
    assert "so its momentum would apply to nothing: every parameter it matches is frozen" in err, err


def test_groups_of_lora_updates_hold_them(tmp_path, capsys):
    """With lora:, the trained parameters are the updates: a group may name them (and a group for the
    spec's own parameters, all frozen by lora:, stays harmless unless it clips)."""
    moons = (ROOT / "tests" / "data" / "train_moons.yaml").read_text()
    lora = edited(moons, "  clip: 1.0\n", "  clip: 1.0\n  lora:\n    layers: [linear, logits]\n    rank: 2\n")
    bias = '    - {params: "*.bias", weight_decay: 0.0}\n'
    text = edited(lora, bias, '    - {params: "*.lora_B", lr: 0.01}\n' + bias)
    code, _, err = run(tmp_path, text, capsys, "--set", "train.steps=2", command="train")
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt", weights_only=True)
    assert [len(g["params"]) for g in state["optimizer"]["param_groups"]] == [2, 2]  # the A's; the B's
    text = edited(lora, bias, '    - {params: "*.bias", clip: 1.0}\n')
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2 and "groups: clip: the group holds no trainable parameter" in err, err
    assert "every parameter it matches is frozen" in err


# -- 3. booleans are no numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, line_has, key, path", [
    (F_GROUP, '    - {params: "f*", clip: true}', "clip: true", "true", "train.groups.0.clip"),
    ("  steps: 600\n", "  steps: 600\n  clip: true\n", "  clip: true", "true", "train.clip"),
    ("  batch: 64\n", "  batch: true\n", "batch: true", "true", "train.batch"),
])
def test_booleans_are_refused_where_numbers_are_expected(tmp_path, capsys, old, new, line_has, key, path):
    text = edited(COUNTER, old, new)
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2
    assert f"{where(text, line_has, key)}: error: {path}: expected a number, got {key}" in err, err


def test_a_boolean_given_by_set_is_refused_too(tmp_path, capsys):
    code, _, err = run(tmp_path, COUNTER, capsys, "--set", "train.steps=true")
    assert code == 2 and "<--set>:1:13: error: train.steps: expected a number, got true" in err, err


# -- 4. a loss that is not finite before any update ---------------------------------------------------

DRAWN = """\
specc: 1
name: drawn
dims:
  B: 4
inputs:
  x: f32[B, 2]
  keep: f32[B, 6]
graph: |
  logits = linear(x, 2)
  seen = keep * 1.0
outputs:
  logits: f32[B, 2]
  seen: {type: "f32[B, 6]", training_only: true}
train:
  data: two_moons(n=64, rotation=0.0)
  split: 0.25
  random:
    keep: subset(2)
  loss: cross_entropy(logits, label) + sum(seen) / sum(seen)
  optimizer: sgd(lr=0.1)
  steps: 3
  batch: 8
  eval:
    every: 2
    metrics:
      kept: mean(seen) / mean(seen)
"""


def test_an_empty_subset_that_makes_the_loss_nan_is_blamed_and_writes_nothing(tmp_path, capsys):
    """Every key masked (subset(0)) gives 0 / 0 in the loss at once: not the learning rate's doing."""
    text = edited(DRAWN, "subset(2)", "subset(0)")
    code, _, err = run(tmp_path, text, capsys, command="train")
    assert code == 2
    assert f"{where(text, 'loss:', 'cross_entropy')}: error: loss: not finite (nan) at the initial weights, before " \
           f"any update" in err, err
    assert "random: (keep)" in err and "empty subset" in err and "learning rate" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_an_older_run_is_left_alone(tmp_path, capsys):
    assert run(tmp_path, DRAWN, capsys, command="train")[0] == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert run(tmp_path, edited(DRAWN, "subset(2)", "subset(0)"), capsys, command="train")[0] == 2
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == lines


def strict_lines(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN and Infinity, which JSON lacks, are refused."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_metrics_that_are_not_finite_are_written_as_null(tmp_path, capsys):
    """`kept` is 0 / 0 (NaN) and `big` 1 / 0 (inf) at every evaluation; the loss stays finite."""
    text = edited(DRAWN, "kept: mean(seen) / mean(seen)", "kept: mean(seen * 0) / mean(seen * 0)\n"
                                                          "      big: sum(seen) / mean(seen * 0)")
    code, _, err = run(tmp_path, text, capsys, command="train")
    assert code == 0, err
    lines = strict_lines(tmp_path / "run" / "metrics.jsonl")
    evals = [x for x in lines if x.get("split") == "val"]
    assert [x["step"] for x in evals] == [0, 2, 3]
    assert all(x["kept"] is None and x["big"] is None and isinstance(x["loss"], float) for x in evals), evals
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert summary["val"]["kept"] is None


FILE = """\
specc: 1
name: f
inputs:
  x: f32[B, 3]
graph: |
  y = linear(x, 2)
outputs:
  y: f32[B, 2]
train:
  data:
    file: d.npz
    ordered: true
    fields:
      x: f32[N, 3]
      label: i64[N] in range(2)
      w: f32[N]
  split: 0.5
  loss: cross_entropy(y, label) + mean(log(w))
  optimizer: sgd(lr=0.1)
  steps: 2
  batch: 4
  eval:
    every: 1
    metrics:
      acc: accuracy(y, label)
"""


def samples(tmp_path: Path, negative: slice) -> None:
    """40 samples, the first 20 for training and the last 20 for validation (ordered), whose `w` is -1
    (log(w) NaN) at the rows `negative` and 1 elsewhere."""
    rng = np.random.default_rng(0)
    w = np.ones(40, np.float32)
    w[negative] = -1.0
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 3)).astype(np.float32),
             label=rng.integers(0, 2, 40), w=w)


def test_a_loss_that_is_nan_only_on_the_validation_split_fails_at_the_step_0_evaluation(tmp_path, capsys):
    """The dry run sees one batch of each split; the evaluation at step 0 sees the whole validation
    split, whose last sample makes log() NaN: still before any update, so still nothing written."""
    samples(tmp_path, slice(39, 40))
    code, _, err = run(tmp_path, FILE, capsys, command="train")
    assert code == 2
    assert f"{where(FILE, 'loss:', 'cross_entropy')}: error: loss: not finite (nan) at the initial weights, before " \
           f"any update (on the validation split)" in err, err
    assert "random:" not in err and "learning rate" not in err
    assert not (tmp_path / "run").exists()
    code, _, err = run(tmp_path, FILE[:FILE.index("  eval:")], capsys, command="train")
    assert code == 0, err  # without an evaluation, the training split's losses are all finite


def test_a_loss_that_is_not_finite_at_the_first_training_step_is_blamed_on_the_initial_weights(tmp_path, capsys):
    """The dry run takes the first rows of the training split (finite here), the first step a batch of
    the seeded order (rows beyond them): its loss is checked before the update, before the folder is made."""
    samples(tmp_path, slice(4, 20))
    code, _, err = run(tmp_path, FILE, capsys, command="train")
    assert code == 2
    assert f"{where(FILE, 'loss:', 'cross_entropy')}: error: loss: not finite (nan) at the initial weights, " \
           f"before any update (on the first training batch)" in err, err
    assert "learning rate" not in err and "random:" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_loss_that_becomes_nan_later_still_blames_the_learning_rate(tmp_path, capsys):
    """A finite first loss, then an update of lr 1e30: the squares of the next logits overflow."""
    text = edited(DRAWN, "sum(seen) / sum(seen)", "mean(logits * logits)")
    text = edited(text, "sgd(lr=0.1)", "sgd(lr=1e30)")
    code, _, err = run(tmp_path, text, capsys, command="train")
    assert code == 2
    assert "error: loss: became inf at step 2 (lower the learning rate, or clip gradients)" in err, err
    lines = strict_lines(tmp_path / "run" / "metrics.jsonl")
    assert [(x["step"], x.get("split")) for x in lines] == [(0, "val"), (1, None)]  # up to the last good step


# -- 5. draw arguments ----------------------------------------------------------------------------------

def position(tmp_path, capsys, draw: str) -> tuple[int, str, str]:
    text = edited(POSITION, "keep: subset(ratio=0.25)", f"keep: {draw}")
    return run(tmp_path, text, capsys)


def draw_at(draw: str, at: str) -> str:
    text = edited(POSITION, "keep: subset(ratio=0.25)", f"keep: {draw}")
    return where(text, f"keep: {draw}", at)


def test_inf_is_a_name_in_draw_arguments(tmp_path, capsys):
    code, out, err = position(tmp_path, capsys, "subset(min(4, inf))")
    assert code == 0 and "keep = subset(min(4, inf)) each step" in out, err
    code, _, err = position(tmp_path, capsys, "bernoulli(1 / inf)")
    assert code == 0, err
    code, _, err = position(tmp_path, capsys, "subset(inf)")
    assert code == 2 and "unknown name" not in err, err
    assert f"{draw_at('subset(inf)', 'subset')}: error: random 'keep': subset: k must be a finite number, got inf" \
        in err, err


def test_inf_in_a_uniform_bound_is_a_clear_error(tmp_path, capsys):
    text = edited(DRAWN, "keep: subset(2)", "keep: uniform(-inf, 0)")
    code, _, err = run(tmp_path, text, capsys)
    assert code == 2 and "unknown name" not in err, err
    assert f"{where(text, 'uniform(-inf', 'uniform')}: error: random 'keep': uniform: lo must be a finite number, " \
           f"got -inf" in err, err
    code, _, err = run(tmp_path, edited(DRAWN, "keep: subset(2)", "keep: uniform(max(-inf, -1), 1)"), capsys)
    assert code == 0, err


def test_a_division_by_zero_in_a_draw_argument_is_located_and_clear(tmp_path, capsys):
    code, _, err = position(tmp_path, capsys, "bernoulli(0.0/0.0)")
    assert code == 2
    assert f"{draw_at('bernoulli(0.0/0.0)', '0.0/')}: error: random 'keep': division by zero: 0.0 / 0.0" in err, err
    assert "float division" not in err


def test_huge_numbers_are_written_briefly(tmp_path, capsys):
    code, _, err = position(tmp_path, capsys, "subset(1e300)")
    assert code == 2
    assert f"{draw_at('subset(1e300)', 'subset')}: error: random 'keep': k=1e+300 is larger than the last axis " \
           f"(16 entries)" in err, err
    assert max(map(len, err.splitlines())) < 200, err
    code, _, err = position(tmp_path, capsys, "subset(10 ** 400)")
    assert code == 2 and "subset: k must be a finite number, got a number of 401 digits" in err, err


def test_draw_errors_at_the_last_step_name_the_step(tmp_path, capsys):
    """Both kinds of problem at the last step (399 of 400 steps) say so."""
    code, _, err = position(tmp_path, capsys, "subset(16 - step)")
    assert code == 2
    assert f"{draw_at('subset(16 - step)', 'subset')}: error: random 'keep': subset: k must be a whole number at " \
           f"least 0, got -383 at step 399" in err, err
    code, _, err = position(tmp_path, capsys, "subset(step)")
    assert code == 2
    assert f"{draw_at('subset(step)', 'subset')}: error: random 'keep': k=399 is larger than the last axis " \
           f"(16 entries) at step 399" in err, err
