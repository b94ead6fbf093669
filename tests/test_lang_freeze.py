"""The top-level `freeze:` list: glob patterns over parameter paths mark parameters frozen; a
pattern that matches nothing is a located error. A frozen backbone receives no gradient (SEEDS.md
rows 5, 18, 21: Time-LLM, frozen visual embeddings, CODA-Prompt)."""

from __future__ import annotations

import re

import torch

import specc
from specc.cli import main

HEAD_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")

BACKBONE = """\
specc: 1
name: adapter
params:
  d: 16
  layers: 2
inputs:
  ids: i64[B, T] in range(50)
blocks:
  block(x): |
    x = x + attention(layer_norm(x), heads=2)
    x = x + mlp(layer_norm(x), hidden=2 * d)
    return x
freeze:
  - emb.*
  - h.*.attention.*
  - h.1.*
graph: |
  emb = embedding(ids, 50, d)
  h = repeat(layers, block, emb)
  head = linear(layer_norm(h), 5)
outputs:
  head: f32[B, T, 5]
"""


def param_flags(spec: str, **overrides) -> dict[str, bool]:
    graph = specc.compile(spec, **overrides)
    return {".".join(n.path + (p.name,)): p.frozen for _, n in graph.nodes() for p in n.params}


def test_patterns_freeze_matching_parameters():
    flags = param_flags(BACKBONE)
    frozen = {k for k, v in flags.items() if v}
    assert "emb.weight" in frozen
    assert {k for k in flags if k.startswith("h.0.attention.")} <= frozen  # h.*.attention.*
    assert {k for k in flags if k.startswith("h.1.")} <= frozen  # h.1.*: the whole second block
    assert not any(v for k, v in flags.items() if k.startswith("h.0.mlp.") or k.startswith("h.0.layer_norm"))
    assert not any(v for k, v in flags.items() if k.startswith("head."))
    s = specc.check(BACKBONE)
    trainable = sum(p.numel() for _, n in specc.compile(BACKBONE).nodes() for p in n.params if not p.frozen)
    assert s.trainable_params == trainable < s.params


def test_frozen_backbone_gets_no_gradient():
    model = specc.load(BACKBONE, opt_level=0)
    model.train()
    ids = torch.randint(0, 50, (2, 6))
    model(ids).pow(2).mean().backward()
    flags = param_flags(BACKBONE)
    for name, p in model.named_parameters():
        if flags[name]:
            assert not p.requires_grad and (p.grad is None or not p.grad.any()), name
        else:
            assert p.requires_grad and p.grad is not None, name
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    before = model.emb.weight.detach().clone()
    opt.step()
    assert torch.equal(model.emb.weight, before)


def test_freezing_a_tied_parameter_freezes_its_storage():
    spec = """\
specc: 1
name: tied
inputs:
  ids: i64[B, T] in range(10)
freeze: [head.*]
graph: |
  tok = embedding(ids, 10, 8)
  head = linear(tok, 10, bias=false, tie=tok)
outputs:
  head: null
"""
    flags = param_flags(spec)
    assert flags == {"tok.weight": True, "head.weight": True}
    model = specc.load(spec, opt_level=0)
    assert model.head.weight is model.tok.weight and not model.tok.weight.requires_grad


def test_pattern_matching_nothing_is_an_error_at_its_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(BACKBONE.replace("  - h.1.*\n", "  - h.1.*\n  - h.*.atention.*\n  - nothing\n"))
    code = main(["check", str(path), "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    heads = [(int(m["line"]), int(m["col"]), m["msg"]) for m in map(HEAD_RE.match, err.splitlines()) if m]
    lines = path.read_text().splitlines()
    at = lines.index("  - h.*.atention.*") + 1
    assert heads[0] == (at, 5, "freeze: the pattern 'h.*.atention.*' matches no parameter"), err
    assert "close names: " in err and "h.0.attention" in err
    assert heads[1][:2] == (at + 1, 5) and "'nothing' matches no parameter" in heads[1][2]
    assert err.count("^") >= 2


def test_bad_patterns_are_refused_by_the_schema(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(BACKBONE.replace("  - h.1.*\n", "  - h 1\n"))
    code = main(["check", str(path), "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a parameter-path pattern" in err and "Traceback" not in err, err


def test_a_depth_that_drops_the_block_makes_its_pattern_an_error():
    try:
        specc.check(BACKBONE, layers=1)
    except specc.SpecError as e:
        assert [d.message for d in e.diagnostics] == ["freeze: the pattern 'h.1.*' matches no parameter"]
        assert e.diagnostics[0].span.line == BACKBONE.splitlines().index("  - h.1.*") + 1
    else:
        raise AssertionError("expected an error")
