"""specs/ngram_head.yaml (SEEDS.md row 12, n-gram heads): the head's output equals the in-context n-gram
counts computed by a hand-written loop, for n = 1 to 4, on random sequences over a small vocabulary and
on sequences from a random finite automaton (the paper's data).

Tolerances: counts are small integers, exact in float32, so they are compared for equality; probs
(counts / total) against the float64 loop: max abs error <= 1e-6 (one float32 division).
"""

from __future__ import annotations

import pytest
import torch

import specc
from conftest import SPECS

SPEC = SPECS / "ngram_head.yaml"
VOCAB = 8


def ngram_counts(seq: list[int], n: int) -> torch.Tensor:
    """counts[i, v]: how often v followed the context seq[i - n + 2 .. i] at positions j <= i."""
    out = torch.zeros(len(seq), VOCAB, dtype=torch.float64)
    for i in range(len(seq)):
        if i - (n - 2) < 0:
            continue  # the context is not complete yet
        context = seq[i - n + 2:i + 1]
        for j in range(n - 1, i + 1):
            if seq[j - n + 1:j] == context:
                out[i, seq[j]] += 1
    return out


def automaton_sequences(count: int, length: int, seed: int) -> torch.Tensor:
    """Sequences of a random finite automaton: 4 states, each with 2 outgoing tokens and their next states."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, 2), generator=gen)
    nxt = torch.randint(0, 4, (4, 2), generator=gen)
    rows = []
    for _ in range(count):
        state, row = 0, []
        for _ in range(length):
            c = int(torch.randint(0, 2, (1,), generator=gen))
            row.append(int(tokens[state, c]))
            state = int(nxt[state, c])
        rows.append(row)
    return torch.tensor(rows)


def batches():
    gen = torch.Generator().manual_seed(0)
    yield torch.randint(0, 3, (6, 16), generator=gen)  # small alphabet: many repeated contexts
    yield automaton_sequences(6, 20, seed=1)
    yield torch.tensor([[1, 2, 1, 2, 1, 2, 3, 1, 2, 1]])  # a periodic sequence


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_output_equals_in_context_ngram_counts(n):
    model = specc.load(SPEC, n=n)
    matched = 0
    for ids in batches():
        with torch.no_grad():
            counts, probs = model(ids)
        want = torch.stack([ngram_counts(row.tolist(), n) for row in ids])
        assert torch.equal(counts.double(), want)
        total = want.sum(-1, keepdim=True)
        want_probs = torch.where(total > 0, want / total.clamp(min=1), 0.0)
        assert (probs.double() - want_probs).abs().max().item() <= 1e-6
        matched += int((total > 0).sum())
    assert matched > 20  # contexts recur, so the check is not about empty rows


def test_cli_builds_other_orders(zoo):
    out = zoo.build_cli("ngram_head", "n=4", run=True)
    assert zoo.manifest(out)["params"]["n"] == 4 and zoo.manifest(out)["parameter_count"] == 0
    _, model = zoo.load_dir(out)
    ids = automaton_sequences(2, 12, seed=3)
    with torch.no_grad():
        counts, _ = model(ids)
    assert torch.equal(counts.double(), torch.stack([ngram_counts(row.tolist(), 4) for row in ids]))
