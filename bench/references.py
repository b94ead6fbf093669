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
# RepVGG (training-time layout of the official code: 3x3 conv+BN, 1x1 conv+BN and identity+BN branches)
# ---------------------------------------------------------------------------------------------


def needs_o0(state: dict[str, torch.Tensor], name: str, spec: str) -> None:
    """The references of specs whose -O2 rewrites merge parameters (BN folding, RepVGG, LoRA merge,
    lookup folding) keep those parameters apart, so only an -O0 (or -O1) build's weights fit them."""
    if name not in state:
        raise ValueError(f"{spec}: the reference needs the weights of an -O0 build ({name!r} is missing; "
                         "-O2 merges the parameters the reference keeps apart)")


def conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)]), unmerged, as trained; the identity branch
    (a BatchNorm of x, as in the paper and the spec) only where stride is 1 and the channels match."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cin) if stride == 1 and cin == cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        return F.relu(y if self.rbr_identity is None else y + self.rbr_identity(x))


class RepVGG(nn.Module):
    def __init__(self, width: int, depth: int, classes: int, **_: Any):
        super().__init__()
        stages, cin = [], 3
        for s in range(3):
            cout = width * 2 ** s
            stages.append(nn.Sequential(RepVGGBlock(cin, cout, 2), *[RepVGGBlock(cout, cout, 1) for _ in range(depth)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def repvgg_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """From -O0 names: `down{,_1,_2}.conv_bn{,_1}.{conv2d,batch_norm}` for the stride-2 blocks and
    `s{1,2,3}.{i}.conv_bn{,_1}...` and `s{1,2,3}.{i}.batch_norm` (the identity's BN) for the
    repeated identity blocks."""
    needs_o0(state, "down.conv_bn.batch_norm.running_var", "repvgg")
    out = {"linear.weight": state["logits.weight"], "linear.bias": state["logits.bias"]}

    kinds = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def block(src: str, dst: str, identity: bool) -> None:
        for branch, name in (("conv_bn", "rbr_dense"), ("conv_bn_1", "rbr_1x1")):
            out[f"{dst}.{name}.0.weight"] = state[f"{src}.{branch}.conv2d.weight"]
            for kind in kinds:
                out[f"{dst}.{name}.1.{kind}"] = state[f"{src}.{branch}.batch_norm.{kind}"]
        if identity:
            for kind in kinds:
                out[f"{dst}.rbr_identity.{kind}"] = state[f"{src}.batch_norm.{kind}"]

    for s in range(3):
        block("down" + (f"_{s}" if s else ""), f"stages.{s}.0", identity=False)
        for i in range(params["depth"]):
            block(f"s{s + 1}.{i}", f"stages.{s}.{i + 1}", identity=True)
    return out


def image_inputs(batch: int, params: dict[str, Any], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=gen),)


# ---------------------------------------------------------------------------------------------
# GPT with LoRA on the MLP projections (peft-style LoRA linear: frozen base + scaled B(A x))
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    def __init__(self, cin: int, cout: int, r: int, alpha: float):
        super().__init__()
        self.base = nn.Linear(cin, cout)
        self.lora_A = nn.Linear(cin, r, bias=False)
        self.lora_B = nn.Linear(r, cout, bias=False)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


class LoRAMLP(nn.Module):
    def __init__(self, d_model: int, r: int, alpha: float):
        super().__init__()
        self.c_fc = LoRALinear(d_model, 4 * d_model, r, alpha)
        self.c_proj = LoRALinear(4 * d_model, d_model, r, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class LoRAGPT(GPT):
    def __init__(self, vocab: int, block_size: int, d_model: int, heads: int, layers: int, r: int, alpha: float,
                 tied: bool = True, **_: Any):
        super().__init__(vocab, block_size, d_model, heads, layers, tied)
        for block in self.h:
            block.mlp = LoRAMLP(d_model, r, alpha)


def lora_gpt_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The gpt map for everything but the MLP; each MLP projection from -O0's `lora{,_1}.linear`
    (base), `.linear_1` (A) and `.linear_2` (B)."""
    needs_o0(state, "h.0.lora.linear_1.weight", "lora_gpt")
    out = {}
    for i in range(params["layers"]):
        g = f"h.{i}."
        for src, dst in (("lora", "c_fc"), ("lora_1", "c_proj")):
            m = f"h.{i}.mlp.{dst}."
            out |= {m + "base.weight": state[g + src + ".linear.weight"], m + "base.bias": state[g + src + ".linear.bias"],
                    m + "lora_A.weight": state[g + src + ".linear_1.weight"],
                    m + "lora_B.weight": state[g + src + ".linear_2.weight"]}
        # the gpt map reads the plain MLP's names; give it the base weights and drop what it made
        state = state | {g + "mlp.fc1.weight": state[g + "lora.linear.weight"], g + "mlp.fc1.bias": state[g + "lora.linear.bias"],
                         g + "mlp.fc2.weight": state[g + "lora_1.linear.weight"], g + "mlp.fc2.bias": state[g + "lora_1.linear.bias"]}
    base = {k: v for k, v in gpt_weights(state, params).items() if ".mlp." not in k}
    return base | out


# ---------------------------------------------------------------------------------------------
# glyph embedding classifier: frozen table, per-token adapter, mean pooling, linear head
# ---------------------------------------------------------------------------------------------


class GlyphClassifier(nn.Module):
    def __init__(self, vocab: int, d: int, hidden: int, classes: int, **_: Any):
        super().__init__()
        self.glyphs = nn.Embedding(vocab, d)
        self.glyphs.weight.requires_grad_(False)  # frozen rendered-glyph table
        self.norm = nn.LayerNorm(d)
        self.adapter = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.adapter(self.norm(self.glyphs(ids)))  # (B, T, d), one token at a time
        return self.head(tokens.mean(dim=1))


def glyph_weights(state: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    needs_o0(state, "layer_norm.weight", "glyph_embedding")
    return {"glyphs.weight": state["glyph.weight"], "norm.weight": state["layer_norm.weight"],
            "norm.bias": state["layer_norm.bias"], "adapter.0.weight": state["linear.weight"],
            "adapter.0.bias": state["linear.bias"], "adapter.2.weight": state["tokens.weight"],
            "adapter.2.bias": state["tokens.bias"], "head.weight": state["logits.weight"],
            "head.bias": state["logits.bias"]}


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
    reference parameter and buffer must be filled exactly, and every weight of the build used."""
    model = case.make(params)
    mapped = case.weights(state, params)
    # a tied parameter appears once; buffers (BatchNorm running statistics) are weights of the build too
    own = dict(model.named_parameters()) | dict(model.named_buffers())
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
    "repvgg": Case(
        "repvgg", lambda p: RepVGG(**p), repvgg_weights,
        lambda b, p, seed=0: image_inputs(b, p, seed=seed),
        overrides=dict(width=32, depth=2, classes=10),
        quick_overrides=dict(width=8, depth=1, classes=10),
        size="3 stages of 32/64/128 channels, 1 stride-2 + 2 identity blocks each, 32x32 input",
        rewrites="BN folding + RepVGG branch merge (each block one 3x3 conv); the reference keeps the "
                 "training-time branches", own_rewrites=True),
    "lora_gpt": Case(
        "lora_gpt", lambda p: LoRAGPT(**p), lora_gpt_weights,
        lambda b, p, seed=0: gpt_inputs(b, p, seq=p["block_size"], seed=seed),
        overrides=dict(vocab=65, block_size=128, d_model=256, heads=4, layers=4, r=8),
        quick_overrides=dict(block_size=32, d_model=64, heads=4, layers=2, r=4),
        size="4 layers, d_model=256, 4 heads, T=128, LoRA r=8 on both MLP projections",
        rewrites="LoRA merge into the base weights, QKV fusion, SDPA; the reference runs the adapters "
                 "unmerged (as peft does before merge_and_unload)", own_rewrites=True),
    "glyph_embedding": Case(
        "glyph_embedding", lambda p: GlyphClassifier(**p), glyph_weights,
        lambda b, p, seed=0: lstm_inputs(b, p, seq=128, seed=seed),
        overrides=dict(vocab=1000, d=256, hidden=512, classes=10),
        quick_overrides=dict(vocab=256, d=64, hidden=128, classes=10),
        size="vocab=1000, d=256, adapter 256-512-256, T=128, 10 classes",
        rewrites="lookup folding: table + layer norm + adapter MLP become one [vocab, d] table",
        own_rewrites=True),
}
