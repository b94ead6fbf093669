"""A validation split larger than one pass (EVAL_CHUNK samples) runs through the model in chunks, and its
loss and metrics are computed once on the gathered outputs: a masked mean (codegen2's loss and token
accuracy, with a different count of predicted tokens in each chunk) is what one pass gives, not a mean of
the chunks' means. Where an output has no sample axis, or the outputs would be too large to keep, the
metrics are the chunks' means weighted by their sizes, and the run says so (summary.json's val_note).

Reference: the whole split in one pass, in float64; equal within 1e-12 (the chunks' matmuls sum in the
same order per sample)."""

from __future__ import annotations

import json

import pytest
import torch

import specc
from specc.train import loop, prepare
from specc.train.loop import Stepper, load_data

SPEC = "specs/codegen2.yaml"
#: codegen2 with an output that has no sample axis (a mean over the batch)
SPREAD = open(SPEC).read().replace("  logits = linear(layer_norm(h), vocab + 2 + spans)\n",
                                   "  logits = linear(layer_norm(h), vocab + 2 + spans)\n  spread = mean(logits)\n") \
    .replace("  logits: f32[B, T, vocab + 2 + spans]\n", "  logits: f32[B, T, vocab + 2 + spans]\n  spread: f32[]\n")


def _setup(text: str, n: int = 600):
    src, graph, recipe = prepare(text)
    _, val = load_data(recipe)
    val = {k: v[:n] for k, v in val.items()}
    model = specc.load(text).double()
    return model, Stepper(model, graph, recipe, 1), val


@torch.no_grad()
def test_chunked_masked_metrics_are_those_of_one_pass():
    model, stepper, val = _setup(SPEC)
    counts = [int(val["mask"][i:i + 128].sum()) for i in range(0, 600, 128)]
    assert len(set(counts)) > 1  # the chunks predict different numbers of tokens: a mean of means is off
    one = stepper.evaluate(model, val, 0, stepper.scalars(0), 4096)
    assert not stepper.chunked
    chunked = stepper.evaluate(model, val, 0, stepper.scalars(0), 128)
    assert not stepper.chunked and chunked.keys() == one.keys() == {"loss", "exact", "token_acc"}
    for k in one:
        assert abs(chunked[k] - one[k]) <= 1e-12, (k, chunked[k], one[k])
    # with no room to keep the outputs: the chunks' means, weighted by their sizes
    weighted = stepper.evaluate(model, val, 0, stepper.scalars(0), 128, gather_bytes=0)
    assert stepper.chunked
    want = {k: 0.0 for k in one}
    for i in range(0, 600, 128):
        part = stepper.evaluate(model, {k: v[i:i + 128] for k, v in val.items()}, 0, stepper.scalars(0), 4096)
        for k in want:
            want[k] += part[k] * min(128, 600 - i) / 600
    for k in want:
        assert abs(weighted[k] - want[k]) <= 1e-12, k
    assert abs(weighted["loss"] - one["loss"]) > 1e-9  # the reason for gathering


@torch.no_grad()
def test_an_output_without_a_sample_axis_averages_over_chunks():
    model, stepper, val = _setup(SPREAD)
    model.train()
    stepper.evaluate(model, val, 0, stepper.scalars(0), 4096)
    assert not stepper.chunked and model.training  # eval mode only while evaluating
    stepper.evaluate(model, val, 0, stepper.scalars(0), 128)
    assert stepper.chunked and model.training


@pytest.mark.parametrize("text, noted", [(SPEC, False), (SPREAD, True)])
def test_a_run_says_when_its_validation_metrics_are_averaged_over_chunks(tmp_path, monkeypatch, capsys, text,
                                                                        noted):
    monkeypatch.setattr(loop, "EVAL_CHUNK", 512)  # codegen2's validation split: 2000 samples
    result = specc.train.train(text, tmp_path / "run", train={"steps": 2, "eval.every": 1}, progress=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert ("val_note" in summary) == noted and summary["val"] == pytest.approx(result.metrics)
    err = capsys.readouterr().err
    assert (err.count("note: the validation loss and metrics are means over chunks") == 1) == noted
