"""specs/peft_gpt.yaml (SEEDS.md row 9): LoRA on q and v, prefix tuning, a Houlsby adapter and a scaled
parallel adapter on a frozen gpt decoder.

- Prefix tuning as He et al. write it (their eq. 5-7): attention over [P_k; K] and [P_v; V] equals
  (1 - lambda) Attn(q, K, V) + lambda Attn(q, P_k, P_v), lambda(q) = sum_i exp(q P_k_i) /
  (sum_i exp(q P_k_i) + sum_j exp(q K_j)) per head (scores scaled by 1/sqrt(d_head), K causal). Checked on
  every layer of the built model, on the q/k/v/prefix it actually attends with, in float64.
- The LoRA merge W + s * B @ A is exact: -O2 leaves no rank-r linear, its merged weights are the float64
  value rounded once, and -O2 equals -O0 (specc.verify).
- LoRA on q and v equals the `peft` library's LoRA on the same base weights (float64, <= 1e-10).
- Only the LoRA matrices, prefixes and adapters train: the frozen base gets no gradient, each of those
  gets a non-zero one.

Tolerances: float64 identity <= 1e-12 (both sides the same float64 math, differently ordered); merged
float32 weights within half a float32 ulp of the float64 value (|error| <= 2**-24 * |value|).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph
from specc.verify import verify

NAME = "peft_gpt"
R, ALPHA, HEADS, LAYERS, PREFIX = 4, 8.0, 4, 2, 4


@pytest.fixture(scope="module")
def built(zoo):
    return {"o0": zoo.build_api(NAME, opt_level=0), "o2": zoo.build_api(NAME, opt_level=2)}


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(seed))


def softmax_attention(q, k, v, causal):
    """q [T, dh], k/v [S, dh] -> [T, dh]; causal: key j visible to query t when j <= t."""
    s = q @ k.T / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_prefix_attention_is_the_papers_gated_mixture(zoo, built):
    module, model = zoo.load_dir(built["o0"])
    model = model.double()
    calls = []
    attend = module.MultiHeadAttention.attend

    def recording(q, k, v, heads, **options):
        out = attend(q, k, v, heads, **options)
        calls.append((q, k, v, heads, options, out))
        return out

    module.MultiHeadAttention.attend = staticmethod(recording)
    try:
        with torch.no_grad():
            model(tokens(0))
    finally:
        module.MultiHeadAttention.attend = staticmethod(attend)
    assert len(calls) == LAYERS
    for layer, (q, k, v, heads, options, out) in enumerate(calls):
        prefix = options["prefix"]
        assert heads == HEADS and options["causal"] and prefix.shape == (2, PREFIX, 64)
        assert torch.equal(prefix, getattr(model.h[layer].self_attention, "prefix").weight)
        dh = 64 // heads
        lambdas = []
        for b in range(q.shape[0]):
            for h in range(heads):
                c = slice(h * dh, (h + 1) * dh)
                qh, kh, vh, pk, pv = q[b, :, c], k[b, :, c], v[b, :, c], prefix[0][:, c], prefix[1][:, c]
                scale = 1.0 / math.sqrt(dh)
                from_prefix = torch.exp(qh @ pk.T * scale).sum(-1)  # [T]
                from_keys = (torch.exp(qh @ kh.T * scale) * torch.ones(16, 16, dtype=torch.float64).tril()).sum(-1)
                lam = (from_prefix / (from_prefix + from_keys))[:, None]
                want = (1 - lam) * softmax_attention(qh, kh, vh, True) + lam * softmax_attention(qh, pk, pv, False)
                assert (out[b, :, c] - want).abs().max().item() <= 1e-12
                lambdas.append(lam)
        lam = torch.cat(lambdas)
        assert 0.01 < lam.min().item() and lam.max().item() < 0.99  # both parts weigh in


def test_lora_merge_is_exact(zoo, built):
    graph, _ = optimize(specc.compile(zoo.spec(NAME)), PassContext(opt_level=2))
    ir = print_graph(graph, show_span=False)
    assert not re.search(rf"linear\([^)]*out={R},", ir) and f"[B, T, {R}]" not in ir
    assert ir.count("= attend(") == LAYERS and ir.count("= parameter(") == LAYERS
    o0, o2 = zoo.weights(built["o0"]), zoo.weights(built["o2"])
    for i in range(LAYERS):
        for proj in ("q", "v"):
            g = f"h.{i}.self_attention.{proj}."
            want = o0[g + "base.weight"].double() + (ALPHA / R) * (o0[g + "b.weight"].double() @ o0[g + "a.weight"].double())
            merged = o2[g + "base.weight"].double()
            assert ((merged - want).abs() <= 2.0 ** -24 * want.abs()).all()
            assert g + "a.weight" not in o2 and g + "b.weight" not in o2
    assert verify(zoo.spec(NAME), examples=4).ok


def test_lora_on_q_and_v_equals_peft_lora(zoo, built, perturb):
    """The spec's LoRA against peft's on the same base weights: a copy of the model whose own updates are
    switched off (B = 0) gets peft's LoRA on the q/v base linears, carrying the spec's A and B."""
    peft = pytest.importorskip("peft")
    _, mine = zoo.load_dir(built["o0"])
    mine.load_state_dict(perturb(mine.state_dict()))
    mine = mine.double()
    theirs = copy.deepcopy(mine)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=r"h\.\d+\.self_attention\.[qv]\.base",
                          lora_dropout=0.0, bias="none")
    theirs = peft.inject_adapter_in_model(cfg, theirs)
    wrapped = 0
    with torch.no_grad():
        for i in range(LAYERS):
            for proj in ("q", "v"):
                lora, adapted = getattr(mine.h[i].self_attention, proj), getattr(theirs.h[i].self_attention, proj)
                adapted.b.weight.zero_()
                adapted.base.lora_A["default"].weight.copy_(lora.a.weight)
                adapted.base.lora_B["default"].weight.copy_(lora.b.weight)
                wrapped += 1
    assert wrapped == 2 * LAYERS and theirs.h[0].self_attention.q.base.scaling["default"] == ALPHA / R
    idx = tokens(3)
    with torch.no_grad():
        want, got = theirs(idx), mine(idx)
    assert (got - want).abs().max().item() <= 1e-10
    for module in theirs.modules():  # without peft's adapters the copy computes something else
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.enable_adapters(False)
    with torch.no_grad():
        assert (theirs(idx) - want).abs().max().item() > 1e-3


def test_only_the_parameter_efficient_parts_train(zoo, built):
    _, model = zoo.load_dir(built["o0"])
    model.train()
    model(tokens(1)).square().mean().backward()
    peft_part = re.compile(r"h\.\d\.(self_attention\.([qv]\.[ab]\.weight|prefix\.weight|adapter\.(down|up)\.\w+)"
                           r"|adapter\.(down|up)\.\w+)$")
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n in names if peft_part.match(n)]
    assert len(trainable) == LAYERS * (2 * 2 + 1 + 4 + 4)
    for name, p in model.named_parameters():
        if peft_part.match(name):
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        specc.check(zoo.spec(NAME)).trainable_params


def test_cli_builds_and_runs_it(zoo):
    out = zoo.build_cli(NAME, run=True)
    assert zoo.manifest(out)["parameter_count"] == specc.check(zoo.spec(NAME)).params
