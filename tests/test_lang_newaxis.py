"""New axes in indexing: x[:, None], x[None], x[0, None], x[:, 1:3, None] add dimensions of size 1 (an
`unsqueeze` node each, after a getitem when the index also selects), as in numpy and torch; pairwise
comparisons read as q[:, :, None] == k[:, None, :]. `...` stands for the whole dimensions the other
indices leave (x[..., 0]). Misuse is a located error.

Tolerance: none needed; new axes move no values, so results are compared exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, close, inputs64, load64, output_types, spec_text


spec = functools.partial(spec_text, dims="B: {example: 2, min: 2}, T: {example: 5, min: 3}")  # x[0], x[:, 1:3] need them

types = output_types


def test_unsqueeze_and_new_axis_indexing():
    text = spec("x: 'f32[B, T]'", "a = x[:, None]\nb = x[None]\nc = x[:, :, None]\nd = x[0, None]\n"
                "e = x[:, 1:3, None]\nf = unsqueeze(x, -1)\ng = x[None, :, None]", outputs="a b c d e f g")
    model = load64(text)
    (x,) = inputs64(model)
    with torch.no_grad():
        got = model(x)
    want = (x[:, None], x[None], x[:, :, None], x[0, None], x[:, 1:3, None], x.unsqueeze(-1), x[None, :, None])
    for g, w in zip(got, want):
        close(g, w)
    assert types(text) == ["f32[B, 1, T]", "f32[1, B, T]", "f32[B, T, 1]", "f32[1, T]", "f32[B, 2, 1]",
                           "f32[B, T, 1]", "f32[1, B, 1, T]"]


def test_pairwise_comparison_with_new_axes_reads_like_torch(tmp_path):
    text = spec("n: 'i64[B, T]'", "y = n[:, :, None] == n[:, None, :]")
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "n.unsqueeze(2) == n.unsqueeze(1)" in src
    assert types(text) == ["bool[B, T, T]"]


def test_new_axis_errors():
    assert_error(spec("x: 'f32[B, T]'", "y = x[:, :, 0, None]"), 6, 7,
                 "index: too many indices (3, besides the new axes) for f32[B, T]")
    assert_error(spec("x: 'f32[B, T]'", "y = x[:, 1.5]"), 6, 12,
                 "indices must be integers (or none for a new axis), got the number 1.5")
    assert_error(spec("x: 'f32[B, 4]'", "y = x[:, 7, None]"), 6, 12,
                 "index: 7 is out of range for dimension 1 of size 4")
    assert_error(spec("x: 'f32[B, T]'", "y = x[None] + x[:, :, None]"), 6, 17,
                 "add: cannot broadcast f32[1, B, T] with f32[B, T, 1]: dimension -2 is B vs T")


def test_new_axes_keep_value_ranges():
    assert types(spec("n: 'i64[B, T] in range(7)'", "y = n[:, None]")) == ["i64[B, 1, T] in range(7)"]


ELLIPSIS = "a = x[..., 0]\nb = x[1, ...]\nc = x[..., None]\nd = x[:, ..., 1:3]\ne = x[...]\nf = x[..., None, 2]"


def test_ellipsis_indexing_is_torchs():
    """x[..., 0] and the like index as torch does, at every level and on tvm-llvm (values move, exactly)."""
    text = spec("x: 'f32[B, T, 4]'", ELLIPSIS, outputs="a b c d e f")
    assert types(text) == ["f32[B, T]", "f32[T, 4]", "f32[B, T, 4, 1]", "f32[B, T, 2]", "f32[B, T, 4]",
                           "f32[B, T, 1]"]
    for level in (0, 2):
        model = load64(text, level)
        (x,) = inputs64(model)
        with torch.no_grad():
            got = model(x)
        want = (x[..., 0], x[1, ...], x[..., None], x[:, ..., 1:3], x[...], x[..., None, 2])
        for g, w in zip(got, want):
            close(g, w)
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    x = torch.randn(3, 5, 4)
    got = compile_graph(specc.compile(text), weights={})(x)
    want = (x[..., 0], x[1, ...], x[..., None], x[:, ..., 1:3], x[...], x[..., None, 2])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_ellipsis_errors():
    assert_error(spec("x: 'f32[B, T]'", "y = x[..., 0, ...]"), 6, 17, "an index can have only one '...'")
    assert_error(spec("x: 'f32[B, T]'", "y = x[0, ..., 1, 2]"), 6, 7,
                 "index: too many indices (3, besides '...' and the new axes) for f32[B, T]")
