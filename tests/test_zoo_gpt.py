"""specs/gpt.yaml: the generated module against a hand-written GPT, plus causality, the tied head,
parameter counts and deterministic builds.

Tolerances: the float64 reference is the oracle. The generated float32 model must agree with it to
max abs error <= 1e-5 * max(1, max|oracle|): 1e-5 absolute for outputs of order one, scaled for larger
ones, because the tied head (an N(0, 1) embedding) gives logits up to ~60, where one float32 ulp alone
is ~4e-6 and the measured error is ~2e-5 (~3e-7 relative). The generated model cast to float64
must agree to <= 1e-10 (same math, float64 rounding only).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import specc
from reference_ops import gelu, layer_norm, softmax

NAME = "gpt"
F32_TOL = 1e-5    # generated float32 vs float64 oracle: max abs error / max(1, max|oracle|)
F64_TOL = 1e-10   # generated float64 vs float64 oracle: max abs error
CAUSAL_TOL = 1e-6  # logits at t when only tokens after t change (in practice exactly equal)
DEFAULTS = dict(vocab=65, block_size=64, d_model=64, heads=4, layers=2)


# ---------------------------------------------------------------------------------------------
# an independent reference: nanoGPT-style pre-norm decoder, every operation written out
# ---------------------------------------------------------------------------------------------

def attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, causal):
    b, t, d = x.shape
    dh = d // heads

    def split(z):  # [B, T, d] -> [B, heads, T, dh]
        return z.reshape(b, t, heads, dh).permute(0, 2, 1, 3)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, heads, T, T]
    if causal:
        future = torch.arange(t)[None, :] > torch.arange(t)[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    out = softmax(scores) @ v  # [B, heads, T, dh]
    return out.permute(0, 2, 1, 3).reshape(b, t, d) @ wo.T + bo


class RefGPT(nn.Module):
    def __init__(self, vocab, block_size, d_model, heads, layers, tied):
        super().__init__()
        self.heads, self.layers, self.tied = heads, layers, tied
        d = d_model
        shapes = {"wte": (vocab, d), "wpe": (block_size, d)}
        for i in range(layers):
            shapes |= {f"l{i}_ln1_g": (d,), f"l{i}_ln1_b": (d,),
                       f"l{i}_wq": (d, d), f"l{i}_bq": (d,), f"l{i}_wk": (d, d), f"l{i}_bk": (d,),
                       f"l{i}_wv": (d, d), f"l{i}_bv": (d,), f"l{i}_wo": (d, d), f"l{i}_bo": (d,),
                       f"l{i}_ln2_g": (d,), f"l{i}_ln2_b": (d,),
                       f"l{i}_w1": (4 * d, d), f"l{i}_b1": (4 * d,), f"l{i}_w2": (d, 4 * d), f"l{i}_b2": (d,)}
        shapes |= {"lnf_g": (d,), "lnf_b": (d,)}
        if not tied:
            shapes["w_head"] = (vocab, d)
        self.p = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, dtype=torch.float64)) for k, s in shapes.items()})

    def forward(self, idx):
        p = self.p
        t = idx.shape[1]
        x = p["wte"][idx] + p["wpe"][:t]
        for i in range(self.layers):
            a = layer_norm(x, p[f"l{i}_ln1_g"], p[f"l{i}_ln1_b"])
            x = x + attention(a, p[f"l{i}_wq"], p[f"l{i}_bq"], p[f"l{i}_wk"], p[f"l{i}_bk"], p[f"l{i}_wv"],
                              p[f"l{i}_bv"], p[f"l{i}_wo"], p[f"l{i}_bo"], self.heads, causal=True)
            m = layer_norm(x, p[f"l{i}_ln2_g"], p[f"l{i}_ln2_b"])
            x = x + gelu(m @ p[f"l{i}_w1"].T + p[f"l{i}_b1"]) @ p[f"l{i}_w2"].T + p[f"l{i}_b2"]
        x = layer_norm(x, p["lnf_g"], p["lnf_b"])
        head = p["wte"] if self.tied else p["w_head"]
        return x @ head.T


def weight_map(layers: int, tied: bool) -> dict[str, str]:
    """Generated state_dict name -> reference parameter name (the tied head is not in the file)."""
    m = {"tok.weight": "wte", "pos.weight": "wpe", "layer_norm.weight": "lnf_g", "layer_norm.bias": "lnf_b"}
    for i in range(layers):
        g = f"h.{i}."
        m |= {g + "layer_norm.weight": f"l{i}_ln1_g", g + "layer_norm.bias": f"l{i}_ln1_b",
              g + "layer_norm_1.weight": f"l{i}_ln2_g", g + "layer_norm_1.bias": f"l{i}_ln2_b",
              g + "mlp.fc1.weight": f"l{i}_w1", g + "mlp.fc1.bias": f"l{i}_b1",
              g + "mlp.fc2.weight": f"l{i}_w2", g + "mlp.fc2.bias": f"l{i}_b2"}
        for proj in "qkvo":
            m |= {g + f"attention.{proj}.weight": f"l{i}_w{proj}", g + f"attention.{proj}.bias": f"l{i}_b{proj}"}
    if not tied:
        m["logits.weight"] = "w_head"
    return m


def reference_from(state: dict[str, torch.Tensor], tied: bool) -> RefGPT:
    ref = RefGPT(**DEFAULTS, tied=tied)
    names = weight_map(DEFAULTS["layers"], tied)
    assert set(state) == set(names), f"unmapped: {set(state) ^ set(names)}"
    assert sorted(names.values()) == sorted(ref.p.keys())
    with torch.no_grad():
        for gen_name, ref_name in names.items():
            assert ref.p[ref_name].shape == state[gen_name].shape, gen_name
            ref.p[ref_name].copy_(state[gen_name].to(torch.float64))
    return ref.eval()


# ---------------------------------------------------------------------------------------------
# builds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builds(zoo):
    return {"api": zoo.build_api(NAME), "api2": zoo.build_api(NAME), "cli": zoo.build_cli(NAME, run=True)}


@pytest.fixture(scope="module")
def untied(zoo):
    return zoo.build_api(NAME, tied=False)


def tokens(seed: int, b: int = 3, t: int = 16) -> torch.Tensor:
    return torch.randint(0, DEFAULTS["vocab"], (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("weights", ["file", "perturbed"])
def test_matches_reference(zoo, builds, untied, perturb, tied, weights):
    directory = builds["cli"] if tied else untied
    module, model = zoo.load_dir(directory)
    state = zoo.weights(directory)
    if weights == "perturbed":
        state = perturb(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == set(module.TIED) and not unexpected
    ref = reference_from(state, tied)
    idx = tokens(0)
    with torch.no_grad():
        oracle = ref(idx)
        got32 = model(idx)
        got64 = copy.deepcopy(model).double()(idx)
    assert got32.dtype == torch.float32 and got32.shape == (3, 16, DEFAULTS["vocab"])
    scale = max(1.0, oracle.abs().max().item())
    assert (got32.double() - oracle).abs().max().item() <= F32_TOL * scale
    assert (got64 - oracle).abs().max().item() <= F64_TOL


def test_causal(builds, zoo):
    _, model = zoo.load_dir(builds["api"])
    idx = tokens(1)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 14):
            other = idx.clone()
            other[:, t + 1:] = (idx[:, t + 1:] + 1 + tokens(2 + t)[:, t + 1:] % 60) % DEFAULTS["vocab"]
            assert (other[:, t + 1:] != idx[:, t + 1:]).all()
            out = model(other)
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max().item() <= CAUSAL_TOL
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max().item() > 1e-3  # later positions do change


def test_tied_head(builds, untied, zoo, count_params):
    module, model = zoo.load_dir(builds["api"])
    assert module.TIED == ("logits.weight",)
    assert "logits.weight" not in zoo.weights(builds["api"])
    assert model.logits.weight is model.tok.weight

    module_u, model_u = zoo.load_dir(untied)
    assert module_u.TIED == ()
    w = zoo.weights(untied)
    assert w["logits.weight"].shape == (DEFAULTS["vocab"], DEFAULTS["d_model"])
    assert not torch.equal(w["logits.weight"], w["tok.weight"])
    assert model_u.logits.weight is not model_u.tok.weight
    assert model_u.logits.weight.data_ptr() != model_u.tok.weight.data_ptr()

    extra = DEFAULTS["vocab"] * DEFAULTS["d_model"]
    assert specc.check(zoo.spec(NAME), tied=False).params == specc.check(zoo.spec(NAME)).params + extra
    assert count_params(model_u) == count_params(model) + extra
    assert zoo.manifest(untied)["parameter_count"] == zoo.manifest(builds["api"])["parameter_count"] + extra


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_parameter_count(builds, untied, zoo, count_params, tied):
    directory = builds["api"] if tied else untied
    _, model = zoo.load_dir(directory)
    expected = specc.check(zoo.spec(NAME), tied=tied).params
    assert expected == count_params(model)
    assert expected == sum(t.numel() for t in zoo.weights(directory).values())  # tied weights stored once
    assert expected == zoo.manifest(directory)["parameter_count"]


def test_deterministic_build(builds, zoo, same_files):
    first = zoo.files(builds["api"])
    same_files(zoo.files(builds["api2"]), first)
    same_files(zoo.files(builds["cli"]), first)
    # specc.load goes through the same generated code and weights
    _, model = zoo.load_dir(builds["api"])
    idx = tokens(3)
    with torch.no_grad():
        assert torch.equal(specc.load(zoo.spec(NAME))(idx), model(idx))


def test_set_overrides(builds, zoo, same_files):
    out = zoo.build_cli(NAME, "d_model=32", "layers=1", "tied=false")
    manifest = zoo.manifest(out)
    assert manifest["params"] == {**zoo.manifest(builds["api"])["params"], "d_model": 32, "layers": 1,
                                  "tied": False}
    assert manifest["parameter_count"] == specc.check(zoo.spec(NAME), d_model=32, layers=1, tied=False).params
    assert manifest["parameter_count"] != zoo.manifest(builds["api"])["parameter_count"]
    # the CLI's string overrides and the API's typed ones build the same bytes
    same_files(zoo.files(zoo.build_api(NAME, d_model=32, layers=1, tied=False)), zoo.files(out))
    _, model = zoo.load_dir(out)
    assert model.tok.weight.shape == (DEFAULTS["vocab"], 32) and len(model.h) == 1

