"""LoRA as a training transform: a trained model fine-tuned on a shifted task through low-rank
updates of named linear layers; the base weights stay as they were, and the built RUN/model/ (the
updates merged into the weights) computes what the adapted model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specc.backends.pytorch.build import import_model_module
from specc.cli import main
from specc.train import train

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "tests" / "data" / "train_moons.yaml"
LORA = "  lora:\n    layers: [linear, logits]\n    rank: 2\n    alpha: 4\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_lora_fine_tunes_only_the_updates_and_merges_them(tmp_path):
    base = train(MOONS, tmp_path / "base", dropout=0.0)
    w0 = load_file(str(tmp_path / "base" / "checkpoints" / "step-0000040" / "model.safetensors"))
    spec = tmp_path / "lora.yaml"
    spec.write_text(MOONS.read_text().replace("rotation=0.0", "rotation=60.0").replace("  clip: 1.0\n",
                                                                                       "  clip: 1.0\n" + LORA))
    run = tmp_path / "lora"
    tuned = train(spec, run, dropout=0.0, weights=w0, train={"steps": 60})
    evals = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "split" in x]
    assert base.metrics["acc"] > 0.85
    # step 0 is the base model on the rotated task (B starts at zero); the updates adapt it
    assert tuned.metrics["acc"] > evals[0]["acc"] + 0.05
    final = load_file(str(run / "checkpoints" / "step-0000060" / "model.safetensors"))
    assert all(torch.equal(final[k], w0[k]) for k in w0)  # the base is frozen
    assert sorted(k for k in final if "lora" in k) == ["linear.lora_A", "linear.lora_B", "logits.lora_A",
                                                       "logits.lora_B"]
    # RUN/model: W + alpha/r * B @ A in the spec's own layers, nothing else
    built = import_model_module(run / "model").load(run / "model")
    assert sorted(built.state_dict()) == sorted(w0)
    f = {k: v.double() for k, v in final.items()}

    def layer(x, name):
        w = f[f"{name}.weight"] + 2.0 * f[f"{name}.lora_B"] @ f[f"{name}.lora_A"]
        return x @ w.T + f[f"{name}.bias"]

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = layer(torch.relu(layer(x, "linear")), "logits")
    assert torch.allclose(built(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_lora_patterns_are_checked(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(MOONS.read_text().replace("  clip: 1.0\n", "  clip: 1.0\n  freeze: [linear.*]\n"
                                              + LORA.replace("[linear, logits]", "[linear, head]")))
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:28:22: error: lora: 'head' matches no linear layer" in err
    assert "bad.yaml:26:3: error: train: lora freezes every parameter of the model already; drop freeze" in err


def test_a_lora_checkpoint_serves_weights_for_every_target(tmp_path, capsys):
    """A LoRA run's checkpoint holds the factors and, in its metadata, their scales: `specc build
    --weights` of the spec merges them (W + alpha/r * B @ A), so the trained model reaches any target
    without training again at -O0; a file of factors without scales is a clear error."""
    from safetensors.torch import save_file

    spec = tmp_path / "lora.yaml"
    spec.write_text(MOONS.read_text().replace("  clip: 1.0\n", "  clip: 1.0\n" + LORA))
    run = tmp_path / "run"
    train(spec, run, dropout=0.0, train={"steps": 20})
    ckpt = run / "checkpoints" / "step-0000020" / "model.safetensors"
    assert any(v.abs().max() > 0 for k, v in load_file(str(ckpt)).items() if k.endswith("lora_B"))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    want = import_model_module(run / "model").load(run / "model")(x)  # RUN/model: the merged build
    assert main(["build", str(spec), "-o", str(tmp_path / "torch"), "--weights", str(ckpt), "-O0"]) == 0
    got = import_model_module(tmp_path / "torch").load(tmp_path / "torch")(x)
    assert (got - want).abs().max() < 1e-5
    pytest.importorskip("tvm")
    assert main(["build", str(spec), "-o", str(tmp_path / "tvm"), "--weights", str(ckpt),
                 "--target", "tvm-llvm"]) == 0
    got = import_model_module(tmp_path / "tvm").load(tmp_path / "tvm")(x)
    assert (got - want).abs().max() < 1e-5
    capsys.readouterr()
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(ckpt)), str(bare))  # the factors without the scales
    assert main(["build", str(spec), "-o", str(tmp_path / "no"), "--weights", str(bare), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "holds LoRA factors (lora_A, lora_B) but not their scales (alpha / r)" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()
