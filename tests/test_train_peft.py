"""Adapters and prefixes as a training transform (train.adapters, train.prefix): new layers inserted in
the spec's IR at named layers, the base frozen. At injection an adapter changes nothing (its up
projection starts at zero) and a prefix mixes attention as He et al. write it; training changes only
the new parameters; RUN/model/ is a build of the transformed graph that computes what the trained
model computes; resume continues exactly; a layer that cannot take one is a located error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specc.backends.pytorch.build import import_model_module
from specc.cli import main
from specc.compiler.verify import verify
from specc.train import prepare, train
from specc.train.loop import build_model
from specc.train.peft import of_recipe

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "tests" / "data" / "train_moons.yaml"
GPT = ROOT / "specs" / "gpt.yaml"
TINY = {"d_model": 16, "heads": 2, "layers": 2}
SHORT = {"data": "arithmetic(digits=2, n=600)", "steps": 6, "batch": 16, "eval.every": 3, "checkpoint.every": 3}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def with_recipe(tmp_path: Path, spec: Path, lines: str, name: str = "spec.yaml") -> Path:
    """`spec` with more keys at the end of its train: section (the last section of both files)."""
    out = tmp_path / name
    out.write_text(spec.read_text().rstrip("\n") + "\n" + lines)
    return out


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
def test_adapters_start_as_the_base_model(tmp_path, kind):
    spec = with_recipe(tmp_path, GPT, f"  adapters: {{layers: ['h.*.attention', h.1.mlp], bottleneck: 8, "
                                      f"kind: {kind}}}\n")
    src, graph, recipe = prepare(spec, TINY, train=SHORT)
    assert recipe.adapter_layers == ("h.0.attention", "h.1.attention", "h.1.mlp")
    peft = of_recipe(graph, recipe)
    verify(peft)
    base, model = build_model(src, graph, recipe).eval(), build_model(src, peft, recipe, graph).eval()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{layer}_adapter.{proj}.{w}" for layer in recipe.adapter_layers
                               for proj in ("down", "up") for w in ("weight", "bias"))
    state, base_state = model.state_dict(), base.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # the spec's seeded values
    assert state["h.1.mlp_adapter.up.weight"].abs().sum() == 0 and state["h.1.mlp_adapter.down.weight"].abs().sum() > 0
    with torch.no_grad():
        for seed in range(3):
            assert torch.equal(model(tokens(seed)), base(tokens(seed)))


def softmax_attention(q, k, v, causal):
    s = q @ k.T / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


#: attention options -> the width of its keys and values (the prefix rows'): d_model = 16 and 2 heads
ATTENTIONS = {"": 16, ", head_dim=12": 24, ", head_dim=4, rope=100.0": 8}


@pytest.mark.parametrize("options", sorted(ATTENTIONS), ids=["plain", "head-dim", "head-dim-rope"])
def test_a_prefix_mixes_attention_as_prefix_tuning_does(tmp_path, options):
    """Attention over [P_k; K], [P_v; V] = (1 - lambda) Attn(q, K, V) + lambda Attn(q, P_k, P_v), lambda
    the softmax mass of the prefix keys (He et al., eq. 5-7), in float64 on every layer; with head_dim=
    the prefix rows have the keys' width heads * head_dim (not d_model); with rope= they are unrotated
    (q and k as attend receives them are rotated already)."""
    base = GPT.read_text().replace("causal=true, dropout=dropout)", f"causal=true, dropout=dropout{options})")
    assert options in base
    (tmp_path / "base.yaml").write_text(base)
    spec = with_recipe(tmp_path, tmp_path / "base.yaml", "  prefix: {layers: ['h.*.attention'], length: 3}\n")
    width = ATTENTIONS[options]
    src, graph, recipe = prepare(spec, TINY, train=SHORT)
    peft = of_recipe(graph, recipe)
    verify(peft)
    model = build_model(src, peft, recipe, graph).eval().double()
    attention_cls = type(model.h[0].attention)
    attend, calls = attention_cls.attend, []

    def recording(q, k, v, heads, **options):
        out = attend(q, k, v, heads, **options)
        calls.append((q, k, v, heads, options, out))
        return out

    attention_cls.attend = staticmethod(recording)
    try:
        with torch.no_grad():
            model(tokens(0))
    finally:
        attention_cls.attend = staticmethod(attend)
    assert len(calls) == 2
    for layer, (q, k, v, heads, options, out) in enumerate(calls):
        prefix = options["prefix"]
        assert torch.equal(prefix, model.h[layer].attention_prefix.weight) and prefix.shape == (2, 3, width)
        assert q.shape[-1] == k.shape[-1] == width
        dh, t = width // heads, q.shape[1]
        for b in range(q.shape[0]):
            for h in range(heads):
                c = slice(h * dh, (h + 1) * dh)
                qh, kh, vh, pk, pv = q[b, :, c], k[b, :, c], v[b, :, c], prefix[0][:, c], prefix[1][:, c]
                from_prefix = torch.exp(qh @ pk.T / math.sqrt(dh)).sum(-1)
                causal = torch.ones(t, t, dtype=torch.float64).tril()
                from_keys = (torch.exp(qh @ kh.T / math.sqrt(dh)) * causal).sum(-1)
                lam = (from_prefix / (from_prefix + from_keys))[:, None]
                want = (1 - lam) * softmax_attention(qh, kh, vh, True) + lam * softmax_attention(qh, pk, pv, False)
                assert (out[b, :, c] - want).abs().max().item() <= 1e-12
                assert 0.01 < lam.min().item() and lam.max().item() < 0.99


def test_houlsby_adapter_fine_tunes_only_itself_and_stays_in_the_built_model(tmp_path):
    base = train(MOONS, tmp_path / "base", dropout=0.0)
    w0 = load_file(str(tmp_path / "base" / "checkpoints" / "step-0000040" / "model.safetensors"))
    spec = tmp_path / "adapters.yaml"
    spec.write_text(MOONS.read_text().replace("rotation=0.0", "rotation=60.0")
                    + "  adapters: {layers: [linear], bottleneck: 4}\n")
    run = tmp_path / "adapters"
    tuned = train(spec, run, dropout=0.0, weights=w0, train={"steps": 60})
    evals = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "split" in x]
    assert base.metrics["acc"] > 0.85
    # step 0 is the base model on the rotated task (up starts at zero); the adapter adapts it
    assert tuned.metrics["acc"] > evals[0]["acc"] + 0.05
    final = load_file(str(run / "checkpoints" / "step-0000060" / "model.safetensors"))
    assert all(torch.equal(final[k], w0[k]) for k in w0)  # the base is frozen
    new = sorted(set(final) - set(w0))
    assert new == ["linear_adapter.down.bias", "linear_adapter.down.weight", "linear_adapter.up.bias",
                   "linear_adapter.up.weight"]
    assert final["linear_adapter.up.weight"].abs().sum() > 0
    # RUN/model: the spec's layers and the adapter, base frozen; h + up(relu(down(h))) after `linear`
    source = (run / "model" / "model.py").read_text()
    assert "self.linear_adapter = Adapter()" in source and "'linear.weight'," in source
    built = import_model_module(run / "model").load(run / "model")
    assert sorted(built.state_dict()) == sorted(final)
    assert sorted(n for n, p in built.named_parameters() if p.requires_grad) == new
    f = {k: v.double() for k, v in final.items()}

    def layer(x, name):
        return x @ f[f"{name}.weight"].T + f[f"{name}.bias"]

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = layer(x, "linear")
    h = h + layer(torch.relu(layer(h, "linear_adapter.down")), "linear_adapter.up")
    expected = layer(torch.relu(h), "logits")
    assert torch.allclose(built(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_prefix_and_parallel_adapters_train_and_build(tmp_path):
    spec = with_recipe(tmp_path, GPT, "  prefix: {layers: ['h.*.attention'], length: 2}\n"
                                      "  adapters: {layers: ['h.*.mlp'], bottleneck: 4, kind: parallel, scale: 2.0}\n")
    run = tmp_path / "run"
    train(spec, run, train=SHORT, **TINY)
    first = load_file(str(run / "checkpoints" / "step-0000003" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    new = {k for k in final if "_prefix." in k or "_adapter." in k}
    assert new == {f"h.{i}.{n}" for i in range(2) for n in ("attention_prefix.weight", "mlp_adapter.down.weight",
                                                             "mlp_adapter.down.bias", "mlp_adapter.up.weight",
                                                             "mlp_adapter.up.bias")}
    src, graph, recipe = prepare(spec, TINY, train=SHORT)
    start = build_model(src, of_recipe(graph, recipe), recipe, graph).state_dict()
    for k in final:  # the base never moves; every new tensor does
        assert torch.equal(final[k], start[k]) == (k not in new), k
        assert torch.equal(final[k], first[k]) == (k not in new), k
    source = (run / "model" / "model.py").read_text()
    assert "prefix=attention_prefix" in source and "self.mlp_adapter = Adapter()" in source
    built = import_model_module(run / "model").load(run / "model")
    trained = build_model(src, of_recipe(graph, recipe), recipe, graph).eval()
    trained.load_state_dict(final, strict=False)
    trained.tie_weights()
    with torch.no_grad():
        assert torch.allclose(built(tokens(1)), trained(tokens(1)), atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly(tmp_path):
    spec = with_recipe(tmp_path, MOONS, "  adapters: {layers: [linear, logits], bottleneck: 4, kind: parallel}\n"
                                        "  lora: {layers: [logits], rank: 2}\n")

    def lines(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    full, part = tmp_path / "full", tmp_path / "part"
    train(spec, full, train={"steps": 20})
    assert train(spec, part, train={"steps": 20}, until=10).stopped
    train(spec, part, train={"steps": 20}, resume=part)
    assert lines(part) == lines(full)
    a = load_file(str(full / "model" / "weights.safetensors"))
    b = load_file(str(part / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "logits_adapter.up.weight" in a and not any("lora" in k for k in a)  # LoRA merges, adapters stay


def test_bad_layers_are_located_errors(tmp_path, capsys):
    spec = with_recipe(tmp_path, MOONS, "  freeze: [linear.*]\n"
                                        "  adapters: {layers: [linear, head], kind: parallel}\n"
                                        "  prefix: {layers: [logits]}\n", "bad.yaml")
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:34:31: error: adapters: 'head' matches no linear, attention or mlp layer" in err
    assert "note: close names: linear" in err
    assert "bad.yaml:35:21: error: prefix: 'logits' matches no attention layer" in err
    assert "note: the model has no attention layer" in err
    assert "bad.yaml:33:3: error: train: adapters and prefix freeze every parameter of the model already" in err
    spec = with_recipe(tmp_path, MOONS, "  adapters: {layers: [linear], kind: serial, bottleneck: 0}\n", "kind.yaml")
    assert main(["check", str(spec), "--no-color"]) == 2
    err = capsys.readouterr().err
    assert "kind.yaml:33:38: error: train.adapters.kind: Input should be 'houlsby' or 'parallel'" in err
    assert "kind.yaml:33:58: error: train.adapters.bottleneck: must be greater than 0, got 0" in err


def test_an_attention_with_a_prefix_takes_no_second_one(tmp_path, capsys):
    text = GPT.read_text().replace("causal=true, dropout=dropout)", "causal=true, dropout=dropout, "
                                                                    "prefix=parameter(2, 2, d_model))")
    spec = tmp_path / "twice.yaml"
    spec.write_text(text.rstrip("\n") + "\n  prefix: {layers: ['h.*.attention']}\n")
    assert main(["check", str(spec), "--no-color"]) == 2
    line = len(text.rstrip("\n").splitlines()) + 1
    assert (f"twice.yaml:{line}:21: error: prefix: 'h.0.attention' has a prefix already (prefix= in the spec)"
            in capsys.readouterr().err)


def test_check_names_the_transforms_of_the_recipe(tmp_path, capsys):
    from specc.cli import main

    spec = with_recipe(tmp_path, GPT, "  prefix: {layers: ['h.*.attention'], length: 2}\n"
                                      "  adapters: {layers: ['h.*.mlp'], bottleneck: 4, kind: parallel}\n")
    assert main(["check", str(spec), "--no-color"]) == 0
    assert "; adapters on 2 layers, prefixes on 2 layers" in capsys.readouterr().out
