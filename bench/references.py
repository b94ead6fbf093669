"""Independent hand-written eager PyTorch references for the zoo specs, as a careful engineer would
write them today, and the explicit name maps that load a specc build's weights into them.

Nothing here imports specc: a reference knows only the weights file's tensor names. Each reference
uses the standard building blocks (nn.Linear, nn.LayerNorm, nn.Embedding, nn.LSTM) and
F.scaled_dot_product_attention, the fused attention kernel any modern hand-written model calls. The
layouts follow the architectures' well-known implementations:

- gpt: nanoGPT (one fused `c_attn` projection for q, k and v; SDPA with is_causal; tied head).
- itransformer: the official iTransformer code's layout (AttentionLayer with separate query, key and
  value projections), pre-norm as the spec is, SDPA instead of the explicit softmax. The separate
  projections are a real choice of that code base, so specc's QKV fusion may gain on it.
- lstm_classifier: nn.Embedding -> nn.LSTM(bidirectional) -> mean over time -> nn.Linear.

A `Case` names a zoo spec, the parameter overrides used for timing (realistic sizes) and for the
quick smoke run, how to build the reference from the bound params, how to fill it from the weights
of a specc build, and how to make inputs for a batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# GPT (nanoGPT layout)
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        assert d_model % heads == 0
        self.heads = heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # q, k, v in one projection
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, h, T, dh)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = GPTMLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, d_model: int, heads: int, layers: int, tied: bool = True,
                 **_: Any):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList([GPTBlock(d_model, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.tied = tied
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Reference parameter name -> tensor, from a specc gpt build's weights (-O0: q/k/v apart,
    concatenated here into c_attn; -O1/-O2 with QKV fusion: `qkv` taken as it is)."""
    out = {"wte.weight": state["tok.weight"], "wpe.weight": state["pos.weight"],
           "ln_f.weight": state["layer_norm.weight"], "ln_f.bias": state["layer_norm.bias"]}
    if not params.get("tied", True):
        out["lm_head.weight"] = state["logits.weight"]
    for i in range(params["layers"]):
        g, r = f"h.{i}.", f"h.{i}."
        out |= {r + "ln_1.weight": state[g + "layer_norm.weight"], r + "ln_1.bias": state[g + "layer_norm.bias"],
                r + "ln_2.weight": state[g + "layer_norm_1.weight"], r + "ln_2.bias": state[g + "layer_norm_1.bias"],
                r + "mlp.c_fc.weight": state[g + "mlp.fc1.weight"], r + "mlp.c_fc.bias": state[g + "mlp.fc1.bias"],
                r + "mlp.c_proj.weight": state[g + "mlp.fc2.weight"], r + "mlp.c_proj.bias": state[g + "mlp.fc2.bias"],
                r + "attn.c_proj.weight": state[g + "attention.o.weight"],
                r + "attn.c_proj.bias": state[g + "attention.o.bias"]}
        if g + "attention.qkv.weight" in state:
            out[r + "attn.c_attn.weight"] = state[g + "attention.qkv.weight"]
            out[r + "attn.c_attn.bias"] = state[g + "attention.qkv.bias"]
        else:
            out[r + "attn.c_attn.weight"] = torch.cat([state[g + f"attention.{p}.weight"] for p in "qkv"], dim=0)
            out[r + "attn.c_attn.bias"] = torch.cat([state[g + f"attention.{p}.bias"] for p in "qkv"], dim=0)
    return out


def gpt_inputs(batch: int, params: dict[str, Any], seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, params["vocab"], (batch, seq), generator=gen),)


# ---------------------------------------------------------------------------------------------
# iTransformer (official code's layout: separate q/k/v projections; pre-norm encoder as in the spec)
# ---------------------------------------------------------------------------------------------


class AttentionLayer(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.query_projection(x).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, dh)
        k = self.key_projection(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.value_projection(x).view(b, n, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # full attention among the variate tokens
        return self.out_projection(y.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = AttentionLayer(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, 4 * d_model)
        self.ff2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


class ITransformer(nn.Module):
    def __init__(self, lookback: int, horizon: int, d_model: int, heads: int, layers: int, eps: float = 1e-5,
                 **_: Any):
        super().__init__()
        self.eps = eps
        self.enc_embedding = nn.Linear(lookback, d_model)  # one token per variate
        self.encoder = nn.ModuleList([EncoderLayer(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.projector = nn.Linear(d_model, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, N)
        means = x.mean(1, keepdim=True)
        x = x - means
        stdev = torch.sqrt(x.pow(2).mean(1, keepdim=True) + self.eps)  # biased, as the spec
        x = x / stdev
        h = self.enc_embedding(x.transpose(1, 2))                       # (B, N, d)
        for layer in self.encoder:
            h = layer(h)
        y = self.projector(self.norm(h)).transpose(1, 2)                # (B, S, N)
        return y * stdev + means


def itransformer_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Reference parameter name -> tensor, from a specc itransformer build (-O0 names: q/k/v apart;
    a fused `qkv` from -O1/-O2 is split back)."""
    d = params["d_model"]
    out = {"enc_embedding.weight": state["tokens.weight"], "enc_embedding.bias": state["tokens.bias"],
           "norm.weight": state["layer_norm.weight"], "norm.bias": state["layer_norm.bias"],
           "projector.weight": state["proj.weight"], "projector.bias": state["proj.bias"]}
    for i in range(params["layers"]):
        g, r = f"h.{i}.", f"encoder.{i}."
        out |= {r + "norm1.weight": state[g + "layer_norm.weight"], r + "norm1.bias": state[g + "layer_norm.bias"],
                r + "norm2.weight": state[g + "layer_norm_1.weight"], r + "norm2.bias": state[g + "layer_norm_1.bias"],
                r + "ff1.weight": state[g + "mlp.fc1.weight"], r + "ff1.bias": state[g + "mlp.fc1.bias"],
                r + "ff2.weight": state[g + "mlp.fc2.weight"], r + "ff2.bias": state[g + "mlp.fc2.bias"],
                r + "attention.out_projection.weight": state[g + "attention.o.weight"],
                r + "attention.out_projection.bias": state[g + "attention.o.bias"]}
        for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
            for kind in ("weight", "bias"):
                if g + f"attention.qkv.{kind}" in state:
                    j = "qkv".index(p)  # the fused projection stacks q, k, v along the output axis
                    piece = state[g + f"attention.qkv.{kind}"][j * d:(j + 1) * d]
                else:
                    piece = state[g + f"attention.{p}.{kind}"]
                out[r + f"attention.{name}_projection.{kind}"] = piece
    return out


def itransformer_inputs(batch: int, params: dict[str, Any], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Series with a different offset and scale per variate, so the instance normalisation matters."""
    gen = torch.Generator().manual_seed(seed)
    n, length = params["variates"], params["lookback"]
    x = torch.randn(batch, length, n, generator=gen)
    scale = 0.5 + 3 * torch.rand(1, 1, n, generator=gen)
    offset = 10 * torch.rand(1, 1, n, generator=gen) - 5
    return (x * scale + offset,)


# ---------------------------------------------------------------------------------------------
# bidirectional LSTM classifier
# ---------------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int, d: int, hidden: int, layers: int, classes: int, **_: Any):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(ids))  # (B, T, 2H): forward then backward
        return self.classifier(states.mean(dim=1))


def lstm_classifier_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {"embedding.weight": state["emb.weight"], "classifier.weight": state["logits.weight"],
           "classifier.bias": state["logits.bias"]}
    for layer in range(params["layers"]):
        for suffix in ("", "_reverse"):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                out[f"lstm.{kind}_l{layer}{suffix}"] = state[f"states.{kind}_l{layer}{suffix}"]
    return out


def lstm_inputs(batch: int, params: dict[str, Any], seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, params["vocab"], (batch, seq), generator=gen),)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    spec: str                                    # zoo spec name: specs/<spec>.yaml
    make: Callable[[dict[str, Any]], nn.Module]  # the reference, from the build's bound params
    weights: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]
    inputs: Callable[[int, dict[str, Any], int], tuple[torch.Tensor, ...]]  # (batch, params, seed)
    overrides: dict[str, Any] = field(default_factory=dict)        # timing sizes
    quick_overrides: dict[str, Any] = field(default_factory=dict)  # smoke-run sizes
    size: str = ""                                                 # the timing size, in words
    rewrites: str = ""                                             # which specc rewrites can apply
    #: specc's own rewrites (conv+BN, RepConv, LoRA merge, lookup folding, training-only branches)
    #: apply: the -O2 <= 0.8 and compiled <= 0.9 targets are judged on this spec
    own_rewrites: bool = False


def load_reference(case: Case, state: dict[str, torch.Tensor], params: dict[str, Any]) -> nn.Module:
    """The reference for `params`, filled from a specc build's weights by the case's name map; every
    reference parameter must be filled exactly, and every weight of the build used."""
    model = case.make(params)
    mapped = case.weights(state, params)
    own = dict(model.named_parameters())  # a tied parameter appears once
    missing, extra = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    if missing or extra:
        raise ValueError(f"{case.spec}: the weight map does not fit the reference: missing {missing}, extra {extra}")
    used = sum(t.numel() for t in mapped.values())
    if used != sum(t.numel() for t in state.values()):
        raise ValueError(f"{case.spec}: the weight map uses {used} of {sum(t.numel() for t in state.values())} "
                         "weights of the build")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != mapped[name].shape:
                raise ValueError(f"{case.spec}: {name} is {tuple(p.shape)} in the reference, "
                                 f"{tuple(mapped[name].shape)} from the build")
            p.copy_(mapped[name])
    return model.eval()


CASES: dict[str, Case] = {
    "gpt": Case(
        "gpt", lambda p: GPT(**p), gpt_weights,
        lambda b, p, seed=0: gpt_inputs(b, p, seq=p["block_size"], seed=seed),
        overrides=dict(vocab=65, block_size=128, d_model=256, heads=4, layers=4),
        quick_overrides=dict(block_size=32, d_model=64, heads=4, layers=2),
        size="4 layers, d_model=256, 4 heads, T=128, vocab=65, tied head",
        rewrites="QKV fusion, SDPA, dropout(p=0) removed; the reference already fuses QKV and uses SDPA"),
    "itransformer": Case(
        "itransformer", lambda p: ITransformer(**p), itransformer_weights,
        lambda b, p, seed=0: itransformer_inputs(b, p, seed=seed),
        overrides=dict(lookback=96, horizon=96, variates=21, d_model=256, heads=8, layers=2),
        quick_overrides=dict(d_model=64, heads=4, layers=2),
        size="2 layers, d_model=256, 8 heads, lookback=96, horizon=96, 21 variates",
        rewrites="QKV fusion (the reference keeps q/k/v apart, as the official code), SDPA"),
    "lstm_classifier": Case(
        "lstm_classifier", lambda p: LSTMClassifier(**p), lstm_classifier_weights,
        lambda b, p, seed=0: lstm_inputs(b, p, seq=64, seed=seed),
        overrides=dict(vocab=1000, d=128, hidden=128, layers=1, classes=5),
        quick_overrides=dict(vocab=100, d=32, hidden=32, layers=1, classes=5),
        size="vocab=1000, d=128, hidden=128 per direction, T=64, 5 classes",
        rewrites="none (the generated code is the reference's nn.LSTM)"),
}
