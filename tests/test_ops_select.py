"""Selection and indexing: amax/amin, argmax, gather, unsqueeze (written x[:, None] in specs: see
tests/test_lang_newaxis.py). Built specs
are compared in float64 with direct torch calls; value ranges of integer results; located shape-rule
errors; FLOPs (one comparison per input element for the reductions, none for gather and unsqueeze).

Tolerance: none needed; these ops select values without arithmetic, so results are compared exactly.
"""

from __future__ import annotations

import functools

import torch

from opcheck import assert_error, close, flops_of, inputs64, load64, output_types, spec_text


spec = functools.partial(spec_text, dims="B: 2, T: 5")

types = output_types


def test_amax_amin_equal_torch():
    text = spec("x: 'f32[B, T, 4]', n: 'i64[B, T] in range(9)'",
                "a = amax(x)\nb = amax(x, dim=-1)\nc = amin(x, dim=[0, 2], keepdim=true)\nd = amax(n, dim=1)\n"
                "e = amax(x, keepdim=true)", outputs="a b c d e")
    model = load64(text)
    x, n = inputs64(model)
    with torch.no_grad():
        got = model(x, n)
    want = (x.amax(), x.amax(-1), x.amin(dim=(0, 2), keepdim=True), n.amax(1), x.amax(dim=(0, 1, 2), keepdim=True))
    for g, w in zip(got, want):
        close(g, w)
    assert types(text) == ["f32[]", "f32[B, T]", "f32[1, T, 1]", "i64[B] in range(9)", "f32[1, 1, 1]"]


def test_argmax_is_a_categorical_value():
    text = spec("x: 'f32[B, T, 6]'", "i = argmax(x)\nj = argmax(x, dim=1, keepdim=true)\nh = one_hot(argmax(x), 6)",
                outputs="i j h")
    model = load64(text)
    (x,) = inputs64(model)
    with torch.no_grad():
        i, j, h = model(x)
    close(i, x.argmax(-1))
    close(j, x.argmax(1, keepdim=True))
    close(h, torch.nn.functional.one_hot(x.argmax(-1), 6).to(h.dtype))  # one_hot: the default dtype
    assert types(text) == ["i64[B, T] in range(6)", "i64[B, 1, 6]", "f32[B, T, 6]"]
    # along a symbolic dimension the range comes from the dimension's bound, when it has one
    bounded = spec("x: 'f32[B, T]'", "y = argmax(x)").replace("T: 5", "T: {example: 5, max: 32}")
    assert types(bounded) == ["i64[B] in range(32)"]


def test_gather_reads_values_at_given_positions():
    text = spec("x: 'f32[B, T, 3]', n: 'i64[B, T] in range(7)', j: 'i64[B, T] in range(5)'",
                "y = gather(n, j, dim=1)\nz = gather(x, j[:, :, None] + zeros(B, T, 3, dtype=i64), dim=1)",
                outputs="y z")
    model = load64(text)
    x, n, j = inputs64(model)
    with torch.no_grad():
        y, z = model(x, n, j)
    close(y, torch.gather(n, 1, j))
    close(z, torch.gather(x, 1, j[:, :, None].expand(2, 5, 3)))
    assert types(text)[0] == "i64[B, T] in range(7)"  # the values of n


def test_selection_errors():
    assert_error(spec("m: 'bool[B, T]'", "y = amax(m)"), 6, 12,
                 "amax: x bool[B, T] is bool; cast it to an integer or float dtype first")
    assert_error(spec("x: 'f32[B, T]'", "y = amax(x, dim=[1, -1])"), 6, 15,
                 "amax: repeated dimension in [1, -1]")
    assert_error(spec("x: 'f32[B, T]'", "y = argmax(x, dim=2)"), 6, 17,
                 "argmax: dimension 2 is out of range for a rank-2 tensor")
    assert_error(spec("x: 'f32[B, T]', j: 'f32[B, T]'", "y = gather(x, j, dim=1)"), 6, 17,
                 "gather: index must be an integer tensor, got f32[B, T]")
    assert_error(spec("x: 'f32[B, T]', j: 'i64[T]'", "y = gather(x, j, dim=1)"), 6, 17,
                 "gather: index i64[T] must have the rank of x f32[B, T] (1 vs 2)")
    assert_error(spec("x: 'f32[B, T, 3]', j: 'i64[B, T, 4]'", "y = gather(x, j, dim=1)"), 6, 17,
                 "gather: index i64[B, T, 4] does not fit x f32[B, T, 3]: dimension 2 is 4 vs 3 (only dimension 1, "
                 "the one gathered along, may differ)")
    assert_error(spec("x: 'f32[B, 3]', j: 'i64[B, 2] in range(4)'", "y = gather(x, j)"), 6, 17,
                 "gather: index takes values in range(4), outside dimension 1 of x f32[B, 3] (size 3)")
    assert_error(spec("x: 'f32[B, T]'", "y = unsqueeze(x, 3)"), 6, 20,
                 "unsqueeze: position 3 is out of range for a new dimension of f32[B, T] (from -3 to 2)")


def test_selection_flops():
    text = spec("x: 'f32[B, T, 4]', j: 'i64[B, T, 4] in range(5)'",
                "y = amax(x, dim=-1) + cast(argmax(x), f32) + amin(x, dim=-1)\nz = gather(x, j, dim=1)[:, None]",
                outputs="y z")
    for b in (2, 5):
        assert flops_of(text, "amax", B=b) == flops_of(text, "argmax", B=b) == b * 5 * 4
        assert flops_of(text, "gather", B=b) == flops_of(text, "unsqueeze", B=b) == 0
