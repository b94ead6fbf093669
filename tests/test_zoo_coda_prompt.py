"""specs/coda_prompt.yaml (SEEDS.md row 21): CODA-Prompt on a tiny frozen vision transformer.

- The exact check of the row: the components of earlier tasks (P, K and A rows of `old`) and the
  frozen encoder get no gradient (requires_grad off, .grad stays None, an AdamW step leaves them
  bit-identical), while this task's components and the classifier get a non-zero one; and the loss does
  depend on the frozen components (with gradients on, each gets a non-zero one).
- The prompt each layer receives equals the CODA code's computation written by hand in float64
  (alpha = <normalize(q * A_m), normalize(K_m)>, P = einsum('bk,kld->bld', alpha, P), keys = the first
  Lp/2 rows, values the last), with q the frozen encoder's pooled output without prompts; and the logits
  equal a hand-written float64 forward pass whose attention is written out per head.

Tolerances: generated float64 vs the float64 reference <= 1e-10 (the same math, differently ordered).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import specc

NAME = "coda_prompt"
D, HEADS, OLD, NEW, LP, PATCH = 32, 4, 6, 2, 8, 4
#: per prompted layer: P, K, A of the earlier tasks (frozen), then those of this task, in spec order
OLD_NEW = {"parameter": "P_old", "parameter_1": "P_new", "parameter_2": "K_old", "parameter_3": "K_new",
           "parameter_4": "A_old", "parameter_5": "A_new"}
LAYERS = 2
PROMPTED = tuple(f"h.{i}" for i in range(LAYERS))  # the prompted pass's steps; step i shares g.i's layer


@pytest.fixture(scope="module")
def built(zoo):
    return zoo.build_api(NAME)


def images(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# a hand-written float64 reference
# ---------------------------------------------------------------------------------------------

def layer_norm(x, w, prefix, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w[prefix + ".weight"] \
        + w[prefix + ".bias"]


def lin(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def attention(x, w, prefix, pk=None, pv=None):
    q, k, v = lin(x, w, prefix + ".q"), lin(x, w, prefix + ".k"), lin(x, w, prefix + ".v")
    if pk is not None:
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
    dh = D // HEADS
    out = torch.zeros_like(q)
    for h in range(HEADS):
        c = slice(h * dh, (h + 1) * dh)
        out[..., c] = torch.softmax(q[..., c] @ k[..., c].transpose(1, 2) / math.sqrt(dh), dim=-1) @ v[..., c]
    return lin(out, w, prefix + ".o")


def layer(h, w, g, pk=None, pv=None):
    h = h + attention(layer_norm(h, w, g + ".ln1"), w, g + ".att", pk, pv)
    return h + lin(F.gelu(lin(layer_norm(h, w, g + ".ln2"), w, g + ".ffn.fc1")), w, g + ".ffn.fc2")


def coda_prompt(q, w, g):
    """The CODA-Prompt code's computation for one layer: (prefix keys, prefix values), each [B, Lp/2, d]."""
    P, K, A = (torch.cat([w[f"{g}.components.{old}.weight"], w[f"{g}.components.{new}.weight"]])
               for old, new in (("parameter", "parameter_1"), ("parameter_2", "parameter_3"),
                                ("parameter_4", "parameter_5")))
    a_query = torch.einsum("bd,kd->bkd", q, A)
    alpha = torch.einsum("bkd,kd->bk", F.normalize(a_query, dim=2), F.normalize(K, dim=1))
    prompt = torch.einsum("bk,kld->bld", alpha, P)
    return prompt[:, :LP // 2], prompt[:, LP // 2:]


def reference(x, w, layers=LAYERS):
    b = x.shape[0]
    cols = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)              # [B, 3, 4, 4, p, p]
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(b, 16, 3 * PATCH * PATCH)  # one row per patch, row-major
    tokens = cols @ w["patches.weight"].reshape(D, -1).T + w["patches.bias"] + w["parameter.weight"]
    g = tokens
    for i in range(layers):
        g = layer(g, w, f"g.{i}")
    q = layer_norm(g, w, "norm").mean(1)                                   # the query, without prompts
    prompts = [coda_prompt(q, w, f"h.{i}") for i in range(layers)]
    h = tokens
    for i, (pk, pv) in enumerate(prompts):
        h = layer(h, w, f"g.{i}", pk, pv)                                  # the query pass's layer i, shared
    return lin(layer_norm(h, w, "norm").mean(1), w, "logits"), prompts


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_prompts_and_logits_match_the_hand_written_computation(zoo, built, perturb):
    _, model = zoo.load_dir(built)
    model.load_state_dict(perturb(model.state_dict()))
    model = model.double()
    w = dict(model.state_dict())
    seen = {}
    for p in PROMPTED:
        model.get_submodule(p + ".att").register_forward_pre_hook(
            lambda mod, args, kwargs, p=p: seen.__setitem__(p, kwargs["prefix"]), with_kwargs=True)
    x = images(0)
    with torch.no_grad():
        got = model(x)
        want, prompts = reference(x, w)
    assert got.shape == (2, 10) and (got - want).abs().max().item() <= 1e-10
    for p, (pk, pv) in zip(PROMPTED, prompts):
        assert seen[p].shape == (2, 2, LP // 2, D)
        assert (seen[p][:, 0] - pk).abs().max().item() <= 1e-12 and (seen[p][:, 1] - pv).abs().max().item() <= 1e-12


def test_frozen_components_get_zero_gradient(zoo, built):
    _, model = zoo.load_dir(built)
    model.train()
    params = dict(model.named_parameters())
    trainable = {f"{p}.components.{n}.weight" for p in PROMPTED for n, role in OLD_NEW.items() if role.endswith("new")}
    trainable |= {"logits.weight", "logits.bias"}
    old = {f"{p}.components.{n}.weight" for p in PROMPTED for n, role in OLD_NEW.items() if role.endswith("old")}
    assert {n for n, p in params.items() if p.requires_grad} == trainable
    assert old <= set(params) and params["h.0.components.parameter.weight"].shape == (OLD, LP, D)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, labels = images(1).float(), torch.tensor([3, 7])
    F.cross_entropy(model(x), labels).backward()
    for name, p in params.items():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name]) == (name not in trainable), name
    # the loss does depend on the earlier tasks' components: with gradients on, each gets a non-zero one
    frozen_components = [params[n] for n in sorted(old)]
    for p in frozen_components:
        p.requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(model(x), labels), frozen_components)
    assert all(g.abs().max() > 0 for g in grads)
    assert sum(params[n].numel() for n in trainable) == specc.check(zoo.spec(NAME)).trainable_params


def test_cli_builds_and_runs_it(zoo):
    out = zoo.build_cli(NAME, run=True)
    assert zoo.manifest(out)["parameter_count"] == specc.check(zoo.spec(NAME)).params


@pytest.mark.parametrize("layers", [1, 3])
def test_any_number_of_layers_shares_the_query_pass_layers(perturb, layers):
    """layers= is a param: the prompted pass's step i reuses the query pass's layer i (repeat's share=g),
    so the encoder's parameters exist once, and the logits equal the reference with that many layers."""
    model = specc.load(zoo_spec(), opt_level=0, layers=layers)
    model.load_state_dict(perturb(model.state_dict()))
    model = model.double()
    names = {n for n, _ in model.named_parameters()}
    assert {n.split(".")[0] for n in names} == {"patches", "parameter", "g", "norm", "h", "logits"}
    assert not any(n.startswith("h.") and not n.startswith(tuple(f"h.{i}.components." for i in range(layers)))
                   for n in names)  # the prompted steps own only their components
    summary = specc.check(zoo_spec(), layers=layers)
    assert summary.trainable_params == layers * NEW * (LP * D + 2 * D) + 10 * D + 10
    x = images(3)
    with torch.no_grad():
        got = model(x)
        want, _ = reference(x, dict(model.state_dict()), layers)
    assert (got - want).abs().max().item() <= 1e-10


def zoo_spec():
    from conftest import SPECS
    return SPECS / f"{NAME}.yaml"
