"""Scaling presets: `scales:` maps preset names to parameter overrides; the param `scale` selects
one (params.scale or --set scale=...); --set of a single param wins over the preset."""

from __future__ import annotations

import re

import pytest

import specc
from specc.cli import main

HEAD_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")

SCALED = """\
specc: 1
name: yolo_like
params:
  depth: 3
  width: 64
  scale: s
scales:
  n: {depth: 1, width: 16}
  s: {depth: 2, width: 32}
  m: {width: 48}
inputs:
  x: f32[B, 8]
blocks:
  layer(h): |
    return relu(linear(h, width))
graph: |
  h = linear(x, width)
  y = repeat(depth, layer, h)
outputs:
  y: null
"""


def bound(**overrides):
    return specc.compile(SCALED, **overrides).params


def test_the_default_preset_applies():
    assert bound() == {"depth": 2, "width": 32, "scale": "s"}


def test_a_preset_selected_by_override():
    assert bound(scale="n") == {"depth": 1, "width": 16, "scale": "n"}
    assert bound(scale="m") == {"depth": 3, "width": 48, "scale": "m"}  # unset keys keep their defaults


def test_single_overrides_win_over_the_preset_in_any_order(tmp_path):
    assert bound(scale="s", width=48) == {"depth": 2, "width": 48, "scale": "s"}
    assert bound(width=48, scale="s")["width"] == 48
    out = main(["ir", "--set", "width=40", "--set", "scale=n", "-O", "0", _write(tmp_path, SCALED)])
    assert out == 0


def _write(folder, text: str, name: str = "scaled.yaml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def test_cli_scale_and_set(capsys, tmp_path):
    path = _write(tmp_path, SCALED)
    assert main(["check", path, "--set", "scale=s", "--set", "width=48", "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)
    assert s["params"] == (8 * 48 + 48) + 2 * (48 * 48 + 48)


def test_without_a_default_the_params_stand_until_a_preset_is_chosen():
    spec = SCALED.replace("  scale: s\n", "")
    assert specc.compile(spec).params == {"depth": 3, "width": 64}
    assert specc.compile(spec, scale="n").params == {"depth": 1, "width": 16, "scale": "n"}


def test_unknown_preset_lists_the_presets(capsys, tmp_path):
    path = _write(tmp_path, SCALED)
    code = main(["check", path, "--set", "scale=xl", "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "<--set>:1:7: error: unknown scale 'xl'" in err
    assert "presets: n, s, m" in err and "^" in err


def test_unknown_default_preset_is_located_at_params_scale(capsys, tmp_path):
    path = _write(tmp_path, SCALED.replace("  scale: s\n", "  scale: xs\n"))
    code = main(["check", path, "--no-color"])
    err = capsys.readouterr().err
    assert code == 2
    heads = [(int(m["line"]), int(m["col"]), m["msg"]) for m in map(HEAD_RE.match, err.splitlines()) if m]
    assert heads == [(6, 10, "unknown scale 'xs': 'scale' selects one of the presets under 'scales:' "
                             "(did you mean 's'?)")], err


@pytest.mark.parametrize("preset, line, col, message", [
    ("  n: {depth: 1, widht: 16}\n", 8, 17, "scales.n: unknown parameter 'widht' (did you mean 'width'?)"),
    ("  n: {depth: one}\n", 8, 14, "scales.n.depth: expected an integer, got 'one'"),
    ("  n: {scale: s}\n", 8, 7, "scales.n: a preset cannot set 'scale'"),
    ("  2x: {depth: 1}\n", 8, 3, "scales: preset name: '2x' is not a valid name"),
])
def test_bad_presets_are_located(capsys, tmp_path, preset, line, col, message):
    path = _write(tmp_path, SCALED.replace("  n: {depth: 1, width: 16}\n", preset))
    code = main(["check", path, "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    heads = [(int(m["line"]), int(m["col"]), m["msg"]) for m in map(HEAD_RE.match, err.splitlines()) if m]
    assert any(h[:2] == (line, col) and h[2].startswith(message) for h in heads), err


def test_presets_change_the_built_model():
    small = specc.check(SCALED, scale="n")
    big = specc.check(SCALED, scale="s")
    assert small.params == 8 * 16 + 16 + 1 * (16 * 16 + 16)
    assert big.params == 8 * 32 + 32 + 2 * (32 * 32 + 32)
