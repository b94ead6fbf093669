"""specs/transformer_program.yaml (SEEDS.md row 6, Learning Transformer Programs): the discretised model
equals its lookup-table form on every input of a small domain (every sequence of BOS followed by up to
4 tokens from {1, 2, 3}: 121 inputs). The lookup-table form is a hand-written program: predicate
tables read from the weights (pred > 0), hard attention as a loop over keys (closest match at or before
the query, else BOS), numerical attention as the mean of the value over all matching keys (else BOS),
the categorical MLP as a 4 x 4 table over its two inputs, and the readout as one column of the linear
layer per variable (times the value, for the numerical one). At -O2 the compiler itself folds the categorical MLP into a
16-row table; that build must give the same logits.

Tolerances: the generated model in float64 against the program in float64: max abs error <= 1e-12
(the readout adds the same 4 weights in another order); the -O2 build in float32: <= 1e-5 (logits of
order one). The discrete choices (predicate signs, the MLP's argmax) are checked to have margins far
above float32 rounding, so that no comparison rests on a near tie.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import specc
from conftest import SPECS
from specc.verify import float64_run
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

SPEC = SPECS / "transformer_program.yaml"
V = 4  # vocab; token 0 is BOS


def domain(length: int) -> torch.Tensor:
    """Every sequence of BOS followed by length - 1 tokens from {1, .., V - 1}."""
    rows = [(0,) + rest for rest in itertools.product(range(1, V), repeat=length - 1)]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def weights():
    return {k: v.double() for k, v in specc.load(SPEC, opt_level=0).state_dict().items()}


def tables(w):
    """The program's tables: two predicates, the MLP's table over (a, b), and the readout columns."""
    pred_a, pred_b, pred_n = (w[f"{h}.weight"] > 0 for h in ("a.matches.pred", "b.matches.pred", "frac.match.pred"))
    pairs = torch.cat([F.one_hot(torch.arange(V).repeat_interleave(V), V), F.one_hot(torch.arange(V).repeat(V), V)],
                      dim=-1).double()  # row a * V + b
    scores = F.gelu(pairs @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
    top2 = scores.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3  # no near tie in the table
    assert min(w[k].abs().min().item() for k in w if k.endswith("pred.weight")) > 1e-3
    table = scores.argmax(-1).reshape(V, V).tolist()
    return pred_a.tolist(), pred_b.tolist(), pred_n.tolist(), table, w["logits.weight"], w["logits.bias"]


def attend(pred, q, k, v, i):
    """The closest key j <= i with pred[q[i]][k[j]], else BOS (position 0); returns v[j] and whether it matched."""
    for j in range(i, -1, -1):
        if pred[q[i]][k[j]]:
            return v[j], True
    return v[0], False


def mean_attend(pred, q, k, value, i):
    """The mean of value[j] over every key j <= i with pred[q[i]][k[j]], else value[0] (BOS)."""
    picked = [j for j in range(i + 1) if pred[q[i]][k[j]]] or [0]
    return sum(value[j] for j in picked) / len(picked)


def program(seq, t, stats):
    pred_a, pred_b, pred_n, table, readout, bias = t
    n = len(seq)
    a, b, logits = [], [], []
    for i in range(n):
        val, hit = attend(pred_a, seq, seq, seq, i)
        a.append(val)
        stats[hit] += 1
    for i in range(n):
        val, hit = attend(pred_b, seq, a, seq, i)
        b.append(val)
        stats[hit] += 1
    ones = [1.0 if tok == 1 else 0.0 for tok in seq]
    for i in range(n):
        m = table[a[i]][b[i]]
        frac = mean_attend(pred_n, seq, seq, ones, i)
        stats["fractions"].add(frac)
        logits.append(bias + readout[:, seq[i]] + readout[:, V + a[i]] + readout[:, 2 * V + b[i]]
                      + readout[:, 3 * V + m] + readout[:, 4 * V] * frac)
    return torch.stack(logits)


def test_the_model_equals_its_lookup_table_form_on_the_whole_domain(weights):
    t = tables(weights)
    model64 = specc.load(SPEC, opt_level=0).double()
    model_o2 = specc.load(SPEC, opt_level=2)
    stats = {True: 0, False: 0, "fractions": set()}
    for length in range(1, 6):
        ids = domain(length)
        want = torch.stack([program(seq.tolist(), t, stats) for seq in ids])
        with torch.no_grad():  # float64_run: one_hot values are made in float64 too
            got64, got_o2 = float64_run(model64, (ids,)), model_o2(ids)
        assert got64.shape == (len(ids), length, 4)
        assert (got64 - want).abs().max().item() <= 1e-12
        assert (got_o2.double() - want).abs().max().item() <= 1e-5
    assert stats[True] > 50 and stats[False] > 50  # heads both match keys and fall back to BOS
    assert len(stats["fractions"]) >= 4  # the numerical head sees several shares of 1s


def test_o2_folds_the_categorical_mlp_into_a_table():
    graph, _ = optimize(specc.compile(SPEC), PassContext(opt_level=2))
    ir = print_graph(graph, show_span=False)
    assert "= mlp(" not in ir and "embedding(" in ir and "num=16, dim=4" in ir


def test_cli_builds_and_runs(zoo):
    out = zoo.build_cli("transformer_program", run=True)
    manifest = zoo.manifest(out)
    assert manifest["parameter_count"] == specc.check(SPEC).params
    assert "torch.gather(v, 1, j)" in (out / "model.py").read_text()
