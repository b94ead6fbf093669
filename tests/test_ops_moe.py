"""moe_mlp (a mixture of MLP experts with given routing) and the init_from= call option (a layer that
starts as a copy of another layer's initial values, with storage of its own). The built module in float64
against a hand-written loop over tokens; init_from with seeded and given weights; located errors; FLOPs.

Tolerance: generated float64 module vs the float64 loop: max abs error <= 1e-12 (the same products,
batched differently); copies are compared exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specc
from opcheck import assert_error, flops_of

TOL = 1e-12
ACTS = {"gelu": F.gelu, "relu": F.relu}


def spec(inputs: str, graph: str, outputs: str = "y", params: str = "{d: 6, h: 5, E: 3}") -> str:
    """A spec whose graph body starts on line 7, at column 3."""
    body = "".join("  " + ln + "\n" for ln in graph.strip("\n").splitlines())
    outs = "".join(f"  {o}:\n" for o in outputs.split())
    return (f"specc: 1\nname: m\nparams: {params}\ninputs: {{{inputs}}}\ndims: {{B: 2, T: 5}}\ngraph: |\n{body}"
            f"outputs:\n{outs}")


def loop(x, route, w, prefix, act, bias=True):
    """y[b, t] = expert route[b, t] applied to x[b, t], one token at a time."""
    y = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            e = int(route[b, t])
            h = w[prefix + "fc1.weight"][e] @ x[b, t] + (w[prefix + "fc1.bias"][e] if bias else 0)
            y.append(w[prefix + "fc2.weight"][e] @ ACTS[act](h) + (w[prefix + "fc2.bias"][e] if bias else 0))
    return torch.stack(y).reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("act, out, bias", [("gelu", None, True), ("relu", 4, False)])
def test_each_token_goes_through_its_expert(act, out, bias):
    extra = (f", out={out}" if out else "") + (", bias=false" if not bias else "") + f", act={act}"
    text = spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'", f"y = moe_mlp(x, r, E, h{extra})")
    model = specc.load(text).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # distinct experts (the seeded ones already differ; make it obvious)
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    w = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    for route in (torch.randint(0, 3, (2, 5), generator=gen), torch.full((2, 5), 2), torch.tensor([[0] * 5, [1] * 5])):
        with torch.no_grad():
            got = model(x, route)
        assert got.shape == (2, 5, out or 6)
        assert (got - loop(x, route, w, "y.", act, bias)).abs().max().item() <= TOL
    assert w["y.fc1.weight"].shape == (3, 5, 6) and w["y.fc2.weight"].shape == (3, out or 6, 5)


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
            assert torch.equal(w[f"again.{name}"][e], w[f"dense.{name}"])  # a copy of a copy copies the original
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


def test_moe_and_init_from_errors():
    x_r = "x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'"
    assert_error(spec("x: 'f32[B, T, d]', r: 'i64[B]'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route i64[B] must have the shape of x f32[B, T, 6] without its last dimension, [B, T]: "
                 "one expert number per token")
    assert_error(spec("x: 'f32[B, T, d]', r: 'f32[B, T]'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route must be an integer tensor of expert numbers, got f32[B, T]")
    assert_error(spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(5)'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route takes values in range(0, 5), outside the 3 experts")
    assert_error(spec(x_r, "y = moe_mlp(x, r, 0, h)"), 7, 21, "moe_mlp: experts must be positive, got 0")
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


def test_moe_flops_are_those_of_one_mlp_per_token():
    text = spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'", "y = moe_mlp(x, r, E, h) + mlp(x, h)")
    for b in (2, 7):
        assert flops_of(text, "moe_mlp", B=b) == flops_of(text, "mlp", B=b) == 2 * b * 5 * (6 * 5 + 5 * 6) + 9 * b * 5 * 5
