"""specs/dann.yaml (SEEDS.md row 10): the gradient that the domain loss sends into the feature extractor
is exactly -lambda_p times the plain one, the label path is untouched, and the deploy graph drops the
domain head (and the reversal with it) while the passes keep the reversal in the training graph.

The plain gradient comes from the same spec with the reversal removed (`f_rev = f`), built by specc and
loaded with the same weights. Tolerances (float64): with lambda_p a power of two the reversed gradient
equals -lambda_p times the plain one bit for bit (scaling by a power of two is exact through every
backward op); with the scheduled values lambda_p = 2/(1+exp(-10p)) - 1 it agrees to relative error
<= 1e-12 (float64 rounding of the scaled backward).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

NAME = "dann"
REL = 1e-12


def models(zoo):
    text = zoo.spec(NAME).read_text()
    plain_text = text.replace("grad_reverse(f, lambda_p)", "f")
    assert plain_text != text
    rev = specc.load(zoo.spec(NAME), opt_level=0).double()
    plain = specc.load(plain_text, opt_level=0).double()
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def batch(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen),
            torch.randint(0, 2, (n,), generator=gen))


def domain_grads(model, lam):
    """Gradients of the domain loss w.r.t. every parameter, and the outputs."""
    x, _, d = batch()
    model.zero_grad()
    logits, domain = model(x, torch.tensor(lam, dtype=torch.float64))
    F.cross_entropy(domain, d).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logits, domain


@pytest.mark.parametrize("lam, exact", [(0.5, True), (1.0, True)]
                         + [(2 / (1 + math.exp(-10 * p)) - 1, False) for p in (0.05, 0.3, 0.9)])
def test_reversed_gradient_is_minus_lambda_times_the_plain_one(zoo, lam, exact):
    rev, plain = models(zoo)
    g, logits, domain = domain_grads(rev, lam)
    gp, logits_p, domain_p = domain_grads(plain, lam)
    assert torch.equal(logits, logits_p) and torch.equal(domain, domain_p)  # forward: identical
    extractor = [n for n in g if n.startswith("extractor.")]
    assert len(extractor) == 4 and not any(n.startswith("logits.") for n in g)  # the label head: no gradient
    for name in g:
        if name.startswith("domain."):  # behind the reversal: the plain gradient
            assert torch.equal(g[name], gp[name]), name
    for name in extractor:
        want = -lam * gp[name]
        assert want.abs().max() > 0, name
        if exact:
            assert torch.equal(g[name], want), name
        else:
            assert (g[name] - want).abs().max() <= REL * want.abs().max(), name


def test_label_loss_gradients_are_untouched(zoo):
    rev, plain = models(zoo)
    x, y, _ = batch(1)
    grads = []
    for m in (rev, plain):
        m.zero_grad()
        logits, _ = m(x, torch.tensor(0.7, dtype=torch.float64))
        F.cross_entropy(logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and not any(n.startswith("domain.") for n in grads[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def ir(zoo, **kw) -> str:
    graph, _ = optimize(specc.compile(zoo.spec(NAME)), PassContext(opt_level=2, **kw))
    return print_graph(graph, show_span=False)


def test_passes_keep_the_reversal_and_deploy_drops_the_domain_head(zoo, count_params):
    full, deploy = ir(zoo), ir(zoo, deploy=True)
    assert full.count("= grad_reverse(") == 1 and "domain=" in full
    assert "grad_reverse" not in deploy and "@domain" not in deploy and "domain=" not in deploy
    s = specc.check(zoo.spec(NAME))
    assert s.deploy is not None and s.deploy.params < s.params
    assert s.params - s.deploy.params == (32 * 32 + 32) + (2 * 32 + 2)  # the domain head's two layers
    # the -O2 training build still reverses the gradient: same extractor gradients as -O0 (float32 fusion)
    o2 = specc.load(zoo.spec(NAME), opt_level=2).double()
    o0 = specc.load(zoo.spec(NAME), opt_level=0).double()
    g2, _, _ = domain_grads(o2, 0.5)
    g0, _, _ = domain_grads(o0, 0.5)
    for name in g0:
        if name.startswith("extractor."):
            assert (g2[name] - g0[name]).abs().max() <= 1e-6 * g0[name].abs().max(), name


def test_cli_builds_training_and_deploy_graphs(zoo, tmp_path, count_params):
    out = zoo.build_cli(NAME, run=True)
    module, model = zoo.load_dir(out)
    assert "GradReverse.apply(f, lambda_p)" in (out / "model.py").read_text()
    x, lam = module.example_inputs()
    assert lam.shape == () and x.shape == (8, 2)
    logits, domain = model(x, lam)
    dep = specc.build(zoo.spec(NAME), tmp_path / "deploy", deploy=True)
    dmodule, dmodel = zoo.load_dir(dep)
    assert "GradReverse" not in (dep / "model.py").read_text()
    assert len(dmodule.example_inputs()) == 1  # the deploy model no longer takes lambda_p
    dmodel.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("domain.")})
    with torch.no_grad():
        out_d = dmodel(x)
    out_d = out_d[0] if isinstance(out_d, tuple) else out_d
    assert torch.equal(out_d, logits.detach())
    assert count_params(dmodel) < count_params(model)
