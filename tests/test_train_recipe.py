"""The `train:` section under `specc check`: a good recipe is summarised; every bad part of one is a
located error (FILE:LINE:COL with the line and a caret), all of them at once, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from specc.cli import main

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "tests" / "data" / "train_moons.yaml"

HEAD = """\
specc: 1
name: m
params:
  hidden: 8
inputs:
  x: f32[B, 2]
  lam: f32[]
graph: |
  h = relu(linear(x, hidden))
  logits = linear(h * lam, 2)
outputs:
  logits: f32[B, 2]
train:
"""


def check(tmp_path: Path, train: str, capsys, *sets: str) -> tuple[int, str, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(HEAD + train)
    args = ["check", str(spec), "--no-color"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


GOOD = """\
  data: two_moons(n=64)
  feed: {lam: strength}
  scalars:
    strength: 2 / (1 + exp(-10 * progress)) - 1
  loss: cross_entropy(logits, label, mask=domain_label == 0)
  optimizer: sgd(lr=0.1, momentum=0.9)
  schedule: inverse_decay(alpha=10, beta=0.75)
  steps: 10
  batch: 8
  eval:
    every: 5
    metrics:
      acc: accuracy(logits, label)
"""


def test_a_good_recipe_is_summarised(tmp_path, capsys):
    code, out, err = check(tmp_path, GOOD, capsys)
    assert code == 0, err
    assert "train       two_moons (x, label, domain_label), SGD, 10 steps of batch 8" in out


def test_the_shipped_test_recipe_checks(capsys):
    assert main(["check", str(MOONS), "--no-color"]) == 0
    assert "AdamW, 40 steps of batch 32" in capsys.readouterr().out


def _at(err: str, line: int, col: int, text: str) -> None:
    assert f"spec.yaml:{line}:{col}: error: " in err and text in err, err
    head = next(ln for ln in err.splitlines() if f"spec.yaml:{line}:{col}: error: " in ln)
    assert text in head, (head, text)


@pytest.mark.parametrize("bad, line, col, message", [
    ("optimizer: sgd(lr=0.1, momentum=0.9)", 19, 14, "unknown optimizer 'adamx' (did you mean 'adamax'?)"),
    ("optimizer: sgd(lr=0.1, momentum=0.9)", 19, 14, "LBFGS needs a closure"),
    ("loss: cross_entropy(logits, label, mask=domain_label == 0)", 18, 23, "loss: unknown name 'logitz' (did you "
                                                                           "mean 'logits'?)"),
    ("schedule: inverse_decay(alpha=10, beta=0.75)", 20, 13, "no argument 'gamma'"),
    ("data: two_moons(n=64)", 14, 9, "unknown data set 'two_moon' (did you mean 'two_moons'?)"),
])
def test_each_bad_part_is_located(tmp_path, capsys, bad, line, col, message):
    replacement = {
        "optimizer": "optimizer: lbfgs(lr=0.1)" if "LBFGS" in message else "optimizer: adamx(lr=0.1)",
        "loss": "loss: cross_entropy(logitz, label)",
        "schedule": "schedule: step_decay(gamma=0.5)",
        "data": "data: two_moon(n=64)",
    }[bad.split(":")[0]]
    code, _, err = check(tmp_path, GOOD.replace(bad, replacement), capsys)
    assert code == 2
    if bad.startswith("schedule"):
        message = "step_decay() has no argument 'gamma'" if "gamma" not in replacement else \
            "step_decay() is missing the argument 'every'"
    _at(err, line, col, message)


def test_every_problem_at_once(tmp_path, capsys):
    bad = GOOD.replace("two_moons(n=64)", "two_moons(n=64, rotation=\"left\")") \
        .replace("cross_entropy(logits, label, mask=domain_label == 0)", "mse(logits, labels) + huber(logits)") \
        .replace("sgd(lr=0.1, momentum=0.9)", "sgd(lr=0.1, momentun=0.9)") \
        .replace("inverse_decay(alpha=10, beta=0.75)", "warmup_cosine(warmup=5, min=2)") \
        .replace("accuracy(logits, label)", "accuracy(logits, label, k=3)")
    code, _, err = check(tmp_path, bad, capsys)
    assert code == 2
    _at(err, 14, 25, "two_moons(): 'rotation' must be a number, got 'left'")
    # the data set failed, so its field names are not reported as unknown; the functions still are
    _at(err, 18, 31, "loss: unknown function 'huber'")
    _at(err, 19, 26, "SGD has no argument 'momentun' (did you mean 'momentum'?)")
    _at(err, 20, 13, "schedule: warmup_cosine: needs warmup >= 0 and 0 <= min <= 1")
    _at(err, 26, 36, "accuracy() has no argument 'k'")
    assert err.rstrip().endswith("5 errors")


def test_unknown_fields_feeds_and_patterns(tmp_path, capsys):
    bad = GOOD.replace("feed: {lam: strength}", "feed: {lam: strenght, y: x}") \
        .replace("mask=domain_label == 0", "mask=domain == 0") + "  freeze: [logit.*]\n" \
        "  groups:\n    - {params: 'h.*', weight_decay: 0.0, betaz: 1}\n"
    code, _, err = check(tmp_path, bad, capsys)
    assert code == 2
    _at(err, 15, 15, "the model input 'lam' is fed by no data field (no field 'strenght') (did you mean 'strength'?)")
    _at(err, 15, 25, "feed: 'y' is not an input of the model")
    _at(err, 18, 43, "loss: unknown name 'domain' (did you mean 'domain_label'?)")
    _at(err, 27, 12, "freeze: 'logit.*' matches no parameter")
    _at(err, 29, 16, "groups: 'h.*' matches no parameter")
    _at(err, 29, 42, "groups: SGD has no argument 'betaz'")


def test_yaml_layer_errors(tmp_path, capsys):
    code, _, err = check(tmp_path, GOOD.replace("steps: 10", "stepz: 10").replace("batch: 8", "batch: 0"), capsys)
    assert code == 2
    _at(err, 21, 3, "unknown key 'stepz' in 'train' (did you mean 'steps'?)")
    _at(err, 22, 10, "train.batch: must be greater than 0, got 0")


def test_steps_or_epochs_and_input_types(tmp_path, capsys):
    code, _, err = check(tmp_path, GOOD.replace("  steps: 10\n", "").replace("feed: {lam: strength}",
                                                                             "feed: {lam: strength, x: label}"), capsys)
    assert code == 2
    assert "train: give steps or epochs" in err
    _at(err, 15, 28, "the input 'x' is f32[B, 2] but the field 'label' holds i64")


def test_set_overrides_the_recipe_and_is_located(tmp_path, capsys):
    code, _, err = check(tmp_path, GOOD, capsys, "train.optimizer=adam(lr=0.1, beta=1)", "train.steps=-1")
    assert code == 2
    assert "<--set>:2:13: error: train.steps: must be greater than 0, got -1" in err
    code, _, err = check(tmp_path, GOOD, capsys, "train.optimizer=adam(lr=0.1, beta=1)")
    assert code == 2
    assert "<--set>:1:30: error: optimizer: Adam has no argument 'beta' (did you mean 'betas'?)" in err
    code, out, err = check(tmp_path, GOOD, capsys, "train.steps=7", "hidden=4")
    assert code == 0 and "7 steps of batch 8" in out, err


def test_bad_optimizer_values_are_reported_by_torch_but_located(tmp_path, capsys):
    from specc.dsl.diagnostics import SpecError
    from specc.train import train

    code, _, err = check(tmp_path, GOOD.replace("sgd(lr=0.1, momentum=0.9)", "adam(lr=0.1, betas=[0.9, 1.5])"),
                         capsys)
    assert code == 0, err  # names and arguments are right; the values are torch's to judge, when training starts
    with pytest.raises(SpecError) as e:
        train(tmp_path / "spec.yaml", tmp_path / "run")
    d = e.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (19, 14)
    assert d.message == "optimizer: Adam: Invalid beta parameter at index 1: 1.5"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_optimizer_table_is_torch_optims():
    from specc.train.optim import OPTIMIZERS
    from specc.train.recipe import optimizer_arguments, optimizers

    assert {k: (cls.__name__, tuple(sorted(optimizer_arguments(cls)))) for k, cls in optimizers().items()} == \
        OPTIMIZERS


def test_checking_a_recipe_does_not_load_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from specc.cli import main; rc = main(['check', sys.argv[1]]); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code, str(MOONS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_spec_with_graph_errors_and_recipe_yaml_errors_reports_both(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(HEAD.replace("linear(h * lam, 2)", "linear(h * lam, 2, bais=true)") +
                    GOOD.replace("batch: 8", "batch: -8"))
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml:22:10: error: train.batch: must be greater than 0" in err
    assert "bais" in err


def test_a_field_longer_than_a_dimension_allows_is_located(capsys):
    gpt = ROOT / "specs" / "gpt.yaml"
    assert main(["check", str(gpt), "--no-color", "--set", "train.data=arithmetic(digits=30, n=100)"]) == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(gpt.read_text().splitlines(), 1) if text.startswith("  feed:"))
    assert f"gpt.yaml:{line}:15: error: the input 'idx' is i64[B, T] in range(65) with T in [1, 64], but the " \
           f"field 'tokens' has 93 on that axis" in err


@pytest.mark.parametrize("bad, col, message", [
    ("data: seasonal(n=1000000, lookback=100000)", 9, "seasonal(): the data would hold"),
    ("data: automata(length=10 ** 10)", 18, "automata(): 'length' is too large"),
    ("data: seasonal(periods=[" + "1, " * 100 + "2])", 18, "at most 64 values in 'periods'"),
    ("data: two_moons(n=10 ** 10 ** 10)", 21, "the power is too large"),
    ("data: two_moons(n=\"a\" * 100000000)", 21, "'*' needs numbers or tensors, got a string"),
])
def test_hostile_recipe_values_are_refused_quickly(tmp_path, capsys, bad, col, message):
    import time

    began = time.perf_counter()
    code, _, err = check(tmp_path, GOOD.replace("data: two_moons(n=64)", bad), capsys)
    assert code == 2 and time.perf_counter() - began < 5
    _at(err, 14, col, message)


def test_check_json_describes_the_recipe(capsys):
    import json

    assert main(["check", str(MOONS), "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)["train"]
    assert recipe == {"data": "two_moons", "fields": {"x": {"dtype": "f32", "shape": ["N", 2], "range": None},
                                                      "label": {"dtype": "i64", "shape": ["N"], "range": [0, 2]},
                                                      "domain_label": {"dtype": "i64", "shape": ["N"],
                                                                       "range": [0, 2]}},
                      "feed": {"x": "x"}, "random": {}, "optimizer": "AdamW", "steps": 40, "epochs": None,
                      "batch": 32, "metrics": ["acc"], "lora": [], "adapters": [], "prefix": []}


def test_check_describes_the_inputs_the_recipe_draws(capsys):
    import json

    spec = ROOT / "specs" / "position_prediction.yaml"
    assert main(["check", str(spec)]) == 0
    assert "; keep = subset(ratio=0.25) each step" in capsys.readouterr().out
    assert main(["check", str(spec), "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)["train"]
    assert recipe["feed"] == {"x": "x"} and recipe["random"] == {"keep": "subset(ratio=0.25)"}


@pytest.mark.parametrize("spec, loss, message", [
    ("itransformer", "mse(y, x)", "loss: mse: shapes [B, 24, 7] and [B, 96, 7] do not broadcast"),
    ("sla", "cross_entropy(joint, label)", "loss: cross_entropy: class targets [B] must have the logits' shape "
                                           "without the class axis, [4 * B]"),
    ("lsa_icl", "kl(tokens, e[:, :1])", "loss: kl: logits [B, 17, 5] and target_logits [B, 1, 5] differ"),
    ("gpt", "cross_entropy(logits, targets, mask=mask)", None),  # T is bound by the fed field (12)
])
def test_shapes_of_losses_on_outputs_and_fields_are_checked(capsys, spec, loss, message):
    code = main(["check", str(ROOT / "specs" / f"{spec}.yaml"), "--no-color", "--set", f"train.loss={loss}"])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
    else:
        assert code == 2 and f"<--set>:1:12: error: {message}" in err, err


def test_group_values_are_numbers(tmp_path, capsys):
    code, _, err = check(tmp_path, GOOD + "  groups:\n    - {params: 'linear.*', weight_decay: heavy, momentum: [0.9]}\n",
                         capsys)
    assert code == 2
    _at(err, 28, 42, "groups: 'weight_decay' must be a number (or a list of numbers, e.g. betas), got 'heavy'")


def test_the_python_api_checks_the_recipe_too(tmp_path):
    import specc
    from specc.dsl.diagnostics import SpecError

    good = tmp_path / "good.yaml"
    good.write_text(HEAD + GOOD)
    assert specc.check(good).params > 0
    bad = tmp_path / "spec.yaml"
    bad.write_text(HEAD + GOOD.replace("optimizer: sgd(lr=0.1, momentum=0.9)", "optimizer: adamx(lr=0.1)"))
    with pytest.raises(SpecError, match="unknown optimizer 'adamx'"):
        specc.check(bad)
