"""`specc train` runs: metrics, checkpoints and the built model; a resumed run equals the run never
stopped, step for step; an interrupted checkpoint write leaves no checkpoint; schedules, groups,
frozen parameters and epochs do what the recipe says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specc
from specc.backends.pytorch.build import import_model_module
from specc.dsl.diagnostics import SpecError
from specc.train import prepare, train
from specc.train import loop as L

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "tests" / "data" / "train_moons.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def lines(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_metrics_checkpoints_and_the_built_model(tmp_path):
    run = tmp_path / "run"
    result = train(MOONS, run)
    log = lines(run)
    steps = [x for x in log if "split" not in x]
    evals = [x for x in log if x.get("split") == "val"]
    assert [x["step"] for x in steps] == list(range(1, 41))
    assert [x["step"] for x in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["acc"] > 0.8 and evals[-1]["loss"] < evals[0]["loss"] / 2
    assert result.metrics == {k: v for k, v in evals[-1].items() if k not in ("step", "split")}
    # the schedule: warm-up over 5 steps, then cosine to 0.1 of the base rate
    assert steps[0]["lr"] == pytest.approx(0.05 / 5) and steps[4]["lr"] == pytest.approx(0.05)
    assert steps[-1]["lr"] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 34 / 35))))
    assert [d.name for d in L.checkpoint_dirs(run)] == ["step-0000020", "step-0000030", "step-0000040"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["val"]["acc"] == evals[-1]["acc"]

    # RUN/model is a specc build of the trained weights: it computes what the last checkpoint does
    weights = load_file(str(run / "checkpoints" / "step-0000040" / "model.safetensors"))
    reference = specc.load(MOONS, opt_level=0, weights=weights).double()
    built = import_model_module(run / "model").load(run / "model")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(built(x).double(), reference(x.double()), atol=1e-5, rtol=1e-5)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["opt_level"] == 1 and manifest["name"] == "moons"


def test_resume_continues_exactly(tmp_path):
    full = tmp_path / "full"
    train(MOONS, full)
    part = tmp_path / "part"
    stopped = train(MOONS, part, until=25)  # stops after step 25 with a checkpoint there
    assert stopped.stopped and stopped.steps == 25 and not (part / "model").exists()
    assert L.checkpoint_dirs(part)[-1].name == "step-0000025"
    train(MOONS, part, resume=part)
    # same loss at every step (dropout is on: the RNG state is restored too), same evaluations
    assert lines(part) == [{**x} for x in lines(full)]
    a = load_file(str(full / "model" / "weights.safetensors"))
    b = load_file(str(part / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_checkpoint_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    calls = []

    def interrupted(obj, path, *args, **kwargs):  # Ctrl-C while the second checkpoint is written
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(L.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(MOONS, run)
    monkeypatch.setattr(L.torch, "save", real_save)
    assert [d.name for d in L.checkpoint_dirs(run)] == ["step-0000010"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000010"]  # no temporary left
    train(MOONS, run, resume=run)
    full = tmp_path / "full"
    train(MOONS, full)
    assert lines(run) == lines(full)


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="--resume: the run has no complete checkpoint"):
        train(MOONS, tmp_path / "run", resume=tmp_path / "empty")


FROZEN = MOONS.read_text().replace("  clip: 1.0\n", "  clip: 1.0\n  freeze: [linear.*]\n")


def test_frozen_parameters_do_not_change_and_groups_take_their_settings(tmp_path):
    spec = tmp_path / "frozen.yaml"
    spec.write_text(FROZEN)
    src, graph, recipe = prepare(spec)
    model = L.build_model(src, graph, recipe)
    opt = L.make_optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    assert groups == [["logits.weight"], ["logits.bias"]]  # linear.* frozen; biases in their own group
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    train(spec, tmp_path / "run")
    before = specc.load(spec, opt_level=0).state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000040" / "model.safetensors"))
    assert torch.equal(before["linear.weight"], after["linear.weight"])
    assert torch.equal(before["linear.bias"], after["linear.bias"])
    assert not torch.equal(before["logits.weight"], after["logits.weight"])


def test_schedules_and_scalars_match_their_formulas(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(MOONS.read_text().replace("warmup_cosine(warmup=5, min=0.1)",
                                              "inverse_decay(alpha=10, beta=0.75) * step_decay(every=7, gamma=0.5)")
                    .replace("  clip: 1.0\n", "  clip: 1.0\n  scalars:\n    lam: 2 / (1 + exp(-10 * progress)) - 1\n"
                                              "    twice: 2 * lam\n"))
    src, graph, recipe = prepare(spec)
    stepper = L.Stepper(L.build_model(src, graph, recipe), graph, recipe, 40)
    for step in range(40):
        p = step / 40
        assert stepper.lr_factor(step) == pytest.approx((1 + 10 * p) ** -0.75 * 0.5 ** (step // 7), rel=1e-12)
        lam = 2 / (1 + math.exp(-10 * p)) - 1
        assert stepper.scalars(step) == pytest.approx({"lam": lam, "twice": 2 * lam}, rel=1e-12)


def test_epochs_count_steps_and_a_bad_loss_shape_is_located(tmp_path):
    spec = tmp_path / "e.yaml"
    spec.write_text(MOONS.read_text().replace("steps: 40", "epochs: 2"))
    result = train(spec, tmp_path / "run", train={"checkpoint.every": 100})
    assert result.steps == 2 * (384 // 32)
    bad = tmp_path / "bad.yaml"
    # x[label] (a tensor index) is not followed by the check: the shapes fail only in the dry run
    bad.write_text(MOONS.read_text().replace("loss: cross_entropy(logits, label) + 0.01 * mean(logits * logits)",
                                             "loss: cross_entropy(logits, label) + mse(logits, x[label][:, :1] * label)"))
    with pytest.raises(SpecError) as e:
        train(bad, tmp_path / "bad")
    d = e.value.diagnostics[0]
    assert (d.span.line, d.span.col) == (20, 40)  # at the call that failed
    assert d.message.startswith("mse: ") and "size of tensor" in d.message
    assert not (tmp_path / "bad").exists()  # checked on two samples before anything is written


def test_the_cli_trains_and_refuses_a_spec_without_recipe(tmp_path):
    env = dict(os.environ, NO_COLOR="1")
    r = subprocess.run([sys.executable, "-m", "specc.cli", "train", str(MOONS), "-o", str(tmp_path / "run"),
                        "--set", "train.steps=12", "--set", "hidden=8", "--threads", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "trained moons: 12 steps" in r.stdout and "val loss" in r.stdout
    assert json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())["params"]["hidden"] == 8
    r = subprocess.run([sys.executable, "-m", "specc.cli", "train", str(ROOT / "specs" / "lstm_classifier.yaml"),
                        "-o", str(tmp_path / "lstm")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "the spec has no train: section" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_leaves_complete_checkpoints_and_the_run_resumes(tmp_path):
    """A real SIGINT to `specc train`: exit 130, every checkpoint on disk is complete, resume finishes."""
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "specc.cli", "train", str(MOONS), "-o", str(run), "--quiet", "--threads", "1",
           "--set", "train.steps=100000", "--set", "train.checkpoint.every=20", "--set", "train.eval.every=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, NO_COLOR="1"))
    try:
        deadline = time.monotonic() + 120
        while len(L.checkpoint_dirs(run)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    dirs = L.checkpoint_dirs(run)
    assert dirs and sorted(d.name for d in (run / "checkpoints").iterdir()) == [d.name for d in dirs]
    for d in dirs:  # each one loads
        assert load_file(str(d / "model.safetensors")).keys() == {"linear.weight", "linear.bias", "logits.weight",
                                                                   "logits.bias"}
        assert torch.load(d / "state.pt", weights_only=True)["step"] == int(d.name[5:])
    last = int(dirs[-1].name[5:])
    result = train(MOONS, run, resume=run, train={"steps": last + 5, "checkpoint.every": 20, "eval.every": 100000})
    assert result.steps == last + 5


def test_a_new_run_in_an_old_run_folder_starts_afresh(tmp_path):
    run = tmp_path / "run"
    train(MOONS, run)
    train(MOONS, run, train={"steps": 15, "checkpoint.every": 5}, force=True)  # test_train_rundir.py: the rules
    assert [d.name for d in L.checkpoint_dirs(run)] == ["step-0000005", "step-0000010", "step-0000015"]
    assert max(x["step"] for x in lines(run)) == 15
    other = tmp_path / "other"  # resumed into another folder: the history up to the checkpoint comes along
    train(MOONS, other, resume=run, train={"steps": 20, "checkpoint.every": 5})
    assert [x["step"] for x in lines(other) if "split" not in x] == list(range(1, 21))


def test_a_device_that_is_not_there_is_a_user_error(tmp_path, capsys):
    from specc.cli import main

    for device, message in (("meta", "expected cpu, cuda, cuda:N or mps"), ("bogus", "--device bogus: ")):
        assert main(["train", str(MOONS), "-o", str(tmp_path / "run"), "--device", device, "--quiet"]) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(MOONS), "-o", str(tmp_path / "run"), "--device", "cuda", "--quiet"]) == 2
        assert "--device cuda: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gradient_clipping_bounds_the_step(tmp_path):
    spec = tmp_path / "clip.yaml"
    spec.write_text(MOONS.read_text().replace("adamw(lr=0.05, weight_decay=0.01)", "sgd(lr=1.0)")
                    .replace("  schedule: warmup_cosine(warmup=5, min=0.1)\n", "")
                    .replace("  groups:\n    - {params: \"*.bias\", weight_decay: 0.0}\n", "")
                    .replace("clip: 1.0", "clip: 0.001"))
    train(spec, tmp_path / "run", dropout=0.0, train={"steps": 1, "checkpoint.every": 1})
    before = specc.load(spec, opt_level=0).state_dict()
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000001" / "model.safetensors"))
    step = torch.cat([(after[k].double() - before[k].double()).flatten() for k in after])
    assert step.norm().item() == pytest.approx(0.001, rel=1e-4)  # SGD with lr 1: the clipped gradient itself


def test_a_train_override_on_a_spec_without_recipe_is_one_error(capsys):
    """--set train.KEY=v on a spec with no train: section is that error alone, at the override (not a
    second, empty-keyed 'expected a mapping, got a mapping' at the top of the spec)."""
    from specc.cli import main

    code = main(["check", str(ROOT / "specs" / "lstm_classifier.yaml"), "--set", "train.steps=5", "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "--set steps: the spec has no train: section" in err and "1 error" in err, err
    assert "expected a mapping" not in err


def test_switching_steps_for_epochs_from_the_command_line(capsys):
    """train.epochs=N over a spec's steps: is the 'not both' error, with the way over (train.steps=null),
    which then checks."""
    from specc.cli import main

    assert main(["check", str(MOONS), "--set", "train.epochs=1", "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "train: give steps or epochs, not both" in err and "--set train.steps=null" in err, err
    assert main(["check", str(MOONS), "--set", "train.epochs=1", "--set", "train.steps=null"]) == 0
    assert "1 epochs of batch 32" in capsys.readouterr().out
