"""specs/lora_gpt.yaml (SEEDS.md row 9, LoRA): the generated model against the `peft` library's LoRA on
the same base weights, the merge W + s * B @ A at -O2, and which parameters train.

The base model is specs/gpt.yaml built by specc (its MLP is `fc1`/`fc2`); peft's `inject_adapter_in_model`
wraps those two linear layers with LoRA of the same rank and alpha, and gets lora_gpt's A and B
matrices. (tests/test_zoo_rewrites.py checks that -O2 leaves no rank-r linear and equals -O0.)

Tolerances: both models run in float64 on the same weights, so they agree to <= 1e-10 (the same math in
a different order of float64 operations). A merged float32 weight must be W + s * B @ A computed in
float64 and rounded once: within half a float32 ulp, |error| <= 2**-24 * |value|.
"""

from __future__ import annotations

import copy

import pytest
import torch

import specc

peft = pytest.importorskip("peft")

NAME = "lora_gpt"
R, ALPHA, LAYERS = 4, 8.0, 2
F64_TOL = 1e-10


@pytest.fixture(scope="module")
def built(zoo):
    return {"lora": zoo.build_api(NAME, opt_level=0), "gpt": zoo.build_api("gpt", opt_level=0),
            "lora_o2": zoo.build_api(NAME, opt_level=2)}


def peft_model(zoo, built, perturb):
    """gpt + peft LoRA on fc1/fc2, carrying every weight of lora_gpt (perturbed, so no adapter is trivial);
    returns (lora_gpt model, peft model), both float64."""
    _, mine = zoo.load_dir(built["lora"])
    state = perturb(mine.state_dict())
    mine.load_state_dict(state)
    _, base = zoo.load_dir(built["gpt"])
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], lora_dropout=0.0, bias="none")
    theirs = peft.inject_adapter_in_model(cfg, base)
    mapped = {}
    for name, value in state.items():
        for i in range(LAYERS):
            for src, dst in ((f"h.{i}.lora.", f"h.{i}.mlp.fc1."), (f"h.{i}.lora_1.", f"h.{i}.mlp.fc2.")):
                if name.startswith(src):
                    rest = name[len(src):]
                    rest = {"linear.weight": "base_layer.weight", "linear.bias": "base_layer.bias",
                            "linear_1.weight": "lora_A.default.weight", "linear_2.weight": "lora_B.default.weight"}[rest]
                    name = dst + rest
        mapped[name] = value
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected
    return mine.double(), theirs.double()


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(seed))


def test_equals_peft_lora_on_the_same_base_weights(zoo, built, perturb):
    mine, theirs = peft_model(zoo, built, perturb)
    assert theirs.h[0].mlp.fc1.scaling["default"] == ALPHA / R
    idx = tokens(0)
    with torch.no_grad():
        want, got = theirs(idx), mine(idx)
    assert got.shape == (3, 16, 65)
    assert (got - want).abs().max().item() <= F64_TOL
    # the adapters matter: without them (peft's adapter disabled) the output moves
    for module in theirs.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.enable_adapters(False)
    with torch.no_grad():
        assert (theirs(idx) - want).abs().max().item() > 1e-3


def test_the_same_parameters_train_as_with_peft(zoo, built, perturb):
    mine, theirs = peft_model(zoo, built, perturb)
    trainable = sorted(n for n, p in mine.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"h.{i}.{m}.{ab}.weight" for i in range(LAYERS) for m in ("lora", "lora_1")
                               for ab in ("linear_1", "linear_2"))
    assert sum(p.numel() for p in mine.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad) == specc.check(zoo.spec(NAME)).trainable_params
    # one backward pass: gradients reach exactly the adapters, and equal peft's
    for model in (mine, theirs):
        model.train()
        model(tokens(1)).square().mean().backward()
    grads = {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}
    assert sorted(grads) == trainable and all(g.abs().max() > 0 for g in grads.values())
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for i in range(LAYERS):
        for m, fc in (("lora", "fc1"), ("lora_1", "fc2")):
            for ab, lora in (("linear_1", "lora_A"), ("linear_2", "lora_B")):
                g, want = grads[f"h.{i}.{m}.{ab}.weight"], peft_grads[f"h.{i}.mlp.{fc}.{lora}.default.weight"]
                assert (g - want).abs().max().item() <= F64_TOL * max(1.0, want.abs().max().item())


def test_merge_is_w_plus_scaled_b_a(zoo, built):
    o0, o2 = zoo.weights(built["lora"]), zoo.weights(built["lora_o2"])
    for i in range(LAYERS):
        for m in ("lora", "lora_1"):
            g = f"h.{i}.{m}."
            w, a, b = (o0[g + n].double() for n in ("linear.weight", "linear_1.weight", "linear_2.weight"))
            want = w + (ALPHA / R) * (b @ a)
            merged = o2[g + "linear.weight"]
            assert merged.dtype == torch.float32 and merged.shape == want.shape
            assert ((merged.double() - want).abs() <= 2.0 ** -24 * want.abs()).all()
            assert torch.equal(o2[g + "linear.bias"], o0[g + "linear.bias"])
            assert g + "linear_1.weight" not in o2 and g + "linear_2.weight" not in o2
    # and the merged model computes what the adapted one does (float64, same inputs)
    _, m0 = zoo.load_dir(built["lora"])
    _, m2 = zoo.load_dir(built["lora_o2"])
    idx = tokens(2)
    with torch.no_grad():
        err = (copy.deepcopy(m2).double()(idx) - m0.double()(idx)).abs().max().item()
    assert err <= 1e-5  # the merged weights are float32: one rounding of each weight


def test_cli_builds_and_runs_it(zoo):
    out = zoo.build_cli(NAME, run=True)
    assert zoo.manifest(out)["parameter_count"] == specc.check(zoo.spec(NAME)).params
