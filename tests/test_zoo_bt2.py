"""specs/bt2.yaml (SEEDS.md row 20): BT^2's basis transformation is orthonormal, B^T B = I, by
construction (products of Householder reflections), so it stays orthonormal under any training update
and keeps every distance; the built module equals a hand-written float64 BT^2; the recipe trains a
classifier whose first d_old embedding dims become compatible with the (frozen) old model's embedding.

The transform T maps u = [extra dims; scale * phi_new] (extra + d_new = 20 dims) to the output
embedding: phi_new is turned by B_p (d_new reflections), then the first d_old dims of [extra; B_p
phi_new] by B_old (d_old reflections). It is materialised from the built module by feeding the rows of
the identity through its own reflection blocks (`model.rotated`, `model.compatible`).

Tolerances (float64 throughout): every reflection is orthonormal in exact arithmetic, so B^T B = I,
distance preservation and the module against the reference hold to float64 rounding: max abs error
<= 1e-12 (measured about 1e-15 on values of order 1 to 10). The optimised build: no pass changes this
graph (-O2 gives the -O0 graph, the manifest lists no pass), and the -O2 module equals the reference to
the same 1e-12.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph
from specc.verify import verify

NAME = "bt2"
TOL = 1e-12
D_NEW, D_OLD, EXTRA, SCALE, CLASSES = 16, 8, 4, 3.0, 10
WIDTH = D_NEW + EXTRA
f64 = torch.float64


def load64(source, opt_level=0, **kw):
    return specc.load(source, opt_level=opt_level, **kw).double()


def images(seed=0, n=16):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=f64)


def transform(model, u):
    """T(u) through the built module's own reflection blocks: u = [extra; scale * phi_new] rows."""
    e, p = u[:, :EXTRA], u[:, EXTRA:]
    for layer in model.rotated:  # B_p
        p = layer(p)
    z = torch.cat([e, p], dim=1)
    c = z[:, :D_OLD]
    for layer in model.compatible:  # B_old on the first d_old dims
        c = layer(c)
    return torch.cat([c, z[:, D_OLD:]], dim=1)


def materialise(model):
    """The matrix of T: row i is T(e_i), i.e. M = B^T for T(u) = B u."""
    with torch.no_grad():
        return transform(model, torch.eye(WIDTH, dtype=f64))


def orthonormality_error(m):
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return max((m.T @ m - eye).abs().max().item(), (m @ m.T - eye).abs().max().item())


def householder_product(vs):
    """H_{n-1} ... H_1 H_0 with H = I - 2 v v^T / (v . v): the matrix of applying H_0 first."""
    n = vs[0].shape[0]
    out = torch.eye(n, dtype=f64)
    for v in vs:
        out = (torch.eye(n, dtype=f64) - 2 * torch.outer(v, v) / (v @ v)) @ out
    return out


def reference(sd, x):
    """BT^2 written out by hand in float64 (after the authors' ResNet_ortho.forward)."""
    sd = {k: v.double() for k, v in sd.items()}
    flat = x.reshape(x.shape[0], -1)
    h = F.relu(flat @ sd["h.fc1.weight"].T + sd["h.fc1.bias"]) @ sd["h.fc2.weight"].T + sd["h.fc2.bias"]
    phi_new = F.normalize(h[:, :D_NEW], dim=1, eps=0.0)
    logits = phi_new @ sd["logits.weight"].T
    branch = F.relu(h) @ sd["branch.weight"].T + sd["branch.bias"]
    extra = F.normalize(branch[:, :EXTRA], dim=1, eps=0.0)
    b_p = householder_product([sd[f"rotated.{i}.v.weight"] for i in range(D_NEW)])
    b_old = householder_product([sd[f"compatible.{i}.v.weight"] for i in range(D_OLD)])
    z = torch.cat([extra, SCALE * phi_new @ b_p.T], dim=1)
    emb = torch.cat([z[:, :D_OLD] @ b_old.T, z[:, D_OLD:]], dim=1)
    old = F.relu(flat @ sd["old.fc1.weight"].T + sd["old.fc1.bias"]) @ sd["old.fc2.weight"].T + sd["old.fc2.bias"]
    return emb, logits, old


def assert_matches_reference(model, seed=0):
    x = images(seed)
    with torch.no_grad():
        got = model(x)
    want = reference(model.state_dict(), x)
    assert [tuple(g.shape) for g in got] == [(16, WIDTH), (16, CLASSES), (16, D_OLD)]
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL


def test_module_equals_the_float64_reference(zoo):
    assert_matches_reference(load64(zoo.spec(NAME)))
    # perturbed weights: every v and layer of its own values
    model = load64(zoo.spec(NAME))
    gen = torch.Generator().manual_seed(3)
    model.load_state_dict({k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=f64)
                           for k, v in model.state_dict().items()})
    assert_matches_reference(model, seed=1)


def test_transform_is_orthonormal(zoo):
    model = load64(zoo.spec(NAME))
    m = materialise(model)
    assert orthonormality_error(m) <= TOL
    assert (m - torch.eye(WIDTH, dtype=f64)).abs().max() > 0.5  # not the identity
    # B_p and B_old each orthonormal, and T = blockdiag(B_old, I) blockdiag(I, B_p) (rows e_i -> T(e_i))
    b_p = householder_product([p.detach() for p in (layer.v.weight for layer in model.rotated)])
    b_old = householder_product([p.detach() for p in (layer.v.weight for layer in model.compatible)])
    assert orthonormality_error(b_p) <= TOL and orthonormality_error(b_old) <= TOL
    outer, inner = torch.eye(WIDTH, dtype=f64), torch.eye(WIDTH, dtype=f64)
    outer[:D_OLD, :D_OLD], inner[EXTRA:, EXTRA:] = b_old, b_p
    assert (m.T - outer @ inner).abs().max() <= TOL


def test_the_check_has_teeth(zoo):
    """A step that is not a reflection (1.5 instead of 2) is not orthonormal, and is caught."""
    text = zoo.spec(NAME).read_text()
    bad = text.replace("return z - 2 * sum(z * v", "return z - 1.5 * sum(z * v")
    assert bad.count("1.5 * sum") == 2
    assert orthonormality_error(materialise(load64(bad))) > 1e-3


def test_stays_orthonormal_after_large_learning_rate_steps(zoo):
    model = load64(zoo.spec(NAME)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=50.0)
    gen = torch.Generator().manual_seed(7)
    for step in range(5):
        emb, logits, old = model(images(10 + step))
        loss = (emb * torch.randn(emb.shape, generator=gen, dtype=f64)).sum() \
            + (logits * torch.randn(logits.shape, generator=gen, dtype=f64)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert orthonormality_error(materialise(model)) <= TOL, step
    after = model.state_dict()
    moved = max((after[k] - before[k]).abs().max().item() for k in after if ".v.weight" in k)
    assert moved > 0.1  # the reflections did change ...
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("old."))  # ... the old model did not
    assert_matches_reference(model.eval(), seed=2)


def test_distances_are_preserved(zoo):
    model = load64(zoo.spec(NAME))
    gen = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(32, WIDTH, generator=gen, dtype=f64) for _ in range(2))
    with torch.no_grad():
        d = (transform(model, z1) - transform(model, z2)).norm(dim=1)
    assert (d - (z1 - z2).norm(dim=1)).abs().max() <= TOL
    # end to end: the embeddings of a batch are as far apart as their inputs u = [extra; scale * phi_new]
    seen = {}
    model.phi_new.register_forward_hook(lambda m, a, out: seen.__setitem__("phi_new", out))
    model.extra_dims.register_forward_hook(lambda m, a, out: seen.__setitem__("extra", out))
    with torch.no_grad():
        emb, _, _ = model(images(4))
    u = torch.cat([seen["extra"], SCALE * seen["phi_new"]], dim=1)
    assert (torch.cdist(emb, emb) - torch.cdist(u, u)).abs().max() <= TOL
    # both parts are unit vectors: every embedding has norm sqrt(1 + scale^2)
    assert (emb.norm(dim=1) - (1 + SCALE ** 2) ** 0.5).abs().max() <= TOL


def test_cli_check_and_build(zoo, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(zoo.spec(NAME)), "--no-color"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "emb" in proc.stdout and "old (training only)" in proc.stdout
    out = zoo.build_cli(NAME, run=True)
    _, model = zoo.load_dir(out)
    assert_matches_reference(model.double())
    assert orthonormality_error(materialise(model)) <= TOL
    # the deploy build drops the old model and keeps the embedding and the logits
    dep = specc.build(zoo.spec(NAME), tmp_path / "deploy", deploy=True)
    _, dmodel = zoo.load_dir(dep)
    dmodel = dmodel.double()
    dmodel.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("old.")})
    x = images(6)
    with torch.no_grad():
        got, want = dmodel(x), model(x)
    assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want[:2]))


def test_optimised_build_equals_unoptimised(zoo):
    graph = specc.compile(zoo.spec(NAME))
    o0 = print_graph(graph, show_span=False)
    o2, _ = optimize(graph, PassContext(opt_level=2))
    o2 = print_graph(o2, show_span=False)
    assert o2.count("= parameter(") == o0.count("= parameter(") == D_NEW + D_OLD  # every reflection kept
    assert_matches_reference(load64(zoo.spec(NAME), opt_level=2), seed=3)
    report = verify(zoo.spec(NAME), examples=5)
    assert report.ok, report.mismatch


def test_recipe_trains_a_compatible_classifier(zoo, tmp_path):
    from specc.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(zoo.spec(NAME), tmp_path / "run", train={"steps": 400, "eval.every": 400})
    finally:
        torch.set_num_threads(threads)

    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "val"]
    assert evals[0]["compat_cos"] < 0.3  # at initialisation the embedding is not compatible
    assert run.metrics["compat_cos"] > 0.9 and run.metrics["acc"] > 0.7  # 10 classes: chance is 0.1
    _, trained = zoo.load_dir(tmp_path / "run" / "model")
    trained = trained.double()
    assert orthonormality_error(materialise(trained)) <= TOL
    initial = load64(zoo.spec(NAME)).state_dict()
    for k, v in trained.state_dict().items():
        if k.startswith("old."):
            assert torch.equal(v, initial[k]), k  # the old model is frozen
