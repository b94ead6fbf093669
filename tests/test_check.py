"""`specc check`: the summary is computed from the IR alone (no weights), also for huge specs."""

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import specc

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "specs" / "gpt.yaml"


def gpt_params(vocab, block, d, layers, tied):
    per_layer = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + block * d + layers * per_layer + 2 * d + (0 if tied else vocab * d)


def test_summary_counts_parameters_and_flops():
    s = specc.check(GPT)
    assert s.params == gpt_params(65, 64, 64, 2, True)
    assert specc.check(GPT, tied=False).params == gpt_params(65, 64, 64, 2, False)
    assert [o.name for o in s.outputs] == ["logits"]
    assert s.outputs[0].example_shape == (2, 16, 65)
    assert s.example_flops > 2 * s.params * 2 * 16 * 0.5  # at least ~2 FLOPs per weight per token
    bigger = specc.check(GPT, layers=4)
    assert bigger.example_flops > s.example_flops


def test_billions_of_parameters_check_fast_without_allocating():
    overrides = dict(vocab=50257, block_size=2048, d_model=8192, heads=64, layers=48, tied=False)
    expected = gpt_params(50257, 2048, 8192, 48, False)
    assert expected > 3e10
    specc.check(GPT, **overrides)  # warm imports
    tracemalloc.start()
    t0 = time.perf_counter()
    s = specc.check(GPT, **overrides)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert s.params == expected
    assert elapsed < 1.0, f"check took {elapsed:.2f}s"
    assert peak < 50e6, f"check allocated {peak / 1e6:.0f} MB"


def test_cli_check_prints_summary_and_json():
    r = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(GPT), "--set", "layers=3", "--no-color"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "logits" in r.stdout and "f32[B, T, 65]" in r.stdout and "parameters" in r.stdout
    # the params as bound, --set included, written as the spec writes them
    assert "params      vocab=65, block_size=64, d_model=64, heads=4, layers=3, dropout=0.0, tied=true" in r.stdout
    r = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(GPT), "--json"], capture_output=True, text=True)
    data = json.loads(r.stdout)
    assert data["params"] == gpt_params(65, 64, 64, 2, True)
    assert data["outputs"][0]["example_shape"] == [2, 16, 65]
    assert data["bound_params"] == {"vocab": 65, "block_size": 64, "d_model": 64, "heads": 4, "layers": 2,
                                    "dropout": 0.0, "tied": True}


def test_cli_ir_and_build(tmp_path):
    r = subprocess.run([sys.executable, "-m", "specc.cli", "ir", str(GPT)], capture_output=True, text=True)
    assert r.returncode == 0
    assert "= attention(" in r.stdout and "gpt.yaml:" in r.stdout
    out = tmp_path / "gpt"
    r = subprocess.run([sys.executable, "-m", "specc.cli", "build", str(GPT), "-o", str(out), "--set", "layers=1",
                        "--run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "(2, 16, 65)" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["layers"] == 1
    assert manifest["parameter_count"] == gpt_params(65, 64, 64, 1, True)
    assert manifest["inputs"][0]["type"] == "i64[B, T] in range(65)"


CONV_OVER_T = """\
specc: 1
name: pc
params: {{d: 8}}
dims:
  B: 2
  T: {t}
inputs:
  x: f32[B, T, d]
graph: |
  h = relu(x)
  c = conv1d(transpose(h, 1, 2), d, 5)
  y = mlp(transpose(c, 1, 2), hidden=16)
outputs:
  y:
"""


def test_a_dimension_below_one_at_the_example_sizes_is_an_error():
    """conv1d of kernel 5 over T has length T - 4: an example T of 3 would count FLOPs and build example
    inputs for a model that cannot run; reported once, at the conv, with the smallest T that works."""
    from opcheck import only_error

    d = only_error(CONV_OVER_T.format(t=3))
    assert (d.span.line, d.span.col) == (11, 7)
    assert d.message == "at the example sizes (B=2, T=3) dimension 2 of this conv1d's output, T - 4, is -1"
    assert d.notes == ("T must be at least 5 here; give it a larger example under dims: (T: {example: 5})",)
    assert specc.check(CONV_OVER_T.format(t=5)).outputs[0].example_shape == (2, 1, 8)


def test_prune_at_sizes_where_the_model_cannot_run_is_an_error(tmp_path, capsys):
    from specc.cli import main

    spec = tmp_path / "pc.yaml"
    spec.write_text(CONV_OVER_T.format(t=8).replace("relu(x)", "attention(x, heads=2)"))
    out = tmp_path / "o"
    assert main(["prune", str(spec), "--flops", "1.0", "--calib", "example", "--at", "T=3", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"<--at>: error: at B=2, T=3 dimension 2 of the output of the conv1d at {spec}:11:7, T - 4, is -1: " \
           "the model does not run at these sizes" in err, err
    assert not out.exists()


def test_check_params_lists_every_parameter_with_its_name_and_line(capsys):
    """`specc check --params`: the names --weights, freeze: and groups: take, with shape, op, the line of
    the layer, and what is tied (a shared repeat's steps), frozen or a buffer; --json too."""
    from specc.backends.pytorch.weights import init_weights
    from specc.cli import main

    spec = str(ROOT / "specs/splatflow.yaml")
    assert main(["check", spec, "--params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[0] for ln in lines]
    graph = specc.compile(spec)
    assert set(init_weights(graph)) < set(names)  # the stored ones, and the tied ones besides
    [convq] = [ln for ln in lines if ln.startswith("refine.2.convq.weight ")]
    assert "f32[16, 48, 3, 3]" in convq and "conv2d" in convq and "(tied to refine.0.convq.weight)" in convq
    assert f"{spec}:41:13" in convq
    assert main(["check", str(ROOT / "specs/repvgg.yaml"), "--params", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["parameters"]
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["down.conv_bn.batch_norm.running_mean"] == "buffer"
    assert kinds["down.conv_bn.batch_norm.weight"] == "trainable"
