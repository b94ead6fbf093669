"""`specc prune`'s calibration inputs (specc/pruning.py: calibration, _from_file, measure): a calibration
file's tensors are checked against the model's inputs (found by fuzzing: an empty file pruned on zero
samples, an all-NaN float input pruned on NaN importances, 7 for a bool input was cast to true), each
an error located at the file, exit 2, nothing written; the calibration description says how many
samples were used; --samples is bounded, and a split smaller than it is used whole and said so; a
batch larger than STACK_SAMPLES is evaluated in chunks with the importances of the whole batch.

Oracles: importances from a file equal (exactly: the same float64 computation) those from a file
holding only the samples the description says were used; chunked importances equal the unchunked ones
to 1e-9 relative (the same sums in another order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import specc
import specc.pruning as pruning
from specc.backends.pytorch.weights import init_weights
from specc.cli import main

GPT = ["specs/gpt.yaml", "--set", "d_model=32", "--set", "layers=1"]
PP = ["specs/position_prediction.yaml", "--set", "d=32", "--set", "layers=1"]


def prune_cli(capsys, argv, out: Path):
    code = main(["prune", *argv, "--flops", "0.8", "-o", str(out)])
    got = capsys.readouterr()
    return code, got.out, got.err


def assert_error(capsys, argv, out: Path, *messages):
    code, _, err = prune_cli(capsys, argv, out)
    assert code == 2 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    assert not out.exists()


def tokens(n, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, 65, size=(n, t))


def patches(n, seed=0):
    gen = np.random.default_rng(seed)
    keep = np.zeros((n, 16), bool)
    for i in range(n):
        keep[i, gen.choice(16, 4, replace=False)] = True
    return gen.normal(size=(n, 1, 8, 8)).astype(np.float32), keep


# ---------------------------------------------------------------------------------------------
# the file's contents
# ---------------------------------------------------------------------------------------------

def test_an_empty_file_is_an_error_not_a_pruning_on_zero_samples(tmp_path, capsys):
    f = tmp_path / "empty.npz"
    np.savez(f, idx=np.zeros((0, 16), "int64"))
    assert_error(capsys, [*GPT, "--calib", str(f), "--samples", "4"], tmp_path / "o",
                 f"{f}: error: the calibration file holds no samples (calibration tensor 'idx' is int64[0, 16])")


@pytest.mark.parametrize("bad,message", [
    (np.nan, "calibration tensor 'x' is float32[4, 1, 8, 8] and has NaN or infinite values (sample 2)"),
    (np.inf, "calibration tensor 'x' is float32[4, 1, 8, 8] and has NaN or infinite values (sample 2)"),
    (1e300, "calibration tensor 'x' is float64[4, 1, 8, 8] and has values too large for the input's f32 (sample 2)"),
])
def test_non_finite_float_inputs_are_errors(tmp_path, capsys, bad, message):
    x, keep = patches(4)
    x = x.astype(np.float64) if bad == 1e300 else x
    x[2, 0, 3, 3] = bad
    f = tmp_path / "c.npz"
    np.savez(f, x=x, keep=keep)
    assert_error(capsys, [*PP, "--calib", str(f)], tmp_path / "o", f"{f}: error: {message}")


def test_nan_beyond_the_samples_used_is_not_looked_at(tmp_path, capsys):
    x, keep = patches(6)
    x[5] = np.nan  # sample 5 is not among the first 4
    f = tmp_path / "c.npz"
    np.savez(f, x=x, keep=keep)
    code, out, err = prune_cli(capsys, [*PP, "--calib", str(f), "--samples", "4"], tmp_path / "o")
    assert code == 0, err
    assert "calibration c.npz (first 4 of its 6 samples)" in out


def test_integers_for_a_bool_input_must_be_0_or_1(tmp_path, capsys):
    x, keep = patches(4)
    f = tmp_path / "c.npz"
    np.savez(f, x=x, keep=np.where(keep, 7, 0))
    assert_error(capsys, [*PP, "--calib", str(f)], tmp_path / "o",
                 f"{f}: error: calibration tensor 'keep' is int64[4, 16] with values other than 0 and 1 (e.g. 7), "
                 f"but the input is bool[B, 16]")
    # 0 and 1 stand for false and true: the same importances as the bool file
    np.savez(f, x=x, keep=keep.astype(np.int64))
    np.savez(tmp_path / "b.npz", x=x, keep=keep)
    a = specc.prune("specs/position_prediction.yaml", flops=0.8, calib=f, d=32, layers=1)
    b = specc.prune("specs/position_prediction.yaml", flops=0.8, calib=tmp_path / "b.npz", d=32, layers=1)
    assert [layer.importance for layer in a.layers] == [layer.importance for layer in b.layers]
    assert a.keep == b.keep


@pytest.mark.parametrize("tensors,message", [
    ({"idx": tokens(4, t=100)}, "calibration tensor 'idx' is int64[4, 100], but the input is i64[B, T] in "
                                "range(65) with T from 1 to 64: axis 1 is 100"),
    ({"idx": np.full((4, 16), 2 ** 40)}, "calibration tensor 'idx' has values outside range(0, 65)"),
    ({"idx": tokens(4).astype(np.float32)}, "calibration tensor 'idx' is float32[4, 16], but the input is i64[B, T]"),
    ({"idx": tokens(4) > 3}, None),  # bool for an integer input: 0 / 1, accepted (as before)
])
def test_shapes_and_values_of_an_integer_input(tmp_path, capsys, tensors, message):
    f = tmp_path / "c.npz"
    np.savez(f, **tensors)
    if message is None:
        code, out, err = prune_cli(capsys, [*GPT, "--calib", str(f)], tmp_path / "o")
        assert code == 0 and "calibration c.npz (all 4 of its samples, 64 asked for)" in out, err
    else:
        assert_error(capsys, [*GPT, "--calib", str(f)], tmp_path / "o", f"{f}: error: {message}")


def test_static_axes_and_sample_counts_must_agree(tmp_path, capsys):
    x, keep = patches(4)
    f = tmp_path / "c.npz"
    np.savez(f, x=np.concatenate([x, x[..., :1]], axis=3), keep=keep)
    assert_error(capsys, [*PP, "--calib", str(f)], tmp_path / "o",
                 f"{f}: error: calibration tensor 'x' is float32[4, 1, 8, 9], but the input is f32[B, 1, 8, 8]: "
                 f"axis 3 must be 8")
    np.savez(f, x=x, keep=keep[:3])
    assert_error(capsys, [*PP, "--calib", str(f)], tmp_path / "o",
                 f"{f}: error: the calibration tensors hold different numbers of samples (their first axis): "
                 f"'x' 4, 'keep' 3")


TWO = """specc: 1
name: two
inputs: {x: 'f32[B, T, 8]', y: 'f32[B, T, 8]', s: 'f32[]'}
dims: {B: 2, T: 5}
graph: |
  a = attention(x + y * s, heads=2)
  z = mlp(a, hidden=6)
outputs:
  z:
"""


def test_a_dimension_that_recurs_must_have_one_size_and_inputs_without_axes_are_taken_whole(tmp_path, capsys):
    spec = tmp_path / "two.yaml"
    spec.write_text(TWO)
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=(6, 5, 8)).astype(np.float32), gen.normal(size=(6, 4, 8)).astype(np.float32)
    f = tmp_path / "c.npz"
    np.savez(f, x=x, y=y, s=np.float32(0.5))
    assert_error(capsys, [str(spec), "--calib", str(f)], tmp_path / "o",
                 f"{f}: error: calibration tensor 'y' is float32[6, 4, 8], but the input is f32[B, T, 8]: axis 1 "
                 f"must be 5 (T as 'x' has it)")
    np.savez(f, x=x, y=gen.normal(size=(6, 5, 8)).astype(np.float32), s=np.float32(0.5))  # s: no sample axis
    code, out, err = prune_cli(capsys, [str(spec), "--calib", str(f), "--samples", "3"], tmp_path / "o")
    assert code == 0, err
    assert "calibration c.npz (first 3 of its 6 samples)" in out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["prune"]["calibration"] == \
        "c.npz (first 3 of its 6 samples)"


# ---------------------------------------------------------------------------------------------
# how many samples: said, and used
# ---------------------------------------------------------------------------------------------

def test_the_description_says_how_many_samples_were_used_and_they_were(tmp_path, capsys):
    idx = tokens(6)
    np.savez(tmp_path / "six.npz", idx=idx)
    np.savez(tmp_path / "four.npz", idx=idx[:4])
    code, out, err = prune_cli(capsys, [*GPT, "--calib", str(tmp_path / "six.npz"), "--samples", "4"], tmp_path / "o")
    assert code == 0, err
    assert "calibration six.npz (first 4 of its 6 samples)" in out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["prune"]["calibration"] == \
        "six.npz (first 4 of its 6 samples)"
    code, out, err = prune_cli(capsys, [*GPT, "--calib", str(tmp_path / "six.npz")], tmp_path / "p")
    assert code == 0 and "calibration six.npz (all 6 of its samples, 64 asked for)" in out, err
    code, out, err = prune_cli(capsys, [*GPT, "--calib", str(tmp_path / "six.npz"), "--samples", "6"], tmp_path / "q")
    assert code == 0 and "calibration six.npz (all 6 of its samples)\n" in out, err
    # the first 4 of six.npz are what four.npz holds: the same importances, to the last bit
    first = specc.prune("specs/gpt.yaml", flops=0.8, calib=tmp_path / "six.npz", samples=4, d_model=32, layers=1)
    only = specc.prune("specs/gpt.yaml", flops=0.8, calib=tmp_path / "four.npz", samples=64, d_model=32, layers=1)
    whole = specc.prune("specs/gpt.yaml", flops=0.8, calib=tmp_path / "six.npz", samples=64, d_model=32, layers=1)
    assert [x.importance for x in first.layers] == [x.importance for x in only.layers]
    assert [x.importance for x in first.layers] != [x.importance for x in whole.layers]
    assert only.calibration == "four.npz (all 4 of its samples, 64 asked for)"


def test_a_train_split_smaller_than_samples_is_used_whole_and_said_so(tmp_path, capsys):
    spec = tmp_path / "gpt.yaml"
    spec.write_text(Path("specs/gpt.yaml").read_text().replace("n=30000", "n=20"))  # 18 to train on, 2 held out
    code, out, err = prune_cli(capsys, [str(spec), "--set", "d_model=32", "--set", "layers=1", "--samples", "64"],
                               tmp_path / "o")
    assert code == 0, err
    said = "18 samples of the train split of arithmetic (seed 0; all it holds, 64 asked for)"
    assert f"calibration {said}" in out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["prune"]["calibration"] == said
    code, out, err = prune_cli(capsys, [str(spec), "--set", "d_model=32", "--set", "layers=1", "--samples", "8"],
                               tmp_path / "p")
    assert code == 0 and "calibration 8 samples of the train split of arithmetic (seed 0)\n" in out, err


def test_samples_beyond_the_bound_are_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):  # the bound is checked before the data set is made
        raise AssertionError("calibration ran")

    monkeypatch.setattr(pruning, "calibration", no_data)
    n = pruning.MAX_SAMPLES + 1
    assert_error(capsys, [*GPT, "--samples", str(n)], tmp_path / "o",
                 f"<--calib>: error: at most {pruning.MAX_SAMPLES} calibration samples, got {n}")
    assert_error(capsys, [*GPT, "--samples", "50000"], tmp_path / "o", "got 50000")


# ---------------------------------------------------------------------------------------------
# large batches in chunks; importances that are not numbers
# ---------------------------------------------------------------------------------------------

def test_a_batch_larger_than_a_pass_is_evaluated_in_chunks_with_the_same_importances(tmp_path, monkeypatch):
    f = tmp_path / "c.npz"
    np.savez(f, idx=tokens(20))
    whole = specc.prune("specs/gpt.yaml", flops=0.8, calib=f, d_model=32, layers=1)
    chunks, real = [], pruning._chunks

    def spy(args, features):
        got = real(args, features)
        chunks.append([c[0].shape[0] for c in got])
        return got

    monkeypatch.setattr(pruning, "STACK_SAMPLES", 8)
    monkeypatch.setattr(pruning, "_chunks", spy)
    chunked = specc.prune("specs/gpt.yaml", flops=0.8, calib=f, d_model=32, layers=1)
    assert chunks == [[8, 8, 4]]
    for a, b in zip(whole.layers, chunked.layers):
        assert len(a.importance) == len(b.importance) > 0
        for u, v in zip(a.importance, b.importance):
            assert abs(u - v) <= 1e-9 * max(abs(u), 1e-30), (a.path, u, v)
    assert whole.keep == chunked.keep


def test_nan_importances_are_an_error_not_a_ranking(tmp_path):
    graph = specc.compile("specs/gpt.yaml", d_model=32, layers=1)
    weights = init_weights(graph)
    name = next(k for k in weights if "mlp" in k and k.endswith("weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    with pytest.raises(specc.SpecError) as e:
        specc.prune("specs/gpt.yaml", tmp_path / "o", flops=0.8, calib="example", weights=weights,
                    d_model=32, layers=1)
    assert "are NaN or infinite on the calibration batch" in str(e.value)
    assert not (tmp_path / "o").exists()


MASKED = """\
specc: 1
name: pm
dims:
  T: {example: 6, max: 16}
inputs:
  m: bool[T, T]
  x: f32[B, T, 16]
graph: |
  a = x + attention(x, heads=4, mask=m)
  y = a + mlp(a, hidden=32)
outputs:
  y: f32[B, T, 16]
"""


def test_a_mask_without_the_batch_axis_is_taken_whole(tmp_path, capsys):
    """The samples run along the batch dimension, the first axis of the most inputs (x [B, T, 16]); a mask
    [T, T] (listed first here) is one tensor for them all, not a second count of samples."""
    spec = tmp_path / "pm.yaml"
    spec.write_text(MASKED)
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=gen.normal(size=(20, 6, 16)).astype(np.float32),
             m=np.tril(np.ones((6, 6), bool)))
    code, out, err = prune_cli(capsys, [str(spec), "--calib", str(tmp_path / "cal.npz"), "--samples", "8"],
                               tmp_path / "out")
    assert code == 0, err
    assert "cal.npz (first 8 of its 20 samples)" in out
