"""The recipes that ship in specs/, in smaller versions that run in seconds (the full runs and their
numbers are in BENCHMARKS.md, "Training recipes"). Each asserts what its recipe is for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specc.train import train

SPECS = Path(__file__).resolve().parents[1] / "specs"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def evals(run: Path) -> list[dict]:
    return [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if x.get("split") == "val"]


def test_itransformer_beats_the_naive_forecast(tmp_path):
    r = train(SPECS / "itransformer.yaml", tmp_path / "run", lookback=48, horizon=12, variates=4, d_model=32,
              layers=1, train={"data": "seasonal(n=600, variates=variates, lookback=lookback, horizon=horizon, "
                                       "periods=[12, 30], noise=0.1)", "steps": 100, "eval.every": 100})
    assert r.metrics["loss"] < 0.2 * r.metrics["naive_mse"]  # validation MSE against the last-value forecast


def test_dann_adapts_to_the_rotated_domain(tmp_path):
    dann = train(SPECS / "dann.yaml", tmp_path / "dann", train={"eval.every": 1500})
    plain = train(SPECS / "dann.yaml", tmp_path / "source_only",
                  train={"eval.every": 1500, "loss": "cross_entropy(logits, label, mask=domain_label == 0)"})
    assert dann.metrics["source_acc"] > 0.95 and plain.metrics["source_acc"] > 0.95
    assert dann.metrics["target_acc"] > plain.metrics["target_acc"] + 0.1
    lam = [x["lam"] for x in map(json.loads, (tmp_path / "dann" / "metrics.jsonl").read_text().splitlines())
           if "lam" in x]
    assert lam[0] == 0.0 and 0.99 < lam[-1] < 1.0 and lam == sorted(lam)  # lambda_p rises from 0 towards 1


def test_lsa_learns_one_gradient_descent_step(tmp_path):
    run = tmp_path / "run"
    r = train(SPECS / "lsa_icl.yaml", run, train={"steps": 500, "eval.every": 500,
                                                   "data": "linear_regression(n=2048, points=n_ctx, dim=dx)"})
    first = evals(run)[0]
    assert r.metrics["gd_mse"] < 0.05 * first["gd_mse"]  # much closer to one GD step than at initialisation
    assert r.metrics["loss"] < 1.2 * r.metrics["gd_loss"]


def test_sla_digits_plain_and_aggregated_accuracy(tmp_path):
    r = train(SPECS / "sla.yaml", tmp_path / "run", width=8, train={"steps": 300, "eval.every": 300})
    assert r.metrics["single_acc"] > 0.7 and r.metrics["aggregated_acc"] > 0.7  # 10 classes: chance is 0.1


def test_gpt_learns_reversed_addition_digits(tmp_path):
    run = tmp_path / "run"
    r = train(SPECS / "gpt.yaml", run, d_model=32, layers=1, heads=2,
              train={"data": 'arithmetic(digits=2, format="reversed", n=9000)', "steps": 400, "eval.every": 400,
                     "checkpoint.every": 400, "schedule": "warmup_cosine(warmup=20, min=0.1)",
                     "optimizer": "adamw(lr=0.005, weight_decay=0.1)"})
    assert r.metrics["digit_acc"] > 0.45 and r.metrics["loss"] < 0.5 * evals(run)[0]["loss"]
    assert 0.0 <= r.metrics["exact"] <= r.metrics["digit_acc"]


def test_exact_match_is_greedy_decoding_accuracy(tmp_path):
    """exact_match with teacher forcing counts exactly the samples that greedy decoding answers right."""
    from specc.train import prepare
    from specc.train.loop import load_data

    over = {"data": 'arithmetic(digits=2, format="reversed", n=3000)', "steps": 300, "eval.every": 300,
            "checkpoint.every": 300, "schedule": "warmup_cosine(warmup=20, min=0.1)",
            "optimizer": "adamw(lr=0.005, weight_decay=0.1)"}
    run = tmp_path / "run"
    r = train(SPECS / "gpt.yaml", run, d_model=32, layers=1, heads=2, train=over)
    _, _, recipe = prepare(SPECS / "gpt.yaml", dict(d_model=32, layers=1, heads=2), train=over)
    _, val = load_data(recipe)
    from safetensors.torch import load_file

    import specc

    # the -O0 module the metric ran on (RUN/model is -O1: fused kernels may round differently)
    weights = load_file(str(run / "checkpoints" / "step-0000300" / "model.safetensors"))
    model = specc.load(SPECS / "gpt.yaml", opt_level=0, weights=weights, d_model=32, layers=1, heads=2)
    tokens, targets, mask = val["tokens"], val["targets"], val["mask"]
    start = int(mask[0].float().argmax())  # the first answer position (the '=' token's)
    seq = tokens[:, :start + 1]
    with torch.no_grad():
        for _ in range(targets.shape[1] - start):  # greedy: feed back the model's own tokens
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = (seq[:, start + 1:] == targets[:, start:]).all(1).float().mean().item()
    assert r.metrics["exact"] == pytest.approx(greedy, abs=1e-6)
    assert 0 < greedy  # the comparison means something: some answers are right
