"""mlp's and moe_mlp's act= beyond relu/gelu/silu/tanh/sigmoid: softplus, leaky_relu, elu, hardswish, mish,
each as the op of that name computes it with its default arguments.

References: a float64 F.linear -> torch activation -> F.linear on the built module's weights, within
tests/opcheck.TOL; the same spec's standalone ops (linear(act(linear(x)))) on copies of the mlp's weights,
equal; tvm-llvm (float32) against the float64 torch module, max abs error <= 1e-4 * max(1, max |oracle|)
(tests/test_tvm_ops.py's tolerance), nan where torch gives nan. The inputs are large enough that the
pre-activations cross softplus's threshold (20) and hardswish's knees (+-3) and reach well below 0.
Every backend's table of activations (the generated MLP and RoutedMLP helpers, the float64 evaluation of
a folded lookup chain, the Relax lowering) names exactly the compiler's ACTIVATIONS.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import specc
from opcheck import TOL, assert_error, spec_text

#: The activations added to mlp's act=, with their float64 references (torch's defaults: slope 0.01,
#: alpha 1, beta 1 and threshold 20).
NEW = {"softplus": F.softplus, "leaky_relu": F.leaky_relu, "elu": F.elu, "hardswish": F.hardswish, "mish": F.mish}

spec = functools.partial(spec_text, dims="B: 2, T: 5")

#: One mlp per new activation (with and without bias, out= on one), one spec.
MLPS = spec("x: 'f32[B, T, 6]'", "".join(
    f"m_{a} = mlp(x, hidden=7{', out=3' if a == 'leaky_relu' else ''}{', bias=false' if a == 'elu' else ''}, "
    f"act={a})\n" for a in NEW), " ".join(f"m_{a}" for a in NEW))


def inputs(b: int = 2, t: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 20.0 * torch.randn(b, t, 6, generator=gen, dtype=torch.float64)


def reference(x: torch.Tensor, w: dict[str, torch.Tensor], path: str, act) -> torch.Tensor:
    h = F.linear(x, w[f"{path}.fc1.weight"].double(), w.get(f"{path}.fc1.bias"))
    return F.linear(act(h), w[f"{path}.fc2.weight"].double(), w.get(f"{path}.fc2.bias"))


@pytest.mark.parametrize("opt_level", [0, 2])
def test_torch_mlp_matches_a_float64_reference(opt_level):
    model = specc.load(MLPS, opt_level=opt_level).double()
    w = {k: v.detach() for k, v in model.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        got = model(x)
    pre = F.linear(x, w["m_softplus.fc1.weight"], w["m_softplus.fc1.bias"])
    assert (pre > 20).any() and ((pre > -3) & (pre < 3)).any() and (pre < -3).any()  # every branch taken
    assert "m_elu.fc1.bias" not in w and got[1].shape == (2, 5, 3)
    for (act, ref), g in zip(NEW.items(), got):
        assert g.dtype == torch.float64
        err = (g - reference(x, w, f"m_{act}", ref)).abs().max().item()
        assert err <= TOL, f"-O{opt_level} act={act}: max abs error {err:.3g}"


@pytest.mark.parametrize("act", sorted(NEW))
def test_mlp_act_is_the_op_of_that_name_alone(act):
    """mlp(x, act=A) and linear(A(linear(x))) written out in the spec, on the same weights: equal."""
    text = spec("x: 'f32[B, T, 6]'", f"m = mlp(x, hidden=7, act={act})\nh = linear(x, 7)\nl = linear({act}(h), 6)",
                "m l")
    model = specc.load(text, opt_level=0).double()
    w = model.state_dict()
    model.load_state_dict({**w, "h.weight": w["m.fc1.weight"], "h.bias": w["m.fc1.bias"],
                           "l.weight": w["m.fc2.weight"], "l.bias": w["m.fc2.bias"]})
    with torch.no_grad():
        m, ll = model(inputs())
    assert torch.equal(m, ll), act


def test_moe_mlp_with_a_new_act():
    text = spec("x: 'f32[B, T, 6]', r: 'i64[B, T] in range(3)'", "y = moe_mlp(x, r, experts=3, hidden=5, act=mish)")
    model = specc.load(text).double()
    w = {k: v.detach() for k, v in model.state_dict().items()}
    x, gen = inputs(), torch.Generator().manual_seed(1)
    route = torch.randint(0, 3, (2, 5), generator=gen)
    with torch.no_grad():
        got = model(x, route)
    for b in range(2):
        for t in range(5):
            e = int(route[b, t])
            expert = {f"e.{k[2:]}": v[e] for k, v in w.items()}  # y.fc1.weight[e] -> e.fc1.weight
            want = reference(x[b, t], expert, "e", F.mish)
            assert (got[b, t] - want).abs().max().item() <= TOL


def test_an_act_that_is_not_an_activation_lists_them_all():
    assert_error(spec("x: 'f32[B, T, 6]'", "y = mlp(x, hidden=7, act=erf)"), 6, 24,
                 "mlp(): argument 'act' must be one of relu, gelu, silu, tanh, sigmoid, softplus, leaky_relu, elu, "
                 "hardswish, mish, identity, got erf")
    assert_error(spec("x: 'f32[B, T, 6]', r: 'i64[B, T] in range(2)'", "y = moe_mlp(x, r, 2, 4, act=sin)"), 6, 27,
                 "moe_mlp(): argument 'act' must be one of relu, gelu, silu, tanh, sigmoid, softplus, leaky_relu, "
                 "elu, hardswish, mish, identity, got sin")


def test_every_backend_knows_every_activation():
    from specc.backends.pytorch.lowering import HELPERS
    from specc.backends.pytorch.lowering_moe import HELPERS as MOE_HELPERS
    from specc.backends.pytorch.weights import _chain_step
    from specc.compiler.ops import ACTIVATIONS

    helpers: dict = {"torch": torch, "nn": torch.nn, "F": F}
    exec(HELPERS["MLP"], helpers)  # the text each generated model.py holds
    exec(MOE_HELPERS["RoutedMLP"], helpers)
    assert tuple(helpers["ACTIVATIONS"]) == ACTIVATIONS and tuple(helpers["RoutedMLP"].ACTS) == ACTIVATIONS
    x = torch.linspace(-25, 25, 12, dtype=torch.float64)[:, None].repeat(1, 2)
    eye = ("eye", 2)
    for act in ACTIVATIONS:  # a folded lookup chain's mlp step, in float64
        step = ("mlp", (("hidden", 2), ("act", act)), (("fc1.weight", eye), ("fc2.weight", eye)))
        want = helpers["ACTIVATIONS"][act](x)
        assert torch.equal(_chain_step(x, step, {}), want), act
    tvm = pytest.importorskip("specc.backends.tvm.lowering")
    assert set(tvm.ACTIVATIONS) | {"relu", "identity"} == set(ACTIVATIONS)


def test_tvm_llvm_matches_torch():
    """All five on tvm-llvm in one compile, and a moe_mlp with one of them; a nan token gives nan."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    text = MLPS.replace("outputs:\n", "  e = moe_mlp(x, r, experts=3, hidden=5, act=softplus)\noutputs:\n  e:\n") \
        .replace("inputs: {x: 'f32[B, T, 6]'}", "inputs: {x: 'f32[B, T, 6]', r: 'i64[B, T] in range(3)'}")
    graph = specc.compile(text)
    model = specc.load(text)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    runner = compile_graph(graph, weights={k: v.detach() for k, v in model.state_dict().items()})
    oracle = model.double()
    for seed, (b, t) in enumerate([(2, 5), (1, 3)]):
        x = inputs(b, t, seed)
        x[0, 0, 2] = float("nan")
        route = torch.randint(0, 3, (b, t), generator=gen)
        with torch.no_grad():
            want = oracle(x, route)
        got = runner(x.float(), route)
        for name, g, w in zip([*NEW, "moe"], got, want):
            what = f"tvm {name} at B={b}, T={t}"
            assert g.dtype == torch.float32 and g.shape == w.shape, what
            assert torch.equal(g.isnan(), w.isnan()) and w.isnan().any(), what
            ok = ~w.isnan()
            err = (g.double()[ok] - w[ok]).abs().max().item()
            assert err <= 1e-4 * max(1.0, w[ok].abs().max().item()), f"{what}: max abs error {err:.3g}"
