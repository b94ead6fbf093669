"""The benchmark machinery (bench/), in its quickest form: tiny sizes, a couple of calls, no
torch.compile. Timings are not checked here (benchmarks print ratios; tests check correctness): only
that the tables come out, that every variant's output is compared with the hand-written reference,
and that a wrong model is caught."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import specc  # noqa: E402
from bench import run  # noqa: E402
from bench.references import CASES, load_reference  # noqa: E402

SMALL_GPT = dict(vocab=65, block_size=16, d_model=32, heads=2, layers=1)


@pytest.fixture(scope="module")
def small_gpt(tmp_path_factory):
    return run.bench_case(CASES["gpt"], SMALL_GPT, (1, 2), rounds=2, seconds=0.01,
                          tmp=tmp_path_factory.mktemp("bench"), log=lambda _: None)


def test_model_bench_table(small_gpt):
    assert [b.batch for b in small_gpt.batches] == [1, 2]
    for br in small_gpt.batches:
        assert list(br.variants) == [run.REF, run.O0, run.O2]  # no torch.compile unless asked
        for v in br.variants.values():
            assert not v.error and v.ok, v
            assert v.calls >= 4 and v.ms > 0 and math.isfinite(v.ratio)
            assert v.max_err <= run.TOL * br.scale
        assert br.variants[run.REF].max_err == 0.0 and br.variants[run.REF].ratio == 1.0
        # -O0 keeps the explicit softmax attention, so it differs from the SDPA reference by rounding
        assert br.variants[run.O0].max_err > 0.0
    assert "fuse_qkv" in small_gpt.passes and small_gpt.nodes[1] <= small_gpt.nodes[0]
    text = run.text_table(run.model_table([small_gpt]))
    assert "specc -O2" in text and "max abs err" in text and "MISMATCH" not in text
    ratios = run.text_table(run.ratio_table([small_gpt]))
    assert "-O2 / ref" in ratios and len(ratios.splitlines()) == 2 + 2  # header, rule, two batches


def test_a_wrong_model_is_caught(tmp_path):
    """The outputs are really compared: a reference with one perturbed weight disagrees with both builds."""
    case = CASES["gpt"]

    def off_by_a_bit(state, params):
        mapped = case.weights(state, params)
        return {**mapped, "ln_f.bias": mapped["ln_f.bias"] + 0.01}

    wrong = dataclasses.replace(case, weights=off_by_a_bit)
    res = run.bench_case(wrong, SMALL_GPT, (1,), rounds=1, seconds=0.001, tmp=tmp_path, log=lambda _: None)
    variants = res.batches[0].variants
    for name in (run.O0, run.O2):
        assert not variants[name].ok and variants[name].max_err > run.TOL
    assert "MISMATCH" in run.text_table(run.model_table([res]))
    assert any(v.met == "MISMATCH" for v in run.verdicts([res], []))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("level", [0, 2])
def test_reference_equals_build(tmp_path, name, level):
    """Each reference, filled from a build's weights (-O0 names, or -O2's fused ones), computes the
    generated model's function."""
    case = CASES[name]
    if level == 2 and case.own_rewrites:
        pytest.skip("-O2 merges the parameters this reference keeps apart (the -O0 case covers it)")
    out = specc.build(ROOT / "specs" / f"{name}.yaml", tmp_path / "out", opt_level=level, **case.quick_overrides)
    params = json.loads((out / "manifest.json").read_text())["params"]
    ref = load_reference(case, run.read_weights(out), params)
    model = run.import_model_module(out).load(out)
    inputs = case.inputs(3, params, 1)
    with torch.no_grad():
        want, got = ref(*inputs), model(*inputs)
    assert run.max_error(got, want) <= run.TOL * max(1.0, want.abs().max().item())


def test_weight_map_must_cover_the_reference(tmp_path):
    case = CASES["lstm_classifier"]
    out = specc.build(ROOT / "specs" / "lstm_classifier.yaml", tmp_path / "out", **case.quick_overrides)
    state = run.read_weights(out)
    params = {**case.quick_overrides}
    dropped = dataclasses.replace(case, weights=lambda s, p: {k: v for k, v in case.weights(s, p).items()
                                                              if k != "classifier.bias"})
    with pytest.raises(ValueError, match="missing"):
        load_reference(dropped, state, params)


def test_scaling_and_report(tmp_path, small_gpt):
    rows = run.scaling((40, 120), repeats=1, tmp=tmp_path, log=lambda _: None)
    assert [r.family for r in rows] == ["chain", "chain", "repeat", "repeat"]
    for r in rows:
        assert r.check_s > 0 and r.ir_s > 0 and r.build_s > 0
    assert all(0.5 * t <= r.nodes <= 2 * t for r, t in zip(rows, (40, 120, 40, 120)))
    table = run.text_table(run.scale_table(rows))
    assert "growth exponent" in table and "µs/node" in table
    specs = [run.spec_times(ROOT / "specs" / "lstm_classifier.yaml", {}, 1, tmp_path)]
    assert not specs[0].error and specs[0].nodes > 0 and specs[0].build_o2_ms > 0
    md = run.markdown(run.machine(), [small_gpt], specs, rows, "test", "my notes")
    assert "## Machine" in md and "| gpt | 1 |" in md and "growth exponent" in md
    path = tmp_path / "B.md"
    path.write_text(md)
    assert run.old_notes(path) == "my notes"  # hand-written notes survive a rerun


def test_a_new_report_keeps_the_sections_other_benchmarks_wrote(tmp_path):
    from bench.run import other_sections

    old = tmp_path / "BENCHMARKS.md"
    old.write_text("# Benchmarks\n\n## Machine\n\n- cpu: x\n\n## Targets\n\nold\n\n"
                   "## tvm-llvm against torch eager\n\n| a |\n\n## Models\n\nold models\n\n"
                   "## Training recipes\n\n<!-- training recipes: end -->\n")
    kept = other_sections(old)
    assert kept.startswith("## tvm-llvm against torch eager") and "## Training recipes" in kept
    assert "old models" not in kept and "## Machine" not in kept and "## Targets" not in kept
    assert other_sections(tmp_path / "missing.md") == ""
