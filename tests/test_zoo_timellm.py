"""specs/timellm.yaml (SEEDS.md row 5): Time-LLM over a tiny frozen decoder.

- The exact check of the row: the frozen backbone and the frozen word embeddings receive no gradient
  (requires_grad off, .grad stays None, an AdamW step leaves them bit-identical), while every
  reprogramming layer (patch embedding, prototype map, reprogramming attention, output projection)
  receives a non-zero one; and the loss does depend on the frozen weights (with their gradients turned
  back on, each gets a non-zero one), so it is the freezing that stops them.
- The generated model against a hand-written float64 Time-LLM forward pass whose patching is written
  the way the paper's code does it (ReplicationPad1d then unfold(16, 8), each patch embedded by the
  Conv1d kernel as a matrix), and whose attention is written out per head.

Tolerances: generated float64 vs the float64 reference <= 1e-10 (the same math, differently ordered);
generated float32 <= 1e-4 * max(1, max|reference|).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import specc

NAME = "timellm"
P = dict(lookback=64, horizon=16, variates=3, patch_len=16, stride=8, heads=4, prompt_len=8, llm_heads=4,
         llm_layers=2, d_ff=16)
TRAINABLE = ("patch_emb.", "mapping.", "reprogramming.", "reprogram.", "out.")


@pytest.fixture(scope="module")
def built(zoo):
    return zoo.build_api(NAME)


def inputs(seed: int, b: int = 2):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(P["lookback"], dtype=torch.float64)[None, :, None]
    x = 3.0 + torch.sin(t / 5.0 + torch.rand(b, 1, P["variates"], generator=gen, dtype=torch.float64) * 6) \
        + 0.3 * torch.randn(b, P["lookback"], P["variates"], generator=gen, dtype=torch.float64)
    prompt = torch.randint(0, 128, (b, P["variates"], P["prompt_len"]), generator=gen)
    return x, prompt


# ---------------------------------------------------------------------------------------------
# a hand-written float64 reference
# ---------------------------------------------------------------------------------------------

def layer_norm(x, w, prefix, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]


def lin(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def mha(x, kv, w, prefix, heads, causal):
    """x [B, T, d], kv [B, S, dkv] -> [B, T, d]; projections q/k/v/o under `prefix`."""
    q, k, v = lin(x, w, prefix + ".q"), lin(kv, w, prefix + ".k"), lin(kv, w, prefix + ".v")
    d = q.shape[-1]
    dh = d // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        c = slice(h * dh, (h + 1) * dh)
        s = q[..., c] @ k[..., c].transpose(-1, -2) / math.sqrt(dh)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        out[..., c] = torch.softmax(s, dim=-1) @ v[..., c]
    return lin(out, w, prefix + ".o")


def reference(x, prompt, w):
    b, L, n = x.shape
    mu = x.mean(1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(1, keepdim=True) + 1e-5)
    series = ((x - mu) / sigma).permute(0, 2, 1).reshape(b * n, 1, L)
    padded = F.pad(series, (0, P["stride"]), mode="replicate")[:, 0]           # ReplicationPad1d((0, stride))
    patches = padded.unfold(-1, P["patch_len"], P["stride"])                    # [B*N, P, 16]
    emb = patches @ w["patch_emb.weight"][:, 0, :].T                             # [B*N, P, d_model]
    E = w["words.weight"]                                                        # [vocab, d_llm]
    protos = lin(E.T, w, "mapping").T                                            # [prototypes, d_llm]
    cross = mha(emb, protos.expand(b * n, *protos.shape), w, "reprogramming", P["heads"], causal=False)
    h = torch.cat([E[prompt.reshape(b * n, -1)], lin(cross, w, "reprogram")], dim=1)
    for i in range(P["llm_layers"]):
        g = f"backbone.{i}."
        h = h + mha(layer_norm(h, w, g + "layer_norm"), layer_norm(h, w, g + "layer_norm"), w, g + "attention",
                    P["llm_heads"], causal=True)
        m = layer_norm(h, w, g + "layer_norm_1")
        h = h + lin(F.gelu(lin(m, w, g + "mlp.fc1")), w, g + "mlp.fc2")
    feats = layer_norm(h, w, "layer_norm")[:, P["prompt_len"]:, :P["d_ff"]]      # the patch positions
    out = lin(feats.reshape(b, n, -1), w, "out")                                 # [B, N, horizon]
    return out.permute(0, 2, 1) * sigma + mu


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_matches_a_hand_written_time_llm(zoo, built, perturb):
    _, model = zoo.load_dir(built)
    state = perturb(model.state_dict())
    model.load_state_dict(state)
    w = {k: v.double() for k, v in model.state_dict().items()}  # the tied vocab_emb is words: one value
    x, prompt = inputs(0)
    with torch.no_grad():
        want = reference(x, prompt, w)
        got64 = copy.deepcopy(model).double()(x, prompt)
        got32 = model(x.float(), prompt)
    assert got64.shape == (2, P["horizon"], P["variates"])
    assert (got64 - want).abs().max().item() <= 1e-10
    assert (got32.double() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_the_frozen_backbone_receives_zero_gradient(zoo, built):
    module, model = zoo.load_dir(built)
    model.train()
    frozen = {n for n, p in model.named_parameters() if not n.startswith(TRAINABLE)}
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "words.weight" in frozen and "layer_norm.weight" in frozen and \
        sum(n.startswith("backbone.") for n in frozen) == 16 * P["llm_layers"]
    assert model.vocab_emb.weight is model.words.weight  # the prototypes read the same frozen matrix
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, prompt = inputs(1)
    target = torch.randn(2, P["horizon"], P["variates"], generator=torch.Generator().manual_seed(2))
    loss = F.mse_loss(model(x.float(), prompt), target)
    loss.backward()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name in frozen), name
    # the loss does depend on every frozen weight: with gradients on, each one gets a non-zero gradient
    params = [p for n, p in sorted(model.named_parameters()) if n in frozen]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(F.mse_loss(model(x.float(), prompt), target), params)
    assert all(g.abs().max() > 0 for g in grads)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    assert trainable == specc.check(zoo.spec(NAME)).trainable_params


def test_cli_builds_and_runs_it(zoo):
    out = zoo.build_cli(NAME, run=True)
    assert zoo.manifest(out)["parameter_count"] == specc.check(zoo.spec(NAME)).params
