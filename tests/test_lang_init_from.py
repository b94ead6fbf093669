"""The init_from= call option: a layer whose parameters start as copies of the initial values of the
same-named parameters of another layer (the same shape, or the shape without a leading dimension: one
copy per expert of a moe_mlp upcycled from an mlp), with storage of its own (unlike share=). Seeded and
given (--weights) values are copied; misuse is a located error.

Tolerance: copies are compared exactly; outputs of a copied layer and its source in float64: max abs
error <= 1e-12 (the same products, batched per expert).
"""

from __future__ import annotations

import functools

import torch

import specc
from opcheck import assert_error, spec_text

TOL = 1e-12


spec = functools.partial(spec_text, dims="B: 2, T: 5", params="{d: 6, h: 5, E: 3}")

UPCYCLE = spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'",
               "dense = mlp(x, h)\nmoe = moe_mlp(x, r, E, h, init_from=dense)\nlin = linear(x, d)\n"
               "copy = linear(x, d, init_from=lin)\nagain = moe_mlp(x, r, E, h, init_from=moe)",
               outputs="dense moe lin copy again")


def test_init_from_copies_initial_values_into_separate_storage(tmp_path):
    out = specc.build(UPCYCLE, tmp_path / "o", opt_level=0)
    model = specc.load(UPCYCLE, opt_level=0)
    w = model.state_dict()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        for e in range(3):
            assert torch.equal(w[f"moe.{name}"][e], w[f"dense.{name}"])
            assert torch.equal(w[f"again.{name}"][e], w[f"dense.{name}"])  # a copy of a copy: the same values
    assert torch.equal(w["copy.weight"], w["lin.weight"]) and torch.equal(w["copy.bias"], w["lin.bias"])
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs) and "TIED = ()" in (out / "model.py").read_text()
    # so at initialisation the MoE equals the dense MLP for any routing
    x = torch.randn(2, 5, 6)
    for seed in range(3):
        r = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            dense, moe, lin, copy, again = model.double()(x.double(), r)
        assert (moe - dense).abs().max().item() <= TOL and (copy - lin).abs().max().item() <= TOL
    assert "copy(dense.fc1.weight)" in str(next(n for _, n in specc.compile(UPCYCLE).nodes()
                                                if n.path == ("moe",)).params[0].init)


def test_init_from_copies_given_weights():
    given = {"dense.fc1.weight": torch.full((5, 6), 0.25), "again.fc2.bias": torch.ones(3, 6)}
    w = specc.load(UPCYCLE, opt_level=0, weights=given).state_dict()
    assert torch.equal(w["moe.fc1.weight"], torch.full((3, 5, 6), 0.25))
    assert torch.equal(w["again.fc1.weight"], torch.full((3, 5, 6), 0.25))
    assert torch.equal(w["again.fc2.bias"], torch.ones(3, 6))  # given itself: not overwritten by the copy


def test_init_from_errors():
    x_r = "x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'"
    assert_error(spec(x_r, "a = relu(x)\ny = linear(x, d, init_from=a)"), 8, 20,
                 "init_from=: the value was computed by 'relu', which has no parameters to copy")
    assert_error(spec(x_r, "a = mlp(x, 4)\ny = moe_mlp(x, r, E, h, init_from=a)"), 8, 27,
                 "init_from=: this moe_mlp has parameter fc1.weight f32[3, 5, 6], but the mlp 'a' it copies has "
                 "fc1.weight f32[4, 6]; each parameter must match a same-named one of the same shape (or of the "
                 "shape without the first dimension)")
    assert_error(spec(x_r, "a = linear(x, d)\ny = linear(x, d, init_from=a, init=zeros)"), 8, 33,
                 "init= cannot be combined with init_from=: every parameter starts as a copy of the other layer's")
    assert_error(spec(x_r, "a = linear(x, d)\ny = linear(x, d, share=a, init_from=a)"), 8, 29,
                 "init_from= cannot be combined with share=: the parameters are those of the shared layer (set "
                 "init_from= there)")
    assert_error(spec(x_r, "y = linear(x, d, init_from=2)"), 7, 30,
                 "init_from= needs a value computed by a layer with parameters, got the integer 2")
    assert_error(spec(x_r, "y = relu(x, init_from=x)"), 7, 15,
                 "relu() owns no parameters, so 'init_from=' does not apply")


def test_init_from_with_frozen_and_inside_a_repeat():
    text = spec("x: 'f32[B, T, d]'", "base = linear(x, d)\nfrozen_copy = linear(x, d, init_from=base, frozen=true)\n"
                "y = repeat(2, layer, frozen_copy, src=base)", outputs="y").replace(
        "graph: |", "blocks:\n  layer(h, src): |\n    return linear(h, d, init_from=src)\ngraph: |")
    model = specc.load(text, opt_level=0)
    params = dict(model.named_parameters())
    assert not params["frozen_copy.weight"].requires_grad and params["y.0.linear.weight"].requires_grad
    for name in ("frozen_copy.weight", "y.0.linear.weight", "y.1.linear.weight"):
        assert torch.equal(params[name], params["base.weight"])
    assert specc.check(text).trainable_params == specc.check(text).params - 6 * 6 - 6


def test_a_copy_of_a_copy_copies_the_given_values_of_the_middle_layer():
    import torch

    import specc

    text = ("specc: 1\nname: cc\ninputs:\n  x: f32[2, 4]\ngraph: |\n  a = parameter(4)\n  b = parameter(4, init_from=a)\n"
            "  c = parameter(4, init_from=b)\n  y = x * a + x * b + x * c\noutputs:\n  y: f32[2, 4]\n")
    plain = specc.load(text).state_dict()
    assert torch.equal(plain["a.weight"], plain["b.weight"]) and torch.equal(plain["b.weight"], plain["c.weight"])
    given = specc.load(text, weights={"b.weight": torch.full((4,), 7.0)}).state_dict()
    assert torch.equal(given["c.weight"], torch.full((4,), 7.0)) and not torch.equal(given["a.weight"], given["c.weight"])
