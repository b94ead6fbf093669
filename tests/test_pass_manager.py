"""The pass manager: opt levels, disabling, printing after passes, verification between passes,
and what the manifest records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import specc
import specc.compiler.passes as pm
from specc.compiler.passes import PASSES, PassContext, PassError, PassInfo, PassResult, optimize
from specc.compiler.rewrite import Editor

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "specs" / "gpt.yaml"


def test_pipeline_lists_every_pass_once():
    assert sorted(pm.pipeline()) == sorted(PASSES)
    assert len(set(pm.pipeline())) == len(pm.pipeline())


def test_opt_levels_and_disabled_passes():
    graph = specc.compile(GPT)
    _, none = optimize(graph, PassContext(opt_level=0))
    assert [r.name for r in none] == ["drop_training_outputs"] and not none[0].modified  # deploy builds only
    _, o1 = optimize(graph, PassContext(opt_level=1))
    assert {r.name for r in o1} == {n for n, p in PASSES.items() if p.opt_level <= 1}
    _, o2 = optimize(graph, PassContext(opt_level=2, disabled=frozenset({"fuse_qkv"})))
    assert "fuse_qkv" not in {r.name for r in o2} and "merge_linear_chains" in {r.name for r in o2}


def test_passes_never_mutate_their_input():
    graph = specc.compile(GPT)
    before = [(nid, n) for nid, n in graph.nodes()]
    optimize(graph, PassContext(opt_level=2))
    assert [(nid, n) for nid, n in graph.nodes()] == before


def test_print_after():
    printed = []
    optimize(specc.compile(GPT), PassContext(print_after=frozenset({"attention_sdpa"}), emit=printed.append))
    assert len(printed) == 1 and printed[0].startswith("// IR after attention_sdpa") and 'impl="sdpa"' in printed[0]
    printed.clear()
    optimize(specc.compile(GPT), PassContext(print_after=frozenset({"all"}), emit=printed.append))
    assert len(printed) == len([p for p in PASSES.values() if p.opt_level <= 1])


def test_verifier_names_the_broken_pass_and_those_before(monkeypatch):
    def broken(graph, ctx):
        ed = Editor(graph)
        nid = next(n for n, node in ed.graph.nodes() if node.op == "linear")
        node = ed.node(nid)
        ed.set(nid, node.replace(outputs=(node.outputs[0].__class__("f32", (7,)),)))  # a wrong type
        return PassResult(ed.graph, True)

    monkeypatch.setitem(PASSES, "broken", PassInfo("broken", 1, "breaks types", broken))
    monkeypatch.setattr(pm, "pipeline", lambda: ["fold_constants", "cse", "broken", "dce"])
    with pytest.raises(PassError) as e:
        optimize(specc.compile(GPT), PassContext(verify_each=True))
    msg = str(e.value)
    assert "after pass 'broken'" in msg and "fold_constants, cse, broken" in msg and "differ from inferred" in msg
    optimize(specc.compile(GPT), PassContext(verify_each=False))  # without verification it goes through


def test_manifest_records_changed_passes_and_counts(tmp_path):
    out = specc.build(GPT, tmp_path / "o2", opt_level=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["opt_level"] == 2
    names = [p["pass"] for p in manifest["passes"]]
    assert names == ["eliminate_identity", "fuse_qkv", "attention_sdpa"]
    nodes = manifest["graph"]["nodes"]
    assert nodes[1] < nodes[0]
    assert manifest["graph"]["parameters"][0] == manifest["graph"]["parameters"][1]
    out0 = specc.build(GPT, tmp_path / "o0", opt_level=0)
    assert json.loads((out0 / "manifest.json").read_text())["passes"] == []


def test_cli_pass_flags(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True)

    r = run("passes")
    assert r.returncode == 0 and all(name in r.stdout for name in PASSES)
    r = run("build", str(GPT), "-o", str(tmp_path / "b"), "-O2", "--print-after", "fuse_qkv", "--debug")
    assert r.returncode == 0, r.stderr
    assert "// IR after fuse_qkv" in r.stderr and "qkv.weight" in r.stderr
    src = (tmp_path / "b" / "model.py").read_text()
    assert "fused_qkv=True" in src
    r = run("build", str(GPT), "-o", str(tmp_path / "c"), "--disable-pass", "attention_sdpa")
    assert r.returncode == 0 and "sdpa=True" not in (tmp_path / "c" / "model.py").read_text()
    r = run("build", str(GPT), "-o", str(tmp_path / "d"), "--disable-pass", "fuse_qvk")
    assert r.returncode == 2 and "unknown pass 'fuse_qvk' (did you mean 'fuse_qkv'?)" in r.stderr
    assert not (tmp_path / "d").exists()
    r = run("ir", str(GPT), "-O2")
    assert r.returncode == 0 and "qkv=true" in r.stdout


def test_optimised_zoo_models_equal_unoptimised(tmp_path):
    import torch

    from specc.backends.pytorch.build import import_model_module
    from specc.verify import float64_run

    for spec in sorted((ROOT / "specs").glob("*.yaml")):
        m0 = import_model_module(specc.build(spec, tmp_path / f"{spec.stem}0", opt_level=0))
        m2 = import_model_module(specc.build(spec, tmp_path / f"{spec.stem}2", opt_level=2))
        inputs = m0.example_inputs(seed=1)
        with torch.no_grad():
            want = float64_run(m0.load().double(), inputs)  # float64 weights, inputs and default dtype
            got = m2.load()(*inputs)
        want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
        for w, g in zip(want, got):
            assert (g.double() - w).abs().max() <= 1e-4 * max(1.0, float(w.abs().max())), spec.stem
