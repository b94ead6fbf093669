"""Limits and rules found by reviewing the new operators: every one a located error at spec time,
never a long check, a wrong shape or an internal error at run time."""

from __future__ import annotations

import functools

import time

import pytest

import specc
from opcheck import only_error, spec_text


spec = functools.partial(spec_text, dims="B: 2, T: 5")


def test_many_new_axes_are_refused_quickly():
    text = spec("x: 'f32[B, 4]'", "y = sum(x[" + "none, " * 5000 + ":, :])")
    start = time.perf_counter()
    d = only_error(text)
    assert time.perf_counter() - start < 5.0
    assert (d.span.line, d.span.col) == (6, 11) and "5002 dimensions; at most 32" in d.message


def test_an_input_type_of_too_many_dimensions_is_refused_at_the_type():
    dims = ", ".join(["1"] * 40)
    d = only_error(spec(f"x: 'f32[{dims}]'", "y = relu(x)"))
    assert d.span.line == 3 and "40 dimensions; at most 32" in d.message  # the inputs: line


@pytest.mark.parametrize("op", ["sum", "mean", "amax", "amin"])
def test_an_empty_dimension_list_is_an_error_not_a_wrong_shape(op):
    d = only_error(spec("x: 'f32[B, 3, 4]'", f"y = {op}(x, dim=[])"))
    assert d.message == f"{op}: dim=[] names no dimension; leave dim out to reduce over all of them"


def test_moe_route_must_be_known_expert_numbers():
    d = only_error(spec("x: 'f32[B, T, 4]', r: 'i64[B, T]'", "y = moe_mlp(x, r, 3, 8)"))
    assert (d.span.line, d.span.col) == (6, 18) and "not known to be expert numbers" in d.message
    ok = spec("x: 'f32[B, T, 4]', r: 'i64[B, T] in range(3)'", "y = moe_mlp(x, r, 3, 8)")
    assert specc.check(ok).outputs[0].type.shape[-1] == 4


def test_integer_ranges_follow_add_sub_and_mul():
    text = spec("d: 'i64[B] in range(3)', e: 'i64[B] in range(2, 5)'",
                "y = d[:, None] + zeros(B, 3, dtype=i64)\ns = e - d\np = d * e\nf = d + cast(e, f32)",
                "y s p f")
    ranges = {o.name: o.type.value_range for o in specc.check(text).outputs}
    assert ranges == {"y": (0, 3), "s": (0, 5), "p": (0, 9), "f": None}
    # so a computed route reaches moe_mlp with its range, and one outside the experts is caught
    bad = spec("x: 'f32[B, 3, 4]', d: 'i64[B] in range(3)'",
               "y = moe_mlp(x, d[:, None] + ones(B, 3, dtype=i64), 3, 8)")
    assert "takes values in range(1, 4), outside the 3 experts" in only_error(bad).message


def test_narrow_integer_indices_work_in_gather_one_hot_and_embedding(tmp_path):
    """u8/i8/i32 ids: torch's gather and one_hot take only int64 (embedding int32 too), so the
    generated code widens them; the tvm-llvm build casts likewise."""
    import torch

    from specc.verify import verify

    text = spec("x: 'f32[B, 6]', a: 'u8[B, 6] in range(6)', b: 'i32[B, 6] in range(5)', c: 'i8[B, 6] in range(7)'",
                "y = gather(x, a, dim=1) + sum(one_hot(b, 5), dim=2) + sum(embedding(c, 7, 3), dim=2)")
    model = specc.load(text)
    x = torch.randn(2, 6)
    a = torch.tensor([[5, 0, 1, 2, 3, 4], [0, 0, 0, 5, 5, 5]], dtype=torch.uint8)
    b = torch.randint(0, 5, (2, 6), dtype=torch.int32)
    c = torch.randint(0, 7, (2, 6), dtype=torch.int8)
    with torch.no_grad():
        want = torch.gather(x, 1, a.long()) + 1.0 + model.embedding.weight[c.long()].sum(2)
        torch.testing.assert_close(model(x, a, b, c), want, rtol=1e-6, atol=1e-6)
    assert verify(text, examples=3).ok
    assert verify(text, examples=3, target="tvm-llvm").ok


def test_a_huge_rot90_count_is_its_remainder_of_four():
    import torch

    model = specc.load(spec("x: 'f32[B, 1, 3, 3]'", "y = rot90(x, 10000000000000000000001)"))
    x = torch.randn(2, 1, 3, 3)
    assert torch.equal(model(x), torch.rot90(x, 1, (2, 3)))


def test_an_infinite_reversal_strength_is_refused_but_infinite_mask_values_are_not():
    d = only_error(spec("x: 'f32[B, 4]'", "y = grad_reverse(x, -inf)"))
    assert (d.span.line, d.span.col) == (6, 23) and "must be a finite number, got -inf" in d.message
    assert specc.check(spec("x: 'f32[B, 4]'", "y = where(x > 0, x, -inf) + cast(x < inf, f32)")).outputs


def test_an_if_condition_must_be_a_boolean_in_values_and_initialisers():
    d = only_error(spec("x: 'f32[B, 4]'", "y = linear(x, 4 if 3 else 2)"))
    assert d.message == "the condition of 'if' must be a boolean computed from params, got the integer 3"
    d = only_error(spec("x: 'f32[B, 4]'", "y = linear(x, 4, init=zeros if 1.5 else ones)"))
    assert (d.span.line, d.span.col) == (6, 34) and d.message.startswith("the condition of 'if' must be a boolean")
    assert specc.check(spec("x: 'f32[B, 4]'", "y = linear(x, 4 if true else 2, init=zeros if false else ones)"))
