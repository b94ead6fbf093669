"""specs/itransformer.yaml: the generated module against a hand-written iTransformer, plus the exact
properties of the architecture (variate permutation equivariance, shift equivariance from the
instance normalisation), parameter counts and deterministic builds.

Tolerances: the float64 reference is the oracle. The generated float32 model must agree with it to
max abs error <= 1e-5 * max(1, max|oracle|) (1e-5 absolute for outputs of order one; the inputs here
have per-variate offsets up to ~10, which de-normalisation puts back into the outputs). The generated
model cast to float64 must agree to <= 1e-10, and the exact properties hold to <= 1e-10 in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import specc
from reference_ops import gelu, layer_norm, softmax

NAME = "itransformer"
F32_TOL = 1e-5    # generated float32 vs float64 oracle: max abs error / max(1, max|oracle|)
F64_TOL = 1e-10   # generated float64 vs float64 oracle, and the exact properties in float64
DEFAULTS = dict(lookback=96, horizon=24, variates=7, d_model=64, heads=4, layers=2)
EPS = 1e-5  # instance normalisation


# ---------------------------------------------------------------------------------------------
# an independent reference, every operation written out
# ---------------------------------------------------------------------------------------------

def attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    """Full (non-causal) multi-head self-attention over the variate tokens."""
    b, n, d = x.shape
    dh = d // heads

    def split(z):  # [B, N, d] -> [B, heads, N, dh]
        return z.reshape(b, n, heads, dh).permute(0, 2, 1, 3)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    out = softmax(q @ k.transpose(-1, -2) / math.sqrt(dh)) @ v
    return out.permute(0, 2, 1, 3).reshape(b, n, d) @ wo.T + bo


class RefITransformer(nn.Module):
    def __init__(self, lookback, horizon, variates, d_model, heads, layers):
        super().__init__()
        self.heads, self.layers = heads, layers
        d = d_model
        shapes = {"w_emb": (d, lookback), "b_emb": (d,)}
        for i in range(layers):
            shapes |= {f"l{i}_ln1_g": (d,), f"l{i}_ln1_b": (d,),
                       f"l{i}_wq": (d, d), f"l{i}_bq": (d,), f"l{i}_wk": (d, d), f"l{i}_bk": (d,),
                       f"l{i}_wv": (d, d), f"l{i}_bv": (d,), f"l{i}_wo": (d, d), f"l{i}_bo": (d,),
                       f"l{i}_ln2_g": (d,), f"l{i}_ln2_b": (d,),
                       f"l{i}_w1": (4 * d, d), f"l{i}_b1": (4 * d,), f"l{i}_w2": (d, 4 * d), f"l{i}_b2": (d,)}
        shapes |= {"lnf_g": (d,), "lnf_b": (d,), "w_out": (horizon, d), "b_out": (horizon,)}
        self.p = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, dtype=torch.float64)) for k, s in shapes.items()})

    def forward(self, x):  # x [B, L, N]
        p = self.p
        mean = x.mean(1, keepdim=True)                                   # [B, 1, N]
        centred = x - mean
        std = torch.sqrt((centred ** 2).mean(1, keepdim=True) + EPS)     # [B, 1, N]
        h = (centred / std).transpose(1, 2) @ p["w_emb"].T + p["b_emb"]  # [B, N, d]: one token per variate
        for i in range(self.layers):
            a = layer_norm(h, p[f"l{i}_ln1_g"], p[f"l{i}_ln1_b"])
            h = h + attention(a, p[f"l{i}_wq"], p[f"l{i}_bq"], p[f"l{i}_wk"], p[f"l{i}_bk"], p[f"l{i}_wv"],
                              p[f"l{i}_bv"], p[f"l{i}_wo"], p[f"l{i}_bo"], self.heads)
            m = layer_norm(h, p[f"l{i}_ln2_g"], p[f"l{i}_ln2_b"])
            h = h + gelu(m @ p[f"l{i}_w1"].T + p[f"l{i}_b1"]) @ p[f"l{i}_w2"].T + p[f"l{i}_b2"]
        out = layer_norm(h, p["lnf_g"], p["lnf_b"]) @ p["w_out"].T + p["b_out"]  # [B, N, S]
        return out.transpose(1, 2) * std + mean                                 # [B, S, N]


def weight_map(layers: int) -> dict[str, str]:
    """Generated state_dict name -> reference parameter name."""
    m = {"tokens.weight": "w_emb", "tokens.bias": "b_emb", "layer_norm.weight": "lnf_g",
         "layer_norm.bias": "lnf_b", "proj.weight": "w_out", "proj.bias": "b_out"}
    for i in range(layers):
        g = f"h.{i}."
        m |= {g + "layer_norm.weight": f"l{i}_ln1_g", g + "layer_norm.bias": f"l{i}_ln1_b",
              g + "layer_norm_1.weight": f"l{i}_ln2_g", g + "layer_norm_1.bias": f"l{i}_ln2_b",
              g + "mlp.fc1.weight": f"l{i}_w1", g + "mlp.fc1.bias": f"l{i}_b1",
              g + "mlp.fc2.weight": f"l{i}_w2", g + "mlp.fc2.bias": f"l{i}_b2"}
        for proj in "qkvo":
            m |= {g + f"attention.{proj}.weight": f"l{i}_w{proj}", g + f"attention.{proj}.bias": f"l{i}_b{proj}"}
    return m


def reference_from(state: dict[str, torch.Tensor]) -> RefITransformer:
    ref = RefITransformer(**DEFAULTS)
    names = weight_map(DEFAULTS["layers"])
    assert set(state) == set(names), f"unmapped: {set(state) ^ set(names)}"
    assert sorted(names.values()) == sorted(ref.p.keys())
    with torch.no_grad():
        for gen_name, ref_name in names.items():
            assert ref.p[ref_name].shape == state[gen_name].shape, gen_name
            ref.p[ref_name].copy_(state[gen_name].to(torch.float64))
    return ref.eval()


def series(seed: int, b: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Random series with a different offset and scale per variate, so the normalisation matters."""
    gen = torch.Generator().manual_seed(seed)
    n, length = DEFAULTS["variates"], DEFAULTS["lookback"]
    x = torch.randn(b, length, n, generator=gen, dtype=torch.float64)
    scale = 0.5 + 3 * torch.rand(1, 1, n, generator=gen, dtype=torch.float64)
    offset = 10 * torch.rand(1, 1, n, generator=gen, dtype=torch.float64) - 5
    return (x * scale + offset).to(dtype)


# ---------------------------------------------------------------------------------------------
# builds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builds(zoo):
    return {"api": zoo.build_api(NAME), "api2": zoo.build_api(NAME), "cli": zoo.build_cli(NAME, run=True)}


@pytest.fixture(scope="module")
def model64(builds, zoo):
    _, model = zoo.load_dir(builds["api"])
    return model.double()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["file", "perturbed"])
def test_matches_reference(zoo, builds, perturb, weights):
    module, model = zoo.load_dir(builds["cli"])
    state = zoo.weights(builds["cli"])
    if weights == "perturbed":
        state = perturb(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and not unexpected
    ref = reference_from(state)
    x = series(0)
    with torch.no_grad():
        oracle = ref(x.double())
        got32 = model(x)
        got64 = copy.deepcopy(model).double()(x.double())
    assert got32.dtype == torch.float32
    assert got32.shape == (3, DEFAULTS["horizon"], DEFAULTS["variates"])
    scale = max(1.0, oracle.abs().max().item())
    assert (got32.double() - oracle).abs().max().item() <= F32_TOL * scale
    assert (got64 - oracle).abs().max().item() <= F64_TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variate_permutation_equivariance(model64, seed):
    x = series(10 + seed, dtype=torch.float64)
    perm = torch.randperm(DEFAULTS["variates"], generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(perm, torch.arange(DEFAULTS["variates"]))
    with torch.no_grad():
        y = model64(x)
        y_perm = model64(x[:, :, perm])
    assert (y_perm - y[:, :, perm]).abs().max().item() <= F64_TOL


def test_shift_equivariance(model64):
    """Instance normalisation removes a per-variate offset and de-normalisation adds it back."""
    x = series(20, dtype=torch.float64)
    shift = torch.linspace(-3.0, 4.0, DEFAULTS["variates"], dtype=torch.float64).reshape(1, 1, -1)
    with torch.no_grad():
        assert (model64(x + shift) - (model64(x) + shift)).abs().max().item() <= F64_TOL


def test_parameter_count(builds, zoo, count_params):
    _, model = zoo.load_dir(builds["api"])
    expected = specc.check(zoo.spec(NAME)).params
    assert expected == count_params(model)
    assert expected == sum(t.numel() for t in zoo.weights(builds["api"]).values())
    assert expected == zoo.manifest(builds["api"])["parameter_count"]
    # one token per variate: the weights do not depend on the number of variates
    assert specc.check(zoo.spec(NAME), variates=11).params == expected


def test_deterministic_build(builds, zoo, same_files):
    first = zoo.files(builds["api"])
    same_files(zoo.files(builds["api2"]), first)
    same_files(zoo.files(builds["cli"]), first)
    _, model = zoo.load_dir(builds["api"])
    x = series(3)
    with torch.no_grad():
        assert torch.equal(specc.load(zoo.spec(NAME))(x), model(x))


def test_set_overrides(builds, zoo, same_files):
    out = zoo.build_cli(NAME, "d_model=32", "horizon=12", "layers=1")
    manifest = zoo.manifest(out)
    assert manifest["params"] == {**zoo.manifest(builds["api"])["params"], "d_model": 32, "horizon": 12, "layers": 1}
    assert manifest["parameter_count"] == specc.check(zoo.spec(NAME), d_model=32, horizon=12, layers=1).params
    assert manifest["parameter_count"] != zoo.manifest(builds["api"])["parameter_count"]
    assert manifest["outputs"][0]["example_shape"][1:] == [12, DEFAULTS["variates"]]
    same_files(zoo.files(zoo.build_api(NAME, d_model=32, horizon=12, layers=1)), zoo.files(out))
    _, model = zoo.load_dir(out)
    with torch.no_grad():
        assert model(series(4)).shape == (3, 12, DEFAULTS["variates"])
