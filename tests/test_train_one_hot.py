"""one_hot(ids, num) in recipe expressions: float32 one-hot vectors of integer class ids, for targets
built from labels (e.g. a similarity or mse loss against the one-hot class); a float or boolean ids
tensor, a bad num or an id outside range(num) is an error located at the call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specc.dsl.diagnostics import SpecError
from specc.train import train
from specc.train.expr import TENSOR_FUNCTIONS

MOONS = Path(__file__).resolve().parent / "data" / "train_moons.yaml"


def test_one_hot_values():
    f = TENSOR_FUNCTIONS["one_hot"].fn
    got = f(torch.tensor([[0, 2], [1, 0]]), 3)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 3)
    assert torch.equal(got, torch.eye(3)[torch.tensor([[0, 2], [1, 0]])])


def spec(tmp_path: Path, loss: str) -> Path:
    text = MOONS.read_text()
    old = "  loss: cross_entropy(logits, label) + 0.01 * mean(logits * logits)\n"
    assert old in text
    path = tmp_path / "moons.yaml"
    path.write_text(text.replace(old, f"  loss: {loss}\n").replace("steps: 40", "steps: 20"))
    return path


def test_a_loss_against_one_hot_targets_trains(tmp_path):
    torch.set_num_threads(1)
    train(spec(tmp_path, "mse(softmax(logits), one_hot(label, 2))"), tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x.get("split") == "val"]
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["acc"] > 0.7


@pytest.mark.parametrize("call, message", [
    ("one_hot(x[:, 0], 2)", "one_hot: ids must be an integer tensor, got float32"),
    ("one_hot(label, 1)", "one_hot: ids must be in range(1), got values from 0 to 1"),
    ("one_hot(label, 0)", "one_hot: num must be a positive whole number, got 0"),
])
def test_bad_ids_or_num_are_located(tmp_path, call, message):
    with pytest.raises(SpecError) as e:
        train(spec(tmp_path, f"mse(softmax(logits)[:, 0], {call}[:, 0])"), tmp_path / "run")
    text = str(e.value)
    assert message in text and "moons.yaml:" in text, text
    assert not (tmp_path / "run" / "model").exists()
