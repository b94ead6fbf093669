"""A batch_norm that shares another's parameters (`batch_norm(h, share=m)`, also inside a repeated
block): one storage for weight, bias, running_mean, running_var and num_batches_tracked, loaded by the
generated model.py's load() (torch's BatchNorm fills in a missing num_batches_tracked itself, so the
loader compares names, not load_state_dict's report), equal to a float64 reference that applies the
same statistics twice, updated by both uses in training mode; wrongly named or missing weights are
still refused by name.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import specc

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5
# float32 model against a float64 reference of a few layers: errors ~1e-6 relative
ATOL, RTOL = 1e-4, 1e-4

CONV = """\
specc: 1
name: shared_bn_conv
inputs:
  x: f32[B, 4, 6, 6]
graph: |
  a = conv2d(x, 4, 3, padding=1)
  m = batch_norm(a)
  c = conv2d(relu(m), 4, 3, padding=1)
  y = batch_norm(c, share=m)
outputs:
  y:
"""

FEATURES = """\
specc: 1
name: shared_bn_features
inputs:
  x: f32[B, 6]
graph: |
  h = linear(x, 6)
  m = batch_norm(h)
  l = linear(relu(m), 6)
  y = batch_norm(l, share=m)
outputs:
  y:
  m:
"""

BLOCKS = """\
specc: 1
name: shared_bn_blocks
inputs:
  x: f32[B, 4, 5, 5]
blocks:
  blk(h, w): |
    return h + batch_norm(relu(h), share=w)
graph: |
  w = batch_norm(x)
  y = repeat(2, blk, w, w=w)
outputs:
  y:
"""

BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn64(x: torch.Tensor, w: dict[str, torch.Tensor], owner: str) -> torch.Tensor:
    """Inference batch norm over dim 1 with `owner`'s statistics, in float64."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    p = {k: w[f"{owner}.{k}"].double().reshape(shape) for k in BN_FIELDS[:4]}
    return (x - p["running_mean"]) / torch.sqrt(p["running_var"] + EPS) * p["weight"] + p["bias"]


def conv64(x, w, name):
    return torch.nn.functional.conv2d(x, w[f"{name}.weight"].double(), w[f"{name}.bias"].double(), padding=1)


def linear64(x, w, name):
    return x @ w[f"{name}.weight"].double().t() + w[f"{name}.bias"].double()


def ref_conv(x, w):
    m = bn64(conv64(x, w, "a"), w, "m")
    return (bn64(conv64(torch.relu(m), w, "c"), w, "m"),)


def ref_features(x, w):
    m = bn64(linear64(x, w, "h"), w, "m")
    return bn64(linear64(torch.relu(m), w, "l"), w, "m"), m


def ref_blocks(x, w):
    h = bn64(x, w, "w")
    for _ in range(2):
        h = h + bn64(torch.relu(h), w, "w")
    return (h,)


# spec, float64 reference, input shape, owner of the shared statistics, the layers sharing them
CASES = {
    "conv": (CONV, ref_conv, (3, 4, 6, 6), "m", ("y",)),
    "features": (FEATURES, ref_features, (5, 6), "m", ("y",)),
    "blocks": (BLOCKS, ref_blocks, (3, 4, 5, 5), "w", ("y.0.batch_norm", "y.1.batch_norm")),
}


def given_weights(text: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every stored parameter of the spec, away from the defaults (mean 0, var 1, weight 1, bias 0,
    no batches tracked) so that a statistic taken from the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for _, node in specc.compile(text).nodes():
        for p in node.params:
            if p.tied_to:
                continue
            name = ".".join(node.path + (p.name,))
            if p.name == "num_batches_tracked":
                out[name] = torch.tensor(7, dtype=torch.int64)
            elif p.name == "running_var":
                out[name] = 0.5 + torch.rand(p.shape, generator=gen)
            elif node.op == "batch_norm" and p.name == "weight":
                out[name] = 1 + 0.5 * torch.randn(p.shape, generator=gen)
            else:
                out[name] = 0.5 * torch.randn(p.shape, generator=gen)
    return out


def import_model(directory: Path):
    """The generated model.py as a fresh module, with no specc involved."""
    name = f"shared_bn_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specc.cli", *args, "--no-color"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def check_model(model, case: str, weights: dict[str, torch.Tensor]) -> None:
    text, ref, shape, owner, users = CASES[case]
    assert not model.training
    for user in users:
        for field in BN_FIELDS:
            get = model.get_parameter if field in ("weight", "bias") else model.get_buffer
            assert get(f"{user}.{field}") is get(f"{owner}.{field}"), (user, field)
    assert int(model.get_buffer(f"{owner}.num_batches_tracked")) == 7
    for b in (1, 3):
        x = torch.randn((b,) + shape[1:], generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            got = model(x)
        got = got if isinstance(got, tuple) else (got,)
        want = ref(x.double(), weights)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g.double(), w, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_api_load_shares_the_statistics(case, opt_level):
    weights = given_weights(CASES[case][0])
    check_model(specc.load(CASES[case][0], opt_level=opt_level, weights=weights), case, weights)


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_build_then_generated_load(tmp_path, case):
    weights = given_weights(CASES[case][0], seed=1)
    out = specc.build(CASES[case][0], tmp_path / "out", opt_level=2, weights=weights)
    stored = load_file(str(out / "weights.safetensors"))
    module = import_model(out)
    assert set(module.TIED).isdisjoint(stored)  # shared statistics are stored once, at the owner
    check_model(module.load(out), case, weights)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_build_then_generated_load(tmp_path, case):
    text = CASES[case][0]
    (tmp_path / "spec.yaml").write_text(text)
    weights = given_weights(text, seed=2)
    save_file(weights, str(tmp_path / "given.safetensors"))
    out = tmp_path / "out"
    r = cli("build", str(tmp_path / "spec.yaml"), "-o", str(out), "--weights", str(tmp_path / "given.safetensors"),
            "--run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ran " in r.stdout
    check_model(import_model(out).load(), case, weights)


def test_training_updates_one_set_of_running_statistics():
    """In training mode both uses normalise with their batch's statistics and update the one shared
    running_mean / running_var in turn (momentum 0.1, unbiased variance), and count two batches."""
    text = FEATURES
    weights = given_weights(text, seed=3)
    model = specc.load(text, opt_level=0, weights=weights).train()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    y, m = model(x)

    w = {k: v.double() for k, v in weights.items()}
    mean, var = w["m.running_mean"].clone(), w["m.running_var"].clone()

    def bn_train(v):
        nonlocal mean, var
        mu, sigma2 = v.mean(0), v.var(0, unbiased=False)
        mean = 0.9 * mean + 0.1 * mu
        var = 0.9 * var + 0.1 * v.var(0, unbiased=True)
        return (v - mu) / torch.sqrt(sigma2 + EPS) * w["m.weight"] + w["m.bias"]

    want_m = bn_train(linear64(x.double(), w, "h"))
    want_y = bn_train(linear64(torch.relu(want_m), w, "l"))
    torch.testing.assert_close(m.detach().double(), want_m, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y.detach().double(), want_y, atol=ATOL, rtol=RTOL)
    assert model.y.running_mean is model.m.running_mean and model.y.running_var is model.m.running_var
    torch.testing.assert_close(model.m.running_mean.double(), mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.m.running_var.double(), var, atol=1e-6, rtol=1e-6)
    assert int(model.m.num_batches_tracked) == 9 and model.y.num_batches_tracked is model.m.num_batches_tracked
    # one gradient for the one weight, from both uses
    (y.sum() + (m * m).sum()).backward()
    assert model.y.weight is model.m.weight and model.m.weight.grad is not None
    assert model.m.weight.grad.abs().sum() > 0


@pytest.fixture
def built(tmp_path):
    out = specc.build(CONV, tmp_path / "out", weights=given_weights(CONV))
    return out, load_file(str(out / "weights.safetensors"))


@pytest.mark.parametrize("edit, missing, unexpected", [
    # a stored statistic renamed, or left out (torch itself would fill in num_batches_tracked)
    (lambda s: s.update({"m.running_varr": s.pop("m.running_var")}), ["m.running_var"], ["m.running_varr"]),
    (lambda s: s.pop("m.num_batches_tracked"), ["m.num_batches_tracked"], []),
    (lambda s: s.pop("c.weight"), ["c.weight"], []),
    # a shared statistic stored under the sharing layer's name, in place of the owner's
    (lambda s: s.update({"y.running_mean": s.pop("m.running_mean")}), ["m.running_mean"], ["y.running_mean"]),
    # ... or besides it: it would be overwritten by the tie, so it is refused rather than ignored
    (lambda s: s.update({"y.running_mean": s["m.running_mean"] + 1}), [], ["y.running_mean"]),
], ids=["renamed", "no-num_batches_tracked", "no-conv-weight", "stored-as-the-user", "stored-twice"])
def test_wrong_weights_are_refused_by_name(built, edit, missing, unexpected):
    out, state = built
    edit(state)
    save_file(state, str(out / "weights.safetensors"))
    with pytest.raises(RuntimeError) as e:
        import_model(out).load()
    assert str(e.value) == f"weights do not fit the model: missing {missing}, unexpected {unexpected}"


def test_tvm_llvm_build_binds_the_shared_statistics(tmp_path):
    """The TVM build stores and binds the owner's statistics once; both uses read them."""
    pytest.importorskip("tvm")
    import json

    (tmp_path / "spec.yaml").write_text(FEATURES)
    out = tmp_path / "tvm"
    r = cli("build", str(tmp_path / "spec.yaml"), "-o", str(out), "--target", "tvm-llvm")
    assert r.returncode == 0, r.stdout + r.stderr
    # --weights is for the torch target: put the perturbed values in place of the seeded ones
    weights = given_weights(FEATURES, seed=5)
    bound = {p["name"] for p in json.loads((out / "tvm_manifest.json").read_text())["params"]}
    assert bound == set(weights) == set(load_file(str(out / "weights.safetensors")))
    save_file(weights, str(out / "weights.safetensors"))
    model = import_model(out).load()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    got = model(x)
    for g, w in zip(got, ref_features(x.double(), weights), strict=True):
        torch.testing.assert_close(g.double(), w, atol=ATOL, rtol=RTOL)


MOONS_BN = (ROOT / "tests" / "data" / "train_moons.yaml").read_text().replace(
    "  h = dropout(relu(linear(x, hidden)), p=dropout)\n",
    "  m = batch_norm(linear(x, hidden))\n"
    "  n = batch_norm(linear(relu(m), hidden), share=m)\n"
    "  h = dropout(relu(n), p=dropout)\n")


def test_a_resumed_training_run_continues_the_shared_statistics(tmp_path):
    """`specc train --until` then `--resume` on a spec whose batch norms share one set of statistics: the
    same losses at every step and the same final weights, statistics and step count as the run never
    stopped (the checkpoint holds the shared buffers once, under the owner's names)."""
    from specc.train import train

    assert "share=m" in MOONS_BN
    spec = tmp_path / "moons_bn.yaml"
    spec.write_text(MOONS_BN)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums in both runs
    try:
        full, part = tmp_path / "full", tmp_path / "part"
        train(spec, full)
        assert train(spec, part, until=25).stopped
        train(spec, part, resume=part)
    finally:
        torch.set_num_threads(before)
    lines = [(run / "metrics.jsonl").read_text() for run in (full, part)]
    assert lines[0] == lines[1]
    a = load_file(str(full / "model" / "weights.safetensors"))
    b = load_file(str(part / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tracked = [k for k in a if k.endswith("num_batches_tracked")]
    assert len(tracked) == 1 and int(a[tracked[0]]) == 2 * 40  # both uses counted, over all 40 steps
