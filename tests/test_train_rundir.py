"""The run folder of `specc train -o RUN`: a new run never replaces an earlier one without --force,
never writes among (or deletes) files specc did not write, not even with --force, and never deletes
one of its inputs; resuming in place needs no --force. Every refusal is a clean error (exit 2, the
folder named) that leaves the folder exactly as it was; in-process through `specc.cli.main`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import specc.train
from specc.cli import main
from specc.dsl.diagnostics import SpecError

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "tests" / "data" / "train_moons.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train(out: Path, capsys, *more: str, spec: Path = MOONS, **sets: object) -> tuple[int, str]:
    """`specc train SPEC -o OUT MORE...` of 4 steps (checkpoints and evaluations every 2), `sets` the
    recipe's overrides (train.KEY=VALUE) beside those: (exit code, stderr)."""
    recipe = {"steps": 4, "checkpoint.every": 2, "eval.every": 2, **sets}
    args = [a for k, v in recipe.items() for a in ("--set", f"train.{k}={v}")]
    code = main(["train", str(spec), "-o", str(out), "--quiet", "--no-color", *args, *more])
    out_text, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (folders by name)."""
    files: dict[str, bytes] = {}
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            files[os.path.relpath(os.path.join(root, d), folder) + "/"] = b""
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, folder)] = Path(p).read_bytes()
    return files


def steps_of(run: Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def test_a_new_run_over_an_earlier_one_is_an_error_without_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    before = snapshot(run)
    assert {"metrics.jsonl", "summary.json", "checkpoints/", "model/", "model/manifest.json"} <= set(before)
    code, err = train(run, capsys, steps=6)
    assert code == 2
    assert f"error: the run folder (-o) '{run}' holds an earlier run (checkpoints, metrics.jsonl, model, " \
           f"summary.json): a new run replaces it" in err, err
    assert f"continue it with --resume {run}, write the new run to another folder, or pass --force" in err, err
    assert snapshot(run) == before  # untouched: its metrics, checkpoints and model are the earlier run's


def test_force_replaces_the_earlier_run_whole(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys, **{"checkpoint.keep": 5})[0] == 0
    assert steps_of(run) == ["step-0000002", "step-0000004"]
    old_model = (run / "model" / "weights.safetensors").read_bytes()
    code, err = train(run, capsys, "--force", steps=3, seed=11, **{"checkpoint.every": 3})
    assert code == 0, err
    assert steps_of(run) == ["step-0000003"]  # the earlier run's checkpoints are gone, not kept beside
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    assert len(steps) == 3  # the new run's lines alone
    assert (run / "model" / "weights.safetensors").read_bytes() != old_model
    assert '"steps": 3' in (run / "summary.json").read_text()


def test_force_does_not_delete_the_earlier_run_when_the_new_one_fails_first(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    before = snapshot(run)
    # a loss that is not finite at the starting weights: an error before the first step writes anything
    code, err = train(run, capsys, "--force", loss="cross_entropy(logits, label) / 0.0")
    assert code == 2 and "not finite" in err, err
    assert snapshot(run) == before


def test_resuming_in_place_needs_no_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys, "--until", "2")[0] == 0
    assert steps_of(run) == ["step-0000002"]
    code, err = train(run, capsys, "--resume", str(run))
    assert code == 0, err
    assert (run / "model" / "manifest.json").is_file() and "step-0000004" in steps_of(run)


def test_resuming_past_the_recipes_steps_is_an_error_and_at_them_trains_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    before = snapshot(run)
    code, err = train(run, capsys, "--resume", str(run), steps=2)
    assert code == 2, err
    assert f"{run}: error: --resume: the run's newest checkpoint is at step 4, past the recipe's 2 steps" in err
    assert "raise train.steps (--set train.steps=N) to train on" in err
    assert snapshot(run) == before
    last = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in line][-1]
    code = main(["train", str(MOONS), "-o", str(run), "--quiet", "--resume", str(run), "--set", "train.steps=4"])
    out = capsys.readouterr().out
    assert code == 0 and "trained moons: 4 steps" in out, out
    assert f"loss {json.loads(last)['loss']:.4g}" in out  # the run's last loss, not nan: nothing was trained


def test_a_resumed_run_into_another_folder_follows_the_same_rules(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(first, capsys, "--until", "2")[0] == 0
    assert train(second, capsys)[0] == 0
    before = snapshot(second)
    code, err = train(second, capsys, "--resume", str(first))
    assert code == 2 and "holds an earlier run" in err, err
    assert snapshot(second) == before
    assert train(second, capsys, "--resume", str(first), "--force")[0] == 0
    assert (first / "checkpoints" / "step-0000002").is_dir()  # the resumed run is kept


@pytest.mark.parametrize("plant, listed", [
    (lambda run: (run / "notes.txt").write_text("mine"), "it holds notes.txt"),
    (lambda run: (run / "checkpoints" / "best.pt").write_text("mine"), "it holds checkpoints/best.pt"),
    (lambda run: (run / "model" / "export.onnx").write_text("mine"), "it holds model/export.onnx"),
])
def test_a_folder_with_what_specc_did_not_write_is_refused_even_with_force(tmp_path, capsys, plant, listed):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    plant(run)
    before = snapshot(run)
    for more in ((), ("--force",)):
        code, err = train(run, capsys, *more)
        assert code == 2, err
        assert f"the run folder (-o) '{run}' is not empty and is not a specc run ({listed}, which specc " \
               f"train does not write)" in err, err
        assert "never deletes or writes among files it did not write, not even with --force" in err, err
        assert snapshot(run) == before


def test_a_model_folder_that_is_no_specc_build_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "weights.safetensors").write_bytes(b"mine")
    code, err = train(run, capsys, "--force")
    assert code == 2 and "it holds model/ (not a specc build)" in err, err
    assert (run / "model" / "weights.safetensors").read_bytes() == b"mine"


def test_an_empty_folder_or_a_link_to_one_is_written(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(empty, capsys)[0] == 0 and (empty / "model" / "model.py").is_file()
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    assert train(link, capsys)[0] == 0
    assert link.is_symlink() and (target / "metrics.jsonl").is_file()


def test_a_run_never_deletes_its_own_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    spec = run / "checkpoints" / "spec.yaml"  # an input where the new run would delete it
    spec.write_text(MOONS.read_text())
    code, err = train(run, capsys, "--force", spec=spec)
    assert code == 2, err
    assert f"writing the run would delete {spec}, an input of this run (this is never done, not even with " \
           f"--force)" in err, err
    assert spec.is_file()
    spec.unlink()
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"  # fine-tuning from its own checkpoint
    code, err = train(run, capsys, "--force", "--weights", str(weights))
    assert code == 2 and f"would delete {weights}, an input of this run" in err, err


def test_the_current_directory_is_never_deleted(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    monkeypatch.chdir(run / "model")
    code, err = train(run, capsys, "--force")
    assert code == 2 and "writing the run would delete the current directory" in err, err


def test_several_processes_are_refused_before_any_starts(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, capsys)[0] == 0
    before = snapshot(run)
    code, err = train(run, capsys, "--nproc", "2")
    assert code == 2 and err.count("holds an earlier run") == 1, err
    assert snapshot(run) == before


def test_the_python_api_follows_the_same_rules(tmp_path):
    run = tmp_path / "run"
    specc.train.train(MOONS, run, train={"steps": 2})
    with pytest.raises(SpecError, match="holds an earlier run"):
        specc.train.train(MOONS, run, train={"steps": 2})
    assert specc.train.train(MOONS, run, train={"steps": 3}, force=True).steps == 3
