"""specs/codegen2.yaml (SEEDS.md row 23, CodeGen2): span corruption with sentinels, then reassembly, is
the identity; the spec's prefix-LM mask, computed from the per-example prefix length, means what it
says on the built module; the module equals a hand-written float64 CodeGen2-style (GPT-J parallel
block, rotary positions on part of each head) prefix-LM; the CLI checks, builds and trains it on
span_corruption() data.

Tolerances: float64 runs of the generated model against each other when only tokens the mask hides
change: max abs error <= 1e-12 (masked keys contribute exact zeros; in practice bitwise equal). The
generated model in float64 (-O0 and -O1) against the float64 reference: <= 1e-10 (same math, float64
rounding only). The float32 -O2 build against the float64 reference: <= 1e-5 * max(1, max|oracle|)
(logits of order one; float32 rounding of about 1e-7 relative, through two blocks).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specc
from conftest import REPO, SPECS
from specc.train import data as D
from reference_ops import gelu, layer_norm

NAME = "codegen2"
SPEC = SPECS / f"{NAME}.yaml"
MASK_TOL = 1e-12
F64_TOL = 1e-10
F32_TOL = 1e-5
VOCAB, SPANS, D_MODEL, HEADS, LAYERS, BLOCK = 16, 3, 64, 4, 2, 64
ROTARY_DIM, ROPE_BASE = 8, 10000.0  # the first 8 of each head's 16 channels turn
NUM = VOCAB + 2 + SPANS  # source tokens, separator, end, sentinels


# ---------------------------------------------------------------------------------------------
# span corruption: corrupt then reassemble is the identity
# ---------------------------------------------------------------------------------------------

@st.composite
def corruption_cases(draw):
    """A sequence over range(vocab) and non-overlapping spans in order (touching allowed, ends included)."""
    vocab = draw(st.integers(1, 40))
    seq = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    spans, pos = [], 0
    for _ in range(draw(st.integers(0, 6))):
        if pos >= len(seq):
            break
        start = draw(st.integers(pos, len(seq) - 1))
        length = draw(st.integers(1, len(seq) - start))
        spans.append((start, length))
        pos = start + length
    return seq, spans, vocab


def check_layout(seq, spans, vocab, layout, prefix):
    """The layout CodeGen2's causal MLM uses, token by token."""
    sep, end, sentinels = D.span_tokens(vocab, len(spans))
    assert layout.dtype == np.int64 and len(layout) == len(seq) + 2 * len(spans) + 2
    assert layout[prefix - 1] == sep and layout[-1] == end
    text, answer = list(layout[:prefix - 1]), list(layout[prefix:-1])
    assert [t for t in text if t >= vocab] == sentinels  # each span replaced by its sentinel, in order
    assert len(text) == len(seq) - sum(n for _, n in spans) + len(spans)
    expected = []
    for s, (start, n) in zip(sentinels, spans):
        expected += [s, *seq[start:start + n]]
    assert answer == expected  # each sentinel followed by its span, in order


@settings(max_examples=300, deadline=None)
@given(corruption_cases())
def test_corrupt_then_reassemble_is_the_identity(case):
    seq, spans, vocab = case
    layout, prefix = D.corrupt(seq, spans, vocab)
    check_layout(seq, spans, vocab, layout, prefix)
    assert D.reassemble(layout, vocab).tolist() == seq
    assert D.reassemble(np.concatenate([layout, [vocab + 1, 3 % vocab]]), vocab).tolist() == seq  # after END: ignored


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(0, 6), st.integers(1, 5))
def test_chosen_spans_are_valid_and_reach_both_ends(seed, length, spans, span_length):
    if spans * span_length > length:
        spans = length // span_length
    rng = np.random.default_rng(seed)
    chosen = D.choose_spans(rng, length, spans, span_length)
    assert len(chosen) == spans
    pos = 0
    for start, n in chosen:
        assert 1 <= n <= span_length and start >= pos and start + n <= length
        pos = start + n
    seq = rng.integers(0, 7, length).tolist()
    assert D.reassemble(D.corrupt(seq, chosen, 7)[0], 7).tolist() == seq


@pytest.mark.parametrize("spans", [
    [],                         # no span: the text, the separator and the end token
    [(0, 2)],                   # at the start
    [(8, 2)],                   # at the end
    [(0, 10)],                  # the whole sequence
    [(2, 3), (5, 1), (6, 2)],   # adjacent spans
    [(0, 1), (9, 1)],           # both ends
], ids=["none", "start", "end", "whole", "adjacent", "both-ends"])
def test_edge_cases(spans):
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    layout, prefix = D.corrupt(seq, spans, 10)
    check_layout(seq, spans, 10, layout, prefix)
    assert D.reassemble(layout, 10).tolist() == seq
    if not spans:
        assert layout.tolist() == seq + [10, 11] and prefix == 11
    if spans == [(2, 3), (5, 1), (6, 2)]:
        assert layout.tolist() == [3, 1, 12, 13, 14, 5, 3, 10, 12, 4, 1, 5, 13, 9, 14, 2, 6, 11]
    assert D.corrupt([], [], 5)[0].tolist() == [5, 6] and D.reassemble([5, 6], 5).tolist() == []


def test_bad_spans_and_malformed_layouts_are_refused():
    with pytest.raises(ValueError, match="overlaps"):
        D.corrupt([1, 2, 3, 4], [(0, 2), (1, 2)], 5)
    with pytest.raises(ValueError, match="ends after"):
        D.corrupt([1, 2, 3, 4], [(3, 2)], 5)
    with pytest.raises(ValueError, match="empty"):
        D.corrupt([1, 2, 3, 4], [(1, 0)], 5)
    with pytest.raises(ValueError, match=r"tokens in range\(5\)"):
        D.corrupt([1, 5], [], 5)
    with pytest.raises(ValueError, match="no separator"):
        D.reassemble([1, 2, 6], 5)
    with pytest.raises(ValueError, match="no end token"):
        D.reassemble([1, 7, 5, 7, 2], 5)
    with pytest.raises(ValueError, match="sentinel 8 has no span"):
        D.reassemble([1, 7, 8, 5, 7, 2, 6], 5)
    with pytest.raises(ValueError, match="appears twice"):
        D.reassemble([1, 7, 5, 7, 2, 7, 3, 6], 5)
    with pytest.raises(ValueError, match="follows no sentinel"):
        D.reassemble([1, 7, 5, 2, 7, 3, 6], 5)


@pytest.mark.parametrize("source", ["random", "automata"])
def test_generated_samples_reassemble_and_mask_the_answer(source):
    g = D.GENERATORS["span_corruption"]
    args = g.bind({"n": 300, "length": 20, "vocab": 9, "spans": 3, "span_length": 4, "source": source})
    a = D.generate(g, args, seed=3)
    sep = 9
    full = np.concatenate([a["tokens"], a["targets"][:, -1:]], axis=1)
    assert np.array_equal(full[:, 1:-1], a["targets"][:, :-1])  # next-token fields of one sequence
    for row, original, prefix, mask in zip(full, a["original"], a["prefix"], a["mask"]):
        assert np.array_equal(D.reassemble(row, 9), original)
        assert row[prefix - 1] == sep and (row[:prefix - 1] != sep).all()
        # the loss sees every target after the prefix (the sentinels, spans and end token), none inside it
        assert mask.tolist() == [t >= prefix - 1 for t in range(len(mask))]
    lengths = 20 + 3 - (a["prefix"] - 1)  # tokens the spans removed
    assert lengths.min() >= 3 and lengths.max() <= 12 and len(set(lengths.tolist())) > 3  # 3 spans of 1..4
    if source == "automata":
        assert (a["original"] == 8).any()  # the automaton's string separator is the last source token
    again = D.generate(g, args, seed=3)
    assert all(np.array_equal(again[k], a[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# the prefix-LM mask on the built module
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model64():
    return specc.load(SPEC).double()


def tokens(seed: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(0, NUM, (b, t), generator=torch.Generator().manual_seed(seed))


def changed(idx: torch.Tensor, start: int, seed: int) -> torch.Tensor:
    """idx with every token from `start` on replaced by a different one."""
    out = idx.clone()
    out[:, start:] = (idx[:, start:] + 1 + tokens(seed, *idx.shape)[:, start:] % (NUM - 1)) % NUM
    assert (out[:, start:] != idx[:, start:]).all()
    return out


PREFIXES = [0, 1, 5, 11]
T = 16


def run(model, idx, prefix):
    with torch.no_grad():
        return model(idx, torch.tensor(prefix).expand(idx.shape[0]))


@pytest.mark.parametrize("p", PREFIXES)
def test_prefix_positions_do_not_see_the_rest(model64, p):
    idx = tokens(1, 3, T)
    base, other = run(model64, idx, p), run(model64, changed(idx, p, 2), p)
    if p:
        assert (other[:, :p] - base[:, :p]).abs().max().item() <= MASK_TOL
    assert (other[:, p:] - base[:, p:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("p", PREFIXES)
def test_positions_after_the_prefix_are_causal(model64, p):
    idx = tokens(3, 3, T)
    base = run(model64, idx, p)
    for t in sorted({p, p + 2, T - 2}):
        other = run(model64, changed(idx, t + 1, 4 + t), p)
        assert (other[:, :t + 1] - base[:, :t + 1]).abs().max().item() <= MASK_TOL
        assert (other[:, t + 1:] - base[:, t + 1:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("p", [2, 5, 11])
def test_prefix_positions_see_later_prefix_tokens(model64, p):
    idx = tokens(5, 3, T)
    other = idx.clone()
    other[:, p - 1] = (idx[:, p - 1] + 7) % NUM  # the last prefix token
    base, after = run(model64, idx, p), run(model64, other, p)
    for t in range(p - 1):  # every earlier prefix position sees it ...
        assert (after[:, t] - base[:, t]).abs().max().item() > 1e-3
    causal_base, causal_after = run(model64, idx, 0), run(model64, other, 0)
    assert (causal_after[:, :p - 1] - causal_base[:, :p - 1]).abs().max().item() <= MASK_TOL  # ... a causal one not


def test_prefix_per_example(model64):
    """Each batch row uses its own prefix length: the same as running the rows one by one."""
    idx, prefix = tokens(6, 4, T), torch.tensor([0, 3, 16, 64])
    with torch.no_grad():
        together = model64(idx, prefix)
        for b in range(4):
            assert (model64(idx[b:b + 1], prefix[b:b + 1])[0] - together[b]).abs().max().item() <= MASK_TOL
    assert (together[2] - run(model64, idx[2:3], 64)[0]).abs().max().item() <= MASK_TOL  # beyond T: all visible


# ---------------------------------------------------------------------------------------------
# an independent float64 reference: GPT-J / CodeGen parallel blocks with a prefix-LM mask
# ---------------------------------------------------------------------------------------------

def prefix_lm_mask(t: int, prefix: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: query i may see key j when j <= i, or when j is inside the example's prefix."""
    allowed = torch.zeros(len(prefix), t, t, dtype=torch.bool)
    for b, p in enumerate(prefix.tolist()):
        for i in range(t):
            for j in range(t):
                allowed[b, i, j] = j <= i or j < p
    return allowed


def rotary(z: torch.Tensor) -> torch.Tensor:
    """RoPE of per-head rows z [B, h, T, dh] at positions 0..T-1, GPT-NeoX "rotate half" on the first
    ROTARY_DIM channels: channel j < r/2 pairs with j + r/2, turning by the angle t * base ** (-2j / r)."""
    r, half, t = ROTARY_DIM, ROTARY_DIM // 2, z.shape[-2]
    out = z.clone()
    for j in range(half):
        for pos in range(t):
            a = pos * ROPE_BASE ** (-2.0 * j / r)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = z[..., pos, j], z[..., pos, j + half]
            out[..., pos, j], out[..., pos, j + half] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def reference(p: dict[str, torch.Tensor], idx: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    b, t = idx.shape
    dh = D_MODEL // HEADS
    allowed = prefix_lm_mask(t, prefix)[:, None]  # [B, 1, T, T]
    x = p["tok.weight"][idx]  # no position table: positions enter as rotations of q and k
    for i in range(LAYERS):
        w = {k[len(f"h.{i}."):]: v for k, v in p.items() if k.startswith(f"h.{i}.")}
        h = layer_norm(x, w["ln.weight"], w["ln.bias"])

        def heads(z):
            return z.reshape(b, t, HEADS, dh).permute(0, 2, 1, 3)

        q, k, v = (heads(h @ w[f"attention.{n}.weight"].T + w[f"attention.{n}.bias"]) for n in "qkv")
        q, k = rotary(q), rotary(k)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~allowed, float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        a = (e / e.sum(-1, keepdim=True)) @ v
        attn = a.permute(0, 2, 1, 3).reshape(b, t, D_MODEL) @ w["attention.o.weight"].T + w["attention.o.bias"]
        mlp = gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        x = x + attn + mlp  # parallel residual: attention and MLP read the same normalised x
    x = layer_norm(x, p["layer_norm.weight"], p["layer_norm.bias"])
    return x @ p["logits.weight"].T + p["logits.bias"]


@pytest.fixture(scope="module")
def weights64():
    state = specc.load(SPEC, opt_level=0).state_dict()
    return {k: v.double() for k, v in state.items()}


CASES = [(torch.tensor([0, 4, 9]), 12), (torch.tensor([16, 1, 7]), 16), (torch.tensor([64, 30, 2]), 3)]


def test_the_mask_the_spec_computes(model64):
    """The mask each attention layer receives is exactly the hand-written prefix-LM mask."""
    m = prefix_lm_mask(5, torch.tensor([0, 3]))
    assert torch.equal(m[0], torch.tril(torch.ones(5, 5, dtype=torch.bool)))  # no prefix: causal
    assert m[1, 0].tolist() == [True, True, True, False, False]  # inside the prefix: the whole prefix
    assert m[1, 3].tolist() == [True, True, True, True, False]  # after it: causal
    seen = []
    hooks = [block.attention.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["mask"]),
                                                       with_kwargs=True) for block in model64.h]
    try:
        prefix = torch.tensor([0, 1, 6, 12, 40])
        run_prefix = model64(tokens(8, 5, 12), prefix)
    finally:
        for h in hooks:
            h.remove()
    assert run_prefix.shape == (5, 12, NUM) and len(seen) == LAYERS
    for mask in seen:
        assert mask.dtype == torch.bool and torch.equal(mask.expand(5, 12, 12), prefix_lm_mask(12, prefix))


@pytest.mark.parametrize("opt_level", [0, 1])
def test_float64_module_equals_the_reference(weights64, opt_level):
    model = specc.load(SPEC, opt_level=opt_level).double()
    if opt_level == 0:
        assert set(model.state_dict()) == set(weights64)
    for i, (prefix, t) in enumerate(CASES):
        idx = tokens(10 + i, len(prefix), t)
        oracle = reference(weights64, idx, prefix)
        with torch.no_grad():
            got = model(idx, prefix)
        assert got.shape == (len(prefix), t, NUM)
        assert (got - oracle).abs().max().item() <= F64_TOL


# ---------------------------------------------------------------------------------------------
# the CLI: check, build (-O2, float32), train
# ---------------------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specc.cli", *args, "--no-color"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_check_through_the_cli():
    r = cli("check", str(SPEC))
    assert r.returncode == 0, r.stderr
    assert "codegen2: ok" in r.stdout and f"f32[B, T, {NUM}]" in r.stdout
    assert "span_corruption (tokens, targets, mask, prefix, original)" in r.stdout
    # data that does not fit the model: located at the feed
    r = cli("check", str(SPEC), "--set", "block_size=16")
    assert r.returncode == 2
    assert "codegen2.yaml:48:15: error: the input 'idx' is i64[B, T] in range(21) with T in [1, 16], but the " \
           "field 'tokens' has 31 on that axis" in r.stderr
    assert "codegen2.yaml:48:31: error: the input 'prefix' takes values in range(0, 17), the field 'prefix' " \
           "has values in range(1, 26)" in r.stderr
    r = cli("check", str(SPEC), "--set", "train.data=span_corruption(vocab=vocab, spans=9, span_length=3)")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "<--set>:1:41: error: data: span_corruption(): spans * span_length = 27 exceeds length = 24" in r.stderr


def test_float32_build_through_the_cli(zoo, weights64):
    out = zoo.build_cli(NAME, run=True)  # default -O1
    _, model = zoo.load_dir(out)
    for i, (prefix, t) in enumerate(CASES):
        idx = tokens(20 + i, len(prefix), t)
        oracle = reference(weights64, idx, prefix)
        with torch.no_grad():
            got = model(idx, prefix)
        assert got.dtype == torch.float32
        assert (got.double() - oracle).abs().max().item() <= F32_TOL * max(1.0, oracle.abs().max().item())
    src = (out / "model.py").read_text()
    assert "in_prefix = pos.unsqueeze(0) < prefix.unsqueeze(1)" in src
    r = cli("build", str(SPEC), "-o", str(out.parent / "o2"), "-O2", "--run")
    assert r.returncode == 0, r.stderr
    _, model2 = zoo.load_dir(out.parent / "o2")
    prefix, t = CASES[0]
    idx = tokens(30, len(prefix), t)
    oracle = reference(weights64, idx, prefix)
    with torch.no_grad():
        assert (model2(idx, prefix).double() - oracle).abs().max().item() <= F32_TOL * max(1.0, oracle.abs().max())


def test_a_short_training_run_lowers_the_loss(zoo, tmp_path):
    run_dir = tmp_path / "run"
    r = cli("train", str(SPEC), "-o", str(run_dir), "--set", "d_model=32", "--set", "layers=1",
            "--set", "train.steps=40", "--set", "train.eval.every=40", "--set", "train.checkpoint.every=40",
            "--set", "train.data=span_corruption(vocab=vocab, spans=spans, span_length=3, n=2000)")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m.get("split") == "val"]
    assert [m["step"] for m in evals] == [0, 40]
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert evals[-1]["loss"] < 0.95 * evals[0]["loss"]  # about 3.1 (chance over 21 tokens) -> about 2.8
    # the trained model is a build of the spec: it loads and takes a prefix
    _, model = zoo.load_dir(run_dir / "model")
    with torch.no_grad():
        assert torch.isfinite(model(tokens(7, 2, 31), torch.tensor([20, 25]))).all()
