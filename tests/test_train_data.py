"""Data for recipes: every built-in generator makes the fields it declares, with the content its task
says; the user's .npz / .csv files are read with their declared fields, and a missing field, a wrong
dtype, an empty file or a bad CSV cell is a located error before training starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specc.dsl.diagnostics import SpecError
from specc.train import data as D
from specc.train import prepare
from specc.train.expr import gd_step
from specc.train.loop import load_data

NP = {"f32": np.float32, "i64": np.int64, "bool": np.bool_}


@pytest.mark.parametrize("name, args", [
    ("linear_regression", {"n": 16, "points": 5, "dim": 3}),
    ("arithmetic", {"n": 50, "digits": 2, "format": "reversed"}),
    ("sequences", {"n": 20, "task": "sort"}),
    ("sequences", {"n": 20, "task": "histogram", "length": 6}),
    ("automata", {"n": 6, "length": 40}),
    ("seasonal", {"n": 30, "variates": 3, "lookback": 12, "horizon": 4}),
    ("two_moons", {"n": 40}),
    ("flow_pairs", {"n": 12, "height": 10, "width": 14, "channels": 2, "max_flow": 3.0}),
    ("digits", {"n": 100, "rotations": True}),
    ("digit_patches", {"n": 100, "patch": 4, "mask_ratio": 0.5}),
    ("statsmodels", {"name": "sunspots", "lookback": 24, "horizon": 6}),
    ("statsmodels", {"name": "co2", "n": 200}),
    ("span_corruption", {"n": 40, "length": 12, "vocab": 6, "spans": 2, "span_length": 3}),
    ("span_corruption", {"n": 20, "length": 10, "vocab": 5, "spans": 0, "source": "automata"}),
])
def test_generators_make_the_fields_they_declare(name, args):
    gen = D.GENERATORS[name]
    bound = gen.bind(args)
    declared = gen.fields(bound)
    arrays = D.generate(gen, bound, seed=0)
    assert arrays.keys() == declared.keys()
    n = {len(a) for a in arrays.values()}
    assert len(n) == 1 and 0 < n.pop() <= bound["n"]
    for k, (dtype, shape, rng) in declared.items():
        a = arrays[k]
        assert a.dtype == NP[dtype] and a.shape[1:] == shape, (k, a.dtype, a.shape)
        if rng is not None:
            assert rng[0] <= a.min() and a.max() < rng[1], k
        if dtype == "f32":
            assert np.isfinite(a).all()
    again = D.generate(gen, bound, seed=0)
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)  # seeded


def test_arithmetic_strings_hold_correct_sums_in_both_formats():
    for fmt in ("plain", "reversed"):
        a = D.generate(D.GENERATORS["arithmetic"], D.GENERATORS["arithmetic"].bind({"n": 200, "format": fmt}), 1)
        for tokens, targets, mask in zip(a["tokens"][:50], a["targets"], a["mask"]):
            text = D.decode_arithmetic(np.concatenate([tokens, targets[-1:]]))
            x, rest = text.split("+")
            y, z = rest.split("=")
            z = z.rstrip("$")
            assert len(x) == len(y) == 3 and len(z) == 4 and text.endswith("$")
            assert int(z if fmt == "plain" else z[::-1]) == int(x) + int(y)
            assert D.decode_arithmetic(targets[mask]) == z + "$"  # the loss sees the answer and the end
    pairs = {tuple(t[:7]) for t in a["tokens"]}
    assert len(pairs) == 200  # distinct problems


def test_sequence_tasks_and_domains():
    g = D.GENERATORS["sequences"]
    s = D.generate(g, g.bind({"n": 30, "task": "sort", "length": 5, "vocab": 7}), 0)
    seq = np.concatenate([s["tokens"], s["targets"][:, -1:]], axis=1)
    assert (seq[:, 5] == 7).all() and (np.sort(seq[:, :5], 1) == seq[:, 6:]).all()
    h = D.generate(g, g.bind({"n": 30, "task": "histogram", "length": 5}), 0)
    assert all(h["targets"][i, j] == (h["tokens"][i] == h["tokens"][i, j]).sum() for i in range(30) for j in range(5))
    m = D.generate(D.GENERATORS["two_moons"], D.GENERATORS["two_moons"].bind({"n": 2000, "rotation": 90.0,
                                                                              "noise": 0.0}), 0)
    src, tgt = m["x"][m["domain_label"] == 0], m["x"][m["domain_label"] == 1]
    assert len(src) == len(tgt) == 1000
    # a quarter turn: the target domain's spread along x is the source domain's along y
    assert src[:, 0].std() == pytest.approx(tgt[:, 1].std(), rel=0.1)
    assert src[:, 1].std() == pytest.approx(tgt[:, 0].std(), rel=0.1)


def test_linear_regression_tokens_and_the_gd_step_reference():
    g = D.GENERATORS["linear_regression"]
    a = D.generate(g, g.bind({"n": 64, "points": 8, "dim": 3}), 0)
    assert np.array_equal(a["e"][:, :, :3], a["x"]) and np.array_equal(a["e"][:, :-1, 3], a["y"][:, :-1])
    assert (a["e"][:, -1, 3] == 0).all() and np.array_equal(a["target"], a["y"][:, -1])
    x, y = torch.from_numpy(a["x"]).double(), torch.from_numpy(a["y"]).double()
    expected = [0.5 / 8 * sum(float(y[b, i]) * float(x[b, i] @ x[b, 8]) for i in range(8)) for b in range(64)]
    assert torch.allclose(gd_step(x, y, lr=0.5).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_seasonal_windows_follow_one_series():
    g = D.GENERATORS["seasonal"]
    a = D.generate(g, g.bind({"n": 20, "variates": 2, "lookback": 6, "horizon": 3}), 0)
    assert np.array_equal(a["x"][1, :-1], a["x"][0, 1:]) and np.array_equal(a["target"][0], a["x"][6, :3])


def _warp64(x, flow):
    """x [N, C, H, W] sampled bilinearly at p + flow(p) (torch's grid_sample, align_corners=True), float64,
    and the mask of the pixels whose p + flow(p) lies inside the image."""
    import torch.nn.functional as F
    _, _, h, w = x.shape
    gx = 2 * (torch.arange(w, dtype=torch.float64).view(1, 1, w) + flow[:, 0]) / (w - 1) - 1
    gy = 2 * (torch.arange(h, dtype=torch.float64).view(1, h, 1) + flow[:, 1]) / (h - 1) - 1
    out = F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out, ((gx.abs() <= 1) & (gy.abs() <= 1)).unsqueeze(1).expand_as(out)


def test_flow_pairs_know_their_flow():
    """img1(p) = img2(p + flow_gt(p)): warping img2 backward by flow_gt gives img1 up to the error of bilinear
    interpolation of a smooth image (far below the zero-flow difference; the opposite flow does not); the flow
    is smooth, within max_flow, and max_flow=0 gives two equal images."""
    g = D.GENERATORS["flow_pairs"]
    a = D.generate(g, g.bind({"n": 64, "height": 12, "width": 16, "max_flow": 2.0}), 3)
    img1, img2, flow = (torch.from_numpy(a[k]).double() for k in ("img1", "img2", "flow_gt"))
    assert flow.abs().max() <= 2.0 and flow.abs().max() > 1.5 and 0.8 < img2.std() < 1.2
    slope = 0.4 * 2.0 * 2 * math.pi / 16  # the smooth part's bound: 0.4 max_flow, wavelengths >= the longer side
    assert (flow[..., 1:] - flow[..., :-1]).abs().max() <= slope and \
        (flow[..., 1:, :] - flow[..., :-1, :]).abs().max() <= slope
    assert (flow - flow.mean((2, 3), keepdim=True)).abs().max() > 0.1  # not only a translation
    warped, inside = _warp64(img2, flow)
    err = (warped - img1)[inside].abs().mean()
    zero = (img2 - img1)[inside].abs().mean()
    backwards, inside_b = _warp64(img2, -flow)
    assert inside.float().mean() > 0.6 and zero > 0.3
    assert err < 0.2 * zero and (backwards - img1)[inside_b].abs().mean() > 1.5 * zero
    still = D.generate(g, g.bind({"n": 4, "max_flow": 0.0}), 0)
    assert np.array_equal(still["img1"], still["img2"]) and not still["flow_gt"].any()
    with pytest.raises(D.ArgError, match="'max_flow' must be zero or more, got -1.0"):
        g.bind({"max_flow": -1.0})
    with pytest.raises(D.ArgError, match="'height' must be positive, got 0"):
        g.bind({"height": 0})


def test_bad_generator_arguments():
    with pytest.raises(D.ArgError, match="'n' must be positive"):
        D.GENERATORS["digits"].bind({"n": 0})
    with pytest.raises(D.ArgError, match="'name' must be one of 'sunspots', 'co2', 'nile'"):
        D.GENERATORS["statsmodels"].bind({"name": "airline"})
    with pytest.raises(D.ArgError, match="only 100 distinct problems"):
        D.generate(D.GENERATORS["arithmetic"], D.GENERATORS["arithmetic"].bind({"n": 101, "digits": 1}), 0)


def test_bad_span_corruption_arguments():
    g = D.GENERATORS["span_corruption"]
    with pytest.raises(D.ArgError, match="spans \\* span_length = 12 exceeds length = 10") as e:
        g.bind({"length": 10, "spans": 4, "span_length": 3})
    assert e.value.arg == "spans"
    with pytest.raises(D.ArgError, match="'spans' must be zero or more, got -1"):
        g.bind({"spans": -1})
    with pytest.raises(D.ArgError, match="'span_length' must be positive, got 0"):
        g.bind({"span_length": 0})
    with pytest.raises(D.ArgError, match="needs vocab >= 2") as e:
        g.bind({"vocab": 1, "source": "automata"})
    assert e.value.arg == "vocab"
    with pytest.raises(D.ArgError, match="'source' must be one of 'random', 'automata'"):
        g.bind({"source": "copy"})
    assert g.bind({"spans": 0, "length": 1, "vocab": 1})["spans"] == 0  # no span: the text is the whole prefix


FILE_SPEC = """\
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
    file: {file}
    fields:
      x: f32[N, 3]
      label: i64[N] in range(2)
  loss: cross_entropy(y, label)
  steps: 2
  batch: 4
"""


def _prepare(tmp_path, file: str, fields: str | None = None):
    text = FILE_SPEC.format(file=file)
    if fields is not None:
        text = text.replace("      x: f32[N, 3]\n      label: i64[N] in range(2)\n", fields)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return prepare(spec)


def _error(tmp_path, file: str, fields: str | None = None) -> list[tuple[str, int, int, str]]:
    src, graph, recipe = _prepare(tmp_path, file, fields)
    with pytest.raises(SpecError) as e:
        load_data(recipe)
    return [(d.span.file.rsplit("/", 1)[-1], d.span.line, d.span.col, d.message) for d in e.value.diagnostics]


def test_npz_files_are_read_and_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 3)), label=rng.integers(0, 2, 40), extra=np.zeros(3))
    src, graph, recipe = _prepare(tmp_path, "d.npz")
    train, val = load_data(recipe)
    assert train["x"].dtype == torch.float32 and train["label"].dtype == torch.int64
    assert len(train["x"]) == 36 and len(val["x"]) == 4  # split 0.1
    assert sorted(map(tuple, torch.cat([train["x"], val["x"]]).tolist())) == \
        sorted(map(tuple, torch.from_numpy(np.load(tmp_path / "d.npz")["x"]).float().tolist()))


def test_npz_problems_are_located_at_the_declared_field(tmp_path):
    np.savez(tmp_path / "missing.npz", x=np.zeros((5, 3), np.float32))
    assert _error(tmp_path, "missing.npz") == [("spec.yaml", 14, 14, "data: 'missing.npz' has no array 'label'")]
    np.savez(tmp_path / "dtype.npz", x=np.zeros((5, 3), np.float32), label=np.zeros(5, np.float32))
    assert _error(tmp_path, "dtype.npz") == [
        ("spec.yaml", 14, 14, "data: the field 'label' is declared i64 but 'dtype.npz' holds float32")]
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3), np.float32), label=np.zeros(0, np.int64))
    assert [e[3] for e in _error(tmp_path, "empty.npz")] == ["data: the field 'x' is empty (no samples)",
                                                             "data: the field 'label' is empty (no samples)"]
    np.savez(tmp_path / "shape.npz", x=np.zeros((5, 4), np.float32), label=np.full(5, 2))
    assert [e[3] for e in _error(tmp_path, "shape.npz")] == [
        "data: the field 'x' is declared [N, 3] but the array has shape [5, 4]",
        "data: the field 'label' has values in [2, 2], outside range(0, 2)"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert _error(tmp_path, "bad.npz")[0][1:3] == (11, 11)  # at the file name
    assert _error(tmp_path, "absent.npz")[0][3].startswith("data: cannot read 'absent.npz'")


def test_pickled_npz_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}] * 5, dtype=object), label=np.zeros(5, np.int64))
    messages = [e[3] for e in _error(tmp_path, "p.npz")]
    assert messages and "pickle" in messages[0].lower()


CSV_FIELDS = "      x: {type: 'f32[N, 3]', columns: [a, b, c]}\n      label: i64[N] in range(2)\n"


def test_csv_files_and_their_located_errors(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,c,label\n" + "".join(f"{i},{i + 1}.5,-{i},{i % 2}\n" for i in range(20)))
    src, graph, recipe = _prepare(tmp_path, "d.csv", CSV_FIELDS)
    train, val = load_data(recipe)
    both = torch.cat([train["x"], val["x"]])
    assert both.shape == (20, 3) and sorted(both[:, 0].tolist()) == list(map(float, range(20)))
    (tmp_path / "cell.csv").write_text("a,b,c,label\n1,2,3,0\n1,2,x3,1\n")
    assert _error(tmp_path, "cell.csv", CSV_FIELDS) == [
        ("cell.csv", 3, 5, "data: column 'c' (field 'x', f32): expected a number, got 'x3'")]
    (tmp_path / "int.csv").write_text("a,b,c,label\n1,2,3,0.5\n")
    assert _error(tmp_path, "int.csv", CSV_FIELDS)[0][:3] == ("int.csv", 2, 7)
    (tmp_path / "cols.csv").write_text("a,b,label\n1,2,0\n")
    assert _error(tmp_path, "cols.csv", CSV_FIELDS) == [("spec.yaml", 13, 17, "data: 'cols.csv' has no column 'c'")]
    (tmp_path / "empty.csv").write_text("")
    assert _error(tmp_path, "empty.csv", CSV_FIELDS)[0][3] == "data: 'empty.csv' is empty"
    (tmp_path / "header.csv").write_text("a,b,c,label\n")
    assert "is empty (no samples)" in _error(tmp_path, "header.csv", CSV_FIELDS)[0][3]


def test_field_declarations_are_checked_by_specc_check(tmp_path, capsys):
    from specc.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(FILE_SPEC.format(file="d.txt").replace("i64[N] in range(2)", "i64[M] in range(2)")
                    .replace("f32[N, 3]", "f33[N, 3]"))
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml:11:11: error: data: 'd.txt' is neither a .npz nor a .csv file" in err
    assert "spec.yaml:13:10: error: data: field 'x': unknown dtype 'f33'" in err
    assert "spec.yaml:14:14: error: data: field 'label': the first axis must be the sample axis N" in err
    assert math.isfinite(1.0)


def test_ordered_windows_leave_a_gap_before_validation(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("""\
specc: 1
name: s
inputs:
  x: f32[B, 8, 2]
graph: |
  y = linear(transpose(x, 1, 2), 3)
outputs:
  y: f32[B, 2, 3]
train:
  data: seasonal(n=100, variates=2, lookback=8, horizon=3)
  split: 0.2
  loss: mse(transpose(y, 1, 2), target)
  steps: 1
""")
    from specc.train import prepare

    _, _, recipe = prepare(spec)
    train, val = load_data(recipe)
    assert len(val["x"]) == 20 and len(train["x"]) == 100 - 20 - (8 + 3 - 1)
    # the last training target ends before the first validation window begins: nothing seen twice
    arrays = D.generate(recipe.generator, recipe.data_args, recipe.section.seed)
    assert torch.equal(train["target"][-1], torch.from_numpy(arrays["target"][69]))
    assert torch.equal(val["x"][0], torch.from_numpy(arrays["x"][80]))
    assert 69 + 8 + 3 - 1 < 80


def test_a_data_path_that_is_not_a_regular_file_is_refused(tmp_path):
    os_fifo = tmp_path / "pipe.csv"
    import os

    os.mkfifo(os_fifo)
    assert _error(tmp_path, "pipe.csv", CSV_FIELDS) == [("spec.yaml", 11, 11, "data: 'pipe.csv' is not a regular file")]
    (tmp_path / "dir.npz").mkdir()
    assert _error(tmp_path, "dir.npz")[0][3] == "data: 'dir.npz' is not a regular file"


def test_digit_patches_positions_and_kept_subsets():
    g = D.GENERATORS["digit_patches"]
    a = D.generate(g, g.bind({}), seed=0)  # patch 2: 16 positions, mask_ratio 0.75: 4 kept
    digits = D.generate(D.GENERATORS["digits"], D.GENERATORS["digits"].bind({}), seed=0)
    assert np.array_equal(a["x"], digits["x"]) and np.array_equal(a["label"], digits["label"])
    assert np.array_equal(a["position"], np.broadcast_to(np.arange(16), (1797, 16)))
    assert (a["keep"].sum(1) == 4).all()
    assert len({tuple(np.flatnonzero(k)) for k in a["keep"]}) > 1000  # a random subset per image (1820 exist)
    assert 0.2 < a["keep"].mean(0).min() and a["keep"].mean(0).max() < 0.3  # every patch kept about 1/4 of the time
    assert not np.array_equal(D.generate(g, g.bind({}), seed=1)["keep"], a["keep"])
    assert (D.generate(g, g.bind({"patch": 1, "mask_ratio": 0.0, "n": 5}), 0)["keep"]).all()  # 64 positions, all kept
    assert g.fields(g.bind({"patch": 8, "mask_ratio": 0.0}))["position"] == ("i64", (1,), (0, 1))
    assert (D.generate(g, g.bind({"patch": 4, "mask_ratio": 0.625}), 0)["keep"].sum(1) == 1).all()  # 2.5 -> 3 dropped
    with pytest.raises(D.ArgError, match="'patch' must divide the image side 8 \\(1, 2, 4 or 8\\), got 3") as e:
        g.bind({"patch": 3})
    assert e.value.arg == "patch"
    with pytest.raises(D.ArgError, match="'mask_ratio' must be zero or more, got -0.1"):
        g.bind({"mask_ratio": -0.1})
    for ratio in (1.0, 0.97, 0.96875, float("nan")):  # 0.96875: 15.5 of 16 rounds up to 16, none left
        with pytest.raises(D.ArgError, match="'mask_ratio' must leave at least one of the 16 patches") as e:
            g.bind({"mask_ratio": ratio})
        assert e.value.arg == "mask_ratio"
