"""`random:` in a recipe: model inputs fed by a draw made afresh each step. The draws fill the input's
dtype and shape (subset: exactly k true per row), change from step to step, depend only on the seed,
the input and the step (a resumed run draws exactly what the run never stopped drew; a process of a
distributed run takes its rows of the global batch's draw), evaluation uses the same draws at every
step, the model and the loss see the same values, and every misuse is a located error at check time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from specc.dsl.diagnostics import SpecError
from specc.train import prepare, train
from specc.train import loop as L

SPEC = """\
specc: 1
name: drawn
params:
  hidden: 8
dims:
  B: 4
inputs:
  x: f32[B, 2]
  keep: bool[B, 6]
  noise: f32[B, 2]
  u: f32[B, 3]
graph: |
  h = relu(linear(x + noise, hidden))
  logits = linear(h, 2)
  seen = cast(keep, f32)
  spread = u * 1.0
outputs:
  logits: f32[B, 2]
  seen: {type: "f32[B, 6]", training_only: true}
  spread: {type: "f32[B, 3]", training_only: true}
train:
  data: two_moons(n=256, rotation=0.0)
  split: 0.25
  seed: 5
  random:
    keep: subset(2)
    noise: normal(0, 0.01)
    u: uniform(-1, 1)
  loss: cross_entropy(logits, label) + 0.001 * mean(seen * spread[:, :1])
  optimizer: adamw(lr=0.02)
  steps: 10
  batch: 8
  eval:
    every: 5
    metrics:
      kept: mean(keep)
      same: mean(seen == keep)
  checkpoint: {every: 5}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def stepper(text=SPEC, steps=10):
    src, graph, recipe = prepare(text)
    return L.Stepper(L.build_model(src, graph, recipe), graph, recipe, steps)


def test_draws_take_the_inputs_dtype_and_shape():
    s = stepper()
    d = s.draws(0, {}, 4000)
    assert d["keep"].dtype == torch.bool and d["keep"].shape == (4000, 6)
    assert d["noise"].dtype == torch.float32 and d["noise"].shape == (4000, 2)
    assert d["u"].dtype == torch.float32 and d["u"].shape == (4000, 3)
    assert torch.equal(d["keep"].sum(-1), torch.full((4000,), 2))  # exactly k true in every row
    counts = d["keep"].sum(0).double()  # every position chosen about equally often: 4000 * 2 / 6 each
    assert (counts - 4000 / 3).abs().max() < 5 * math.sqrt(4000 * (1 / 3) * (2 / 3))
    u = d["u"].double()
    assert u.min() >= -1 and u.max() < 1 and abs(u.mean()) < 5 * (2 / math.sqrt(12)) / math.sqrt(u.numel())
    noise = d["noise"].double()
    assert abs(noise.mean()) < 5 * 0.01 / math.sqrt(noise.numel())
    assert abs(noise.std() / 0.01 - 1) < 0.05
    # bernoulli, and bool draws into float inputs (1.0 / 0.0)
    b = stepper(SPEC.replace("keep: subset(2)", "keep: bernoulli(0.25)")
                .replace("u: uniform(-1, 1)", "u: subset(ratio=0.5)")).draws(3, {}, 4000)
    assert abs(b["keep"].double().mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / b["keep"].numel())
    assert b["u"].dtype == torch.float32 and set(b["u"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(b["u"].sum(-1), torch.full((4000,), 2.0))  # 0.5 * 3 rounded half up


def test_draws_change_every_step_and_depend_on_seed_input_and_step_alone():
    s = stepper()
    keeps = [s.draws(step, {}, 8)["keep"] for step in range(10)]
    assert all(not torch.equal(a, b) for i, a in enumerate(keeps) for b in keeps[i + 1:])
    again = stepper()  # a new process: the same draws
    assert all(torch.equal(again.draws(step, {}, 8)["keep"], keeps[step]) for step in range(10))
    # another draw of another input changes nothing; another seed changes everything
    alone = stepper(SPEC.replace("noise: normal(0, 0.01)", "noise: uniform(0, 0.01)"))
    assert torch.equal(alone.draws(7, {}, 8)["keep"], keeps[7])
    other = stepper(SPEC.replace("seed: 5", "seed: 6"))
    assert not torch.equal(other.draws(7, {}, 8)["keep"], keeps[7])
    # a process of a two-process run takes its rows of the global batch's draw
    full = s.draws(4, {}, 8)
    for rank in (0, 1):
        part = s.draws(4, {}, 8, rows=slice(rank * 4, rank * 4 + 4))
        assert all(torch.equal(part[k], full[k][rank * 4:rank * 4 + 4]) for k in full)
    # evaluation: the same draws at every step, not those of training
    assert torch.equal(s.draws(0, {}, 64, fixed=True)["keep"], s.draws(9, {}, 64, fixed=True)["keep"])
    assert not torch.equal(s.draws(0, {}, 8, fixed=True)["keep"], keeps[0])


def test_a_scheduled_argument_is_evaluated_at_each_step():
    s = stepper(SPEC.replace("keep: subset(2)", "keep: subset(ratio=progress)"))
    for step in range(10):
        assert s.draws(step, {}, 5)["keep"].sum(-1).tolist() == [math.floor(step / 10 * 6 + 0.5)] * 5
    scaled = SPEC.replace("keep: subset(2)", "keep: subset(k)").replace("train:\n", "train:\n  scalars:\n"
                                                                          "    k: 1 + step // 4\n")
    s = stepper(scaled)
    assert [int(s.draws(step, s.scalars(step), 1)["keep"].sum()) for step in range(10)] == \
        [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_a_resumed_run_draws_what_the_uninterrupted_one_drew(tmp_path, monkeypatch):
    seen: list[tuple[str, int, dict]] = []
    original = L.Stepper.draws
    label = {"run": ""}

    def record(self, step, scalars, n, rows=slice(None), fixed=False):
        out = original(self, step, scalars, n, rows, fixed)
        if not fixed:
            seen.append((label["run"], step, {k: v.clone() for k, v in out.items()}))
        return out

    monkeypatch.setattr(L.Stepper, "draws", record)
    label["run"] = "full"
    train(SPEC, tmp_path / "full")
    label["run"] = "part"
    assert train(SPEC, tmp_path / "part", until=5).stopped
    label["run"] = "resumed"
    train(SPEC, tmp_path / "part", resume=tmp_path / "part")
    by = {}
    for run, step, d in seen:
        by.setdefault(run, {})[step] = d
    assert sorted(by["full"]) == list(range(10)) and sorted(by["part"]) == list(range(5))
    assert sorted(by["resumed"]) == list(range(5, 10))
    for step in range(10):
        got = (by["part"] if step < 5 else by["resumed"])[step]
        assert all(torch.equal(got[k], by["full"][step][k]) for k in ("keep", "noise", "u")), step
    assert all(not torch.equal(by["full"][i]["keep"], by["full"][i + 1]["keep"]) for i in range(9))
    # the losses of every step and the evaluations are those of the uninterrupted run
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == full
    evals = [r for r in map(json.loads, full.splitlines()) if r.get("split") == "val"]
    # the model and the metrics see the same draw: `keep` in a metric is the drawn input, 2 of 6
    assert [r["same"] for r in evals] == [1.0, 1.0, 1.0]
    assert all(abs(r["kept"] - 1 / 3) < 1e-6 for r in evals)


def error_of(text):
    with pytest.raises(SpecError) as e:
        prepare(text)
    return [(d.span.line, d.span.col, d.message) for d in e.value.diagnostics]


@pytest.mark.parametrize("old, new, line, col, message", [
    ("keep: subset(2)", "keep: uniform(0, 1)", 26, 11,
     "random 'keep': the input is bool[B, 6], and uniform() draws float values (bool inputs take subset or "
     "bernoulli)"),
    ("keep: subset(2)", "keep: subset(7)", 26, 11, "random 'keep': k=7 is larger than the last axis (6 entries)"),
    ("keep: subset(2)", "keep: subset(ratio=1.5)", 26, 11, "random 'keep': subset: ratio must be in [0, 1], got 1.5"),
    ("keep: subset(2)", "keep: subset(2.5)", 26, 11, "random 'keep': subset: k must be a whole number at least 0, "
                                                     "got 2.5"),
    ("keep: subset(2)", "keep: subset(k=2, ratio=0.5)", 26, 11,
     "random 'keep': subset: give k (how many entries are true per row) or ratio (the fraction true), one of them"),
    ("keep: subset(2)", "keep: subset(hidden - 1)", 26, 11, "random 'keep': k=7 is larger than the last axis (6 "
                                                            "entries)"),
    ("keep: subset(2)", "keep: subset(ratio=2 * progress)", 26, 11,
     "random 'keep': subset: ratio must be in [0, 1], got 1.8"),
    ("keep: subset(2)", "keep: sbset(2)", 26, 11, "random 'keep': unknown draw 'sbset' (did you mean 'subset'?)"),
    ("keep: subset(2)", "keep: subset(2) * 2", 26, 11, "random 'keep': expected a draw"),
    ("keep: subset(2)", "keep: subset(width)", 26, 18, "random 'keep': unknown name 'width'"),
    ("keep: subset(2)", "keep: subset(n=2)", 26, 18, "subset() has no argument 'n'"),
    ("noise: normal(0, 0.01)", "noise: normal(0, -1)", 27, 12, "random 'noise': normal: std must be at least 0, "
                                                               "got -1"),
    ("u: uniform(-1, 1)", "u: bernoulli(p=2)", 28, 8, "random 'u': bernoulli: p must be in [0, 1], got 2"),
    ("u: uniform(-1, 1)", "u: uniform(-1, 1)\n    label: subset(1)", 29, 5,
     "random: 'label' is not an input of the model"),
    ("  random:\n", "  feed: {keep: domain_label}\n  random:\n", 27, 5,
     "random: the input 'keep' is also fed by feed: (domain_label); give it one source"),
])
def test_misuse_is_a_located_error_at_check_time(old, new, line, col, message):
    assert SPEC.count(old) == 1
    errors = error_of(SPEC.replace(old, new))
    assert any((ln, c) == (line, col) and m.startswith(message) for ln, c, m in errors), errors


def test_an_input_without_the_batch_axis_first_is_an_error():
    text = SPEC.replace("  u: f32[B, 3]", "  u: f32[3]").replace("spread: {type: \"f32[B, 3]\"",
                                                                 "spread: {type: \"f32[3]\"")
    errors = error_of(text.replace("[:, :1]", "[:1]"))
    assert errors == [(28, 8, "random: the input 'u' is f32[3]: a draw fills an input whose first axis is the "
                              "batch B, and it has first axis 3")]


def test_without_random_the_input_is_fed_by_no_field():
    """The rule: a drawn input takes no data field; without its random: entry it needs one."""
    errors = error_of(SPEC.replace("    keep: subset(2)\n", ""))
    assert any("the model input 'keep' is fed by no data field" in m for _, _, m in errors), errors


def test_with_epochs_the_last_step_is_checked_before_anything_is_written(tmp_path):
    """`specc check` cannot count the steps of `epochs:` (the data decides), so the draw's arguments at the
    last step are checked when training starts, before the run folder exists."""
    text = (SPEC.replace("keep: subset(2)", "keep: subset(7 * progress)")
                .replace("steps: 10", "epochs: 1").replace("  checkpoint: {every: 5}\n", ""))
    prepare(text)  # the check passes: at its step 0, k = 0
    out = tmp_path / "run"
    with pytest.raises(SpecError) as e:
        train(text, out)
    d = e.value.diagnostics[0]
    assert d.message.startswith("random 'keep': subset: k must be a whole number at least 0, got 6.7") \
        and d.message.endswith("at step 23"), d.message  # 192 samples / 8 = 24 steps
    assert not out.exists()
