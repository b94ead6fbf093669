"""Mixture-of-experts operators: one MLP per expert, each token routed to one expert.

moe_mlp is the enforced-routing MoE of SEEDS.md row 22: the route of every token is given (e.g. a
domain label input) rather than computed by a gate, so exactly one expert runs per token. Its
parameters are the MLP's, stacked along a leading experts dimension; with the call option
`init_from=v` (v computed by an `mlp`) every expert starts as a copy of that dense MLP (MoE
upcycling: at initialisation the MoE equals the dense model for any routing).
"""

from __future__ import annotations

from .ops import ACTIVATIONS, fixed_width, need_float, need_rank, product, shape_str
from .dims import fmt
from .ir import INT_DTYPES, TensorType
from .registry import Arg, OpCall, OpError, op, param, uniform_fan_in

T = TensorType


def _moe_params(c: OpCall):
    x = c.t("x")
    d = fixed_width(x.shape[-1], "moe_mlp", "input width (last dimension of x)")
    e, hidden, out = c.a("experts"), c.a("hidden"), c.a("out") or d
    ps = [param("fc1.weight", (e, hidden, d), uniform_fan_in(d), op="moe_mlp", arg="hidden")]
    if c.a("bias"):
        ps.append(param("fc1.bias", (e, hidden), uniform_fan_in(d), op="moe_mlp", arg="hidden"))
    ps.append(param("fc2.weight", (e, out, hidden), uniform_fan_in(hidden), op="moe_mlp", arg="hidden"))
    if c.a("bias"):
        ps.append(param("fc2.bias", (e, out), uniform_fan_in(hidden), op="moe_mlp", arg="hidden"))
    return ps


def _moe_flops(c: OpCall, outs):
    x = c.t("x")  # one expert per token: the FLOPs of one MLP
    rows = product(x.shape[:-1])
    hidden, out = c.a("hidden"), outs[0].shape[-1]
    return 2 * rows * x.shape[-1] * hidden + 2 * rows * hidden * out + 9 * rows * hidden


@op("moe_mlp", Arg("x", "tensor"), Arg("route", "tensor"), Arg("experts", "int"), Arg("hidden", "int"),
    Arg("out", "int", None), Arg("act", "op", "gelu", ACTIVATIONS), Arg("bias", "bool", True),
    params=_moe_params, flops=_moe_flops, category="layer")
def _moe_mlp(c: OpCall):
    """moe_mlp(x, route, experts, hidden, out=width of x, act=gelu, bias=true): `experts` MLPs (linear -> act
    -> linear); the token x[..., :] goes through the expert route[...] (integers in range(experts), of x's
    shape without its last dimension). act: as mlp's (relu, gelu, silu, tanh, sigmoid, softplus, leaky_relu,
    elu, hardswish, mish or identity, at their default arguments). Parameters fc1/fc2 weight and bias, one
    slice per expert, e.g. fc1.weight [experts, hidden, d]. init_from=v starts every expert as a copy of the
    mlp that computed v."""
    x, route = c.t("x"), c.t("route")
    need_float(x, "moe_mlp")
    need_rank(x, 1, "moe_mlp")
    d = fixed_width(x.shape[-1], "moe_mlp", "input width (last dimension of x)")
    e = c.a("experts")
    if e <= 0:
        raise OpError(f"moe_mlp: experts must be positive, got {e}", "experts")
    if c.a("hidden") <= 0:
        raise OpError(f"moe_mlp: hidden must be positive, got {c.a('hidden')}", "hidden")
    if c.a("out") is not None and c.a("out") <= 0:
        raise OpError(f"moe_mlp: out must be positive, got {c.a('out')}", "out")
    if route.dtype not in INT_DTYPES:
        raise OpError(f"moe_mlp: route must be an integer tensor of expert numbers, got {shape_str(route)}", "route")
    if route.shape != x.shape[:-1]:
        raise OpError(f"moe_mlp: route {shape_str(route)} must have the shape of x {shape_str(x)} without its last "
                      f"dimension, [{', '.join(fmt(s) for s in x.shape[:-1])}]: one expert number per token", "route")
    if route.value_range is None:  # an expert number outside range(experts) would pick no expert (or read
        # past the last one): the values must be known to be expert numbers
        raise OpError(f"moe_mlp: the values of route {shape_str(route)} are not known to be expert numbers; "
                      f"declare them, e.g. `route: {route.dtype}[...] in range({e})` for an input, or compute "
                      f"them with an op that keeps a range (argmax, one of a ranged input)", "route")
    if route.value_range[0] < 0 or route.value_range[1] > e:
        lo, hi = route.value_range
        raise OpError(f"moe_mlp: route takes values in range({lo}, {hi}), outside the {e} experts", "route")
    return T(x.dtype, x.shape[:-1] + (c.a("out") or d,))
