"""specs/lstm_classifier.yaml: the generated module against a hand-written bidirectional LSTM
classifier (gates written out step by step) and against torch.nn.LSTM, plus the time-reversal
symmetry of the bidirectional model, parameter counts and deterministic builds.

Tolerances: the float64 reference is the oracle. The generated float32 model must agree with it to
max abs error <= 1e-5 * max(1, max|oracle|) (the logits here are of order one, so 1e-5 absolute). The
generated model cast to float64 must agree to <= 1e-10, and the symmetry holds to <= 1e-10 in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import specc

NAME = "lstm_classifier"
F32_TOL = 1e-5    # generated float32 vs float64 oracle: max abs error / max(1, max|oracle|)
F64_TOL = 1e-10   # generated float64 vs float64 oracle, and the symmetry in float64
DEFAULTS = dict(vocab=100, d=32, hidden=32, classes=5)


# ---------------------------------------------------------------------------------------------
# an independent reference: the LSTM recurrence written out (gate order i, f, g, o as in the paper's
# eqs. and in torch.nn.LSTM's weight layout)
# ---------------------------------------------------------------------------------------------

def lstm_direction(x, w_ih, w_hh, b_ih, b_hh, reverse):
    """One direction of one layer: x [B, T, in] -> hidden states [B, T, H], aligned with the input steps."""
    b, t, _ = x.shape
    hdim = w_hh.shape[1]
    h = x.new_zeros(b, hdim)
    c = x.new_zeros(b, hdim)
    out = [None] * t
    for step in (range(t - 1, -1, -1) if reverse else range(t)):
        z = x[:, step] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = z.split(hdim, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        out[step] = h
    return torch.stack(out, dim=1)


class RefLSTMClassifier(nn.Module):
    def __init__(self, vocab, d, hidden, classes, layers=1):
        super().__init__()
        self.layers = layers
        shapes = {"emb": (vocab, d), "w_cls": (classes, 2 * hidden), "b_cls": (classes,)}
        for layer in range(layers):
            fan_in = d if layer == 0 else 2 * hidden
            for direction in ("fwd", "bwd"):
                pre = f"l{layer}_{direction}_"
                shapes |= {pre + "wih": (4 * hidden, fan_in), pre + "whh": (4 * hidden, hidden),
                           pre + "bih": (4 * hidden,), pre + "bhh": (4 * hidden,)}
        self.p = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, dtype=torch.float64)) for k, s in shapes.items()})

    def direction(self, layer, direction):
        p = self.p
        return tuple(p[f"l{layer}_{direction}_{k}"] for k in ("wih", "whh", "bih", "bhh"))

    def forward(self, ids):
        x = self.p["emb"][ids]                                    # [B, T, d]
        for layer in range(self.layers):
            fwd = lstm_direction(x, *self.direction(layer, "fwd"), reverse=False)
            bwd = lstm_direction(x, *self.direction(layer, "bwd"), reverse=True)
            x = torch.cat([fwd, bwd], dim=-1)                     # [B, T, 2H]: forward then backward
        pooled = x.mean(dim=1)                                    # mean over time
        return pooled @ self.p["w_cls"].T + self.p["b_cls"]       # [B, classes]


def weight_map(layers: int) -> dict[str, str]:
    """Generated state_dict name -> reference parameter name."""
    m = {"emb.weight": "emb", "logits.weight": "w_cls", "logits.bias": "b_cls"}
    for layer in range(layers):
        for suffix, direction in (("", "fwd"), ("_reverse", "bwd")):
            for kind, short in (("weight_ih", "wih"), ("weight_hh", "whh"), ("bias_ih", "bih"), ("bias_hh", "bhh")):
                m[f"states.{kind}_l{layer}{suffix}"] = f"l{layer}_{direction}_{short}"
    return m


def reference_from(state: dict[str, torch.Tensor], layers: int) -> RefLSTMClassifier:
    ref = RefLSTMClassifier(**DEFAULTS, layers=layers)
    names = weight_map(layers)
    assert set(state) == set(names), f"unmapped: {set(state) ^ set(names)}"
    assert sorted(names.values()) == sorted(ref.p.keys())
    with torch.no_grad():
        for gen_name, ref_name in names.items():
            assert ref.p[ref_name].shape == state[gen_name].shape, gen_name
            ref.p[ref_name].copy_(state[gen_name].to(torch.float64))
    return ref.eval()


def token_ids(seed: int, b: int = 3, t: int = 12) -> torch.Tensor:
    return torch.randint(0, DEFAULTS["vocab"], (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# builds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builds(zoo):
    return {"api": zoo.build_api(NAME), "api2": zoo.build_api(NAME), "cli": zoo.build_cli(NAME, run=True),
            "two_layers": zoo.build_api(NAME, layers=2)}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("weights", ["file", "perturbed"])
def test_matches_reference(zoo, builds, perturb, weights, layers):
    directory = builds["cli"] if layers == 1 else builds["two_layers"]
    _, model = zoo.load_dir(directory)
    state = zoo.weights(directory)
    if weights == "perturbed":
        state = perturb(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and not unexpected
    ref = reference_from(state, layers)
    ids = token_ids(0)
    with torch.no_grad():
        oracle = ref(ids)
        got32 = model(ids)
        got64 = copy.deepcopy(model).double()(ids)
    assert got32.dtype == torch.float32 and got32.shape == (3, DEFAULTS["classes"])
    scale = max(1.0, oracle.abs().max().item())
    assert (got32.double() - oracle).abs().max().item() <= F32_TOL * scale
    assert (got64 - oracle).abs().max().item() <= F64_TOL


def test_reference_matches_torch_lstm(zoo, builds):
    """The hand-written recurrence is torch.nn.LSTM (bidirectional, batch_first) in float64."""
    state = zoo.weights(builds["two_layers"])
    ref = reference_from(state, layers=2)
    torch_lstm = nn.LSTM(DEFAULTS["d"], DEFAULTS["hidden"], num_layers=2, batch_first=True, bidirectional=True)
    torch_lstm = torch_lstm.double()
    torch_lstm.load_state_dict({k[len("states."):]: v.double() for k, v in state.items() if k.startswith("states.")})
    x = torch.randn(3, 12, DEFAULTS["d"], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        ours = x
        for layer in range(2):
            ours = torch.cat([lstm_direction(ours, *ref.direction(layer, "fwd"), reverse=False),
                              lstm_direction(ours, *ref.direction(layer, "bwd"), reverse=True)], dim=-1)
        theirs = torch_lstm(x)[0]
    assert (ours - theirs).abs().max().item() <= F64_TOL


def test_time_reversal_symmetry(zoo, builds):
    """Swap the forward and backward LSTM weights and the two halves of the classifier's columns:
    the model then gives on the reversed sequence exactly what it gave on the original one."""
    _, model = zoo.load_dir(builds["api"])
    model = model.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = dict(state)
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        fwd, bwd = f"states.{kind}_l0", f"states.{kind}_l0_reverse"
        swapped[fwd], swapped[bwd] = state[bwd], state[fwd]
    h = DEFAULTS["hidden"]
    swapped["logits.weight"] = torch.cat([state["logits.weight"][:, h:], state["logits.weight"][:, :h]], dim=1)
    mirror = copy.deepcopy(model)
    mirror.load_state_dict(swapped)
    ids = token_ids(7)
    with torch.no_grad():
        original = model(ids)
        mirrored = mirror(ids.flip(1))
        assert (mirrored - original).abs().max().item() <= F64_TOL
        assert (model(ids.flip(1)) - original).abs().max().item() > 1e-6  # the property is not vacuous


def test_parameter_count(builds, zoo, count_params):
    for key, overrides in (("api", {}), ("two_layers", {"layers": 2})):
        _, model = zoo.load_dir(builds[key])
        expected = specc.check(zoo.spec(NAME), **overrides).params
        assert expected == count_params(model)
        assert expected == sum(t.numel() for t in zoo.weights(builds[key]).values())
        assert expected == zoo.manifest(builds[key])["parameter_count"]
    # by hand: embedding + 2 directions x (W_ih, W_hh, b_ih, b_hh) + classifier
    v, d, hd, k = DEFAULTS["vocab"], DEFAULTS["d"], DEFAULTS["hidden"], DEFAULTS["classes"]
    assert specc.check(zoo.spec(NAME)).params == v * d + 2 * (4 * hd * (d + hd) + 8 * hd) + k * 2 * hd + k


def test_deterministic_build(builds, zoo, same_files):
    first = zoo.files(builds["api"])
    same_files(zoo.files(builds["api2"]), first)
    same_files(zoo.files(builds["cli"]), first)
    _, model = zoo.load_dir(builds["api"])
    ids = token_ids(3)
    with torch.no_grad():
        assert torch.equal(specc.load(zoo.spec(NAME))(ids), model(ids))


def test_set_overrides(builds, zoo, same_files):
    out = zoo.build_cli(NAME, "hidden=16", "classes=3")
    manifest = zoo.manifest(out)
    assert manifest["params"] == {**zoo.manifest(builds["api"])["params"], "hidden": 16, "classes": 3}
    assert manifest["parameter_count"] == specc.check(zoo.spec(NAME), hidden=16, classes=3).params
    assert manifest["parameter_count"] != zoo.manifest(builds["api"])["parameter_count"]
    assert manifest["outputs"][0]["example_shape"][1:] == [3]
    same_files(zoo.files(zoo.build_api(NAME, hidden=16, classes=3)), zoo.files(out))
    _, model = zoo.load_dir(out)
    with torch.no_grad():
        assert model(token_ids(4)).shape == (3, 3)
