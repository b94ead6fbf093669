"""specs/memoryformer.yaml (SEEDS.md row 2): a causal decoder whose projections are MemoryLayers.

- The gather equals the dense product: a MemoryLayer built from the spec's own `memory` block gives
  sum_k p_k one_hot(code_k) @ Table_k + b, with code_k = bits(z_k >= 0) and p_k the softmax weight of the
  chosen bucket computed densely over all 2**tau sign vectors (not the spec's factorised form).
- The whole model equals a hand-written float64 reference that uses that dense form in every layer.
- FLOPs (specc check): a MemoryLayer costs a small fraction of the dense linear layer it replaces
  (1/tau for the gather, plus the hashing): 0.18 of it at d=128 and 0.13 at d=1024 with tau=8.

Tolerances: generated float64 module vs float64 reference, max abs error <= 1e-10 (the same math in a
different order; the dense softmax and the factorised weights agree to float64 rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import specc

NAME = "memoryformer"
TOL = 1e-10
SPEC = Path(__file__).resolve().parents[1] / "specs" / f"{NAME}.yaml"


def layer_spec(d_in: int = 32, out: int = 24, tau: int = 4, temp: float = 0.7, body: str | None = None) -> str:
    """A spec with one MemoryLayer: the `memory` block of the zoo spec, or another body."""
    blocks = yaml.safe_load(SPEC.read_text())["blocks"]
    spec = {"specc": 1, "name": "memory_layer", "params": {"d": d_in, "out": out, "tau": tau, "temp": temp},
            "dims": {"B": 2, "T": 5}, "inputs": {"x": "f32[B, T, d]"},
            "blocks": {"memory(h, d_in, out)": blocks["memory(h, d_in, out)"]},
            "graph": body or "y = memory(x, d, out)\n", "outputs": {"y": "f32[B, T, out]"}}
    return yaml.safe_dump(spec, sort_keys=False)


def signs(tau: int) -> torch.Tensor:
    """All sign vectors s in {-1, 1}**tau, row c for bucket code c (bit j of c set <=> s_j = +1)."""
    c = torch.arange(2 ** tau)[:, None]
    return torch.where((c >> torch.arange(tau)) & 1 == 1, 1.0, -1.0).double()


def dense_memory(h, table, bias, tau, temp):
    """sum_k p_k one_hot(code_k) @ Table_k + b, with p_k the softmax over all 2**tau buckets."""
    *lead, d = h.shape
    k = d // tau
    z = h.reshape(*lead, k, tau)
    code = ((z >= 0).long() * 2 ** torch.arange(tau)).sum(-1)  # [..., K]
    probs = torch.softmax(z @ signs(tau).T / temp, dim=-1)      # [..., K, 2**tau]
    onehot = F.one_hot(code, 2 ** tau).double()
    weighted = onehot * probs                                    # p_k at code_k, 0 elsewhere
    return torch.einsum("...kc,kco->...o", weighted, table.reshape(k, 2 ** tau, -1)) + bias


def test_gather_equals_the_dense_one_hot_product():
    for tau, temp in ((4, 0.7), (2, 1.0)):
        model = specc.load(layer_spec(tau=tau, temp=temp), opt_level=0).double()
        state = model.state_dict()
        table, bias = state["y.rows.weight"], state["y.parameter.weight"]
        bias.copy_(torch.randn_like(bias))
        assert table.shape == (32 // tau * 2 ** tau, 24)
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        x[0, 0, :3] = 0.0  # z = 0 hashes to bit 1
        with torch.no_grad():
            got = model(x)
        want = dense_memory(x, table, bias, tau, temp)
        assert (got - want).abs().max() <= TOL


def test_layer_flops_far_below_the_dense_linear():
    ratios = []
    for d in (128, 1024):
        mem = specc.check(layer_spec(d_in=d, out=d, tau=8, temp=1.0)).example_flops
        dense = specc.check(layer_spec(d_in=d, out=d, tau=8, temp=1.0, body="y = linear(x, out)\n")).example_flops
        ratios.append(mem / dense)
    assert ratios[0] < 0.25 and ratios[1] < 1 / 7 and ratios[1] > 1 / 8  # tends to 1/tau from above


def layer_norm(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def reference(state, idx, p):
    """The decoder written out: dense MemoryLayers, causal softmax attention, pre-norm, tied head."""
    b, t = idx.shape
    d, nh, tau, temp = p["d_model"], p["heads"], p["tau"], p["temp"]

    def ln(x, name):
        return layer_norm(x) * state[f"{name}.weight"] + state[f"{name}.bias"]

    def mem(x, name):
        return dense_memory(x, state[f"{name}.rows.weight"], state[f"{name}.parameter.weight"], tau, temp)

    def heads(z):
        return z.reshape(b, t, nh, d // nh).permute(0, 2, 1, 3)

    x = state["tok.weight"][idx] + state["pos.weight"][:t]
    for i in range(p["layers"]):
        pre = f"h.{i}"
        h = ln(x, f"{pre}.h")
        q, k, v = (heads(mem(h, f"{pre}.{n}")) for n in "qkv")
        s = q @ k.transpose(-1, -2) / math.sqrt(d // nh)
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        a = (torch.softmax(s, -1) @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        x = x + mem(a, f"{pre}.o")
        up = mem(ln(x, f"{pre}.layer_norm"), f"{pre}.up")
        x = x + mem(ln(up, f"{pre}.layer_norm_1"), f"{pre}.down")
    return ln(x, "layer_norm") @ state["tok.weight"].T


def test_model_equals_the_dense_reference(zoo, perturb):
    overrides = dict(d_model=32, tau=4, heads=2, layers=2)
    model = specc.load(SPEC, opt_level=0, **overrides).double()
    model.load_state_dict(perturb(model.state_dict()))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    params = yaml.safe_load(SPEC.read_text())["params"] | overrides
    with torch.no_grad():
        got = model(idx)
    assert (got - reference(state, idx, params)).abs().max() <= TOL


def test_cli_builds_and_runs(zoo):
    out = zoo.build_cli(NAME, "d_model=64", run=True)
    module, model = zoo.load_dir(out)
    with torch.no_grad():
        assert model(*module.example_inputs()).shape == (2, 16, 64)
