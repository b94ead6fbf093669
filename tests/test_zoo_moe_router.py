"""specs/moe_router.yaml (SEEDS.md row 22, MoE with enforced routing): at initialisation the MoE model
equals the dense model it is upcycled from, for any routing; the routing is exact (changing one expert
changes only the sequences routed to it); deploy builds drop the dense model.

Tolerance: the MoE and dense outputs of the generated model in float64: max abs error <= 1e-12 (the
same products, batched per expert instead of all at once); the untouched sequences after changing
one expert: exactly equal.
"""

from __future__ import annotations

import torch

import specc
from conftest import SPECS

SPEC = SPECS / "moe_router.yaml"
TOL = 1e-12
EXPERTS, VOCAB, D = 4, 100, 32


def batch(seed: int, b: int = 6, t: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=gen), torch.randint(0, EXPERTS, (b,), generator=gen)


def test_at_initialisation_the_moe_equals_the_dense_model_for_any_routing(zoo):
    _, model = zoo.load_dir(zoo.build_api("moe_router"))
    model = model.double()
    for seed in range(4):
        ids, domain = batch(seed)
        with torch.no_grad():
            moe, dense = model(ids, domain)
            for e in range(EXPERTS):  # every sequence sent to one expert
                moe_e, dense_e = model(ids, torch.full_like(domain, e))
                assert (moe_e - dense).abs().max().item() <= TOL and torch.equal(dense_e, dense)
        assert moe.shape == (6, D) and (moe - dense).abs().max().item() <= TOL
        assert dense.abs().max().item() > 0.1


def test_routing_is_enforced(zoo):
    """Change expert 2 of the last layer: exactly the sequences of domain 2 change."""
    _, model = zoo.load_dir(zoo.build_api("moe_router"))
    model = model.double()
    ids, _ = batch(9)
    domain = torch.tensor([0, 2, 1, 2, 3, 0])
    with torch.no_grad():
        before, _ = model(ids, domain)
        w = model.block[1].moe_mlp.fc2.weight
        w[2] += torch.randn(w[2].shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
        after, dense = model(ids, domain)
    changed = (after - before).abs().amax(dim=1) > 1e-3
    assert changed.tolist() == [False, True, False, True, False, False]
    assert torch.equal(after[~changed], before[~changed])
    assert (after[changed] - dense[changed]).abs().max().item() > 1e-3


def test_experts_are_copies_of_the_dense_mlp_with_storage_of_their_own(zoo):
    out = zoo.build_api("moe_router", opt_level=0)
    w = zoo.weights(out)
    for layer in range(2):
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            experts, dense = w[f"block.{layer}.moe_mlp.{name}"], w[f"block.{layer}.dense.{name}"]
            assert experts.shape == (EXPERTS,) + dense.shape
            assert all(torch.equal(experts[e], dense) for e in range(EXPERTS))
    module, _ = zoo.load_dir(out)
    assert not any("moe_mlp" in name for name in module.TIED)  # copies, not ties (the dense path's norms
    assert "block.0.attention.q.weight" in module.TIED          # and attention are ties)


def test_deploy_keeps_only_the_moe_model(zoo):
    s = specc.check(SPEC)
    dense_mlps = 2 * (64 * 32 + 64 + 32 * 64 + 32)
    assert s.deploy.params == s.params - dense_mlps
    _, model = zoo.load_dir(zoo.build_api("moe_router", deploy=True))
    ids, domain = batch(3)
    _, full = zoo.load_dir(zoo.build_api("moe_router"))
    with torch.no_grad():
        got = model(ids, domain)
        want, _ = full(ids, domain)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_cli_builds_and_runs(zoo):
    out = zoo.build_cli("moe_router", run=True)
    assert "RoutedMLP(32, 64, experts=4)" in (out / "model.py").read_text()
    assert zoo.manifest(out)["parameter_count"] == specc.check(SPEC).params
