"""How `specc build -o OUT` (torch and tvm-llvm) and `specc prune -o OUT` replace their output folder:
only a new, empty or earlier-specc-build folder is replaced (else exit 2 naming what it holds, unless
--force); never the current directory, a parent of it or a folder holding the spec; a link to a folder
is followed and kept; nothing is left beside the folder; modes are the umask's."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from specc.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.yaml"
BUILT = {"manifest.json", "model.py", "weights.safetensors"}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A project folder holding base.yaml (a prunable spec), the current directory."""
    root = tmp_path / "work"
    root.mkdir()
    (root / "base.yaml").write_text(TINY.read_text())
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def umask():
    """Set the umask for the test (restored after)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def specc(capsys, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--no-color"])
    captured = capsys.readouterr()
    if code != 0:
        assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
        assert captured.out == "", captured.out
    return code, captured.err


def leftovers(root: Path) -> list[str]:
    """Temporary or moved-aside folders (and links) that a build left anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "notes.txt").write_text("important\n")
    (proj / "data" / "x.csv").write_text("1,2\n")
    return proj


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- what may be replaced ------------------------------------------------------------------------

def test_a_folder_of_other_files_is_refused_and_kept(work, capsys):
    proj = project(work)
    code, err = specc(capsys, "build", "base.yaml", "-o", "proj")
    assert code == 2
    assert err.startswith("proj: error: the output folder (-o) 'proj' is not empty and is not a specc build "
                          "(it holds data/, notes.txt)"), err
    assert "--force" in err and "1 error" in err
    assert (proj / "notes.txt").read_text() == "important\n" and (proj / "data" / "x.csv").is_file()
    assert sorted(os.listdir(proj)) == ["data", "notes.txt"]
    assert leftovers(work.parent) == []


def test_force_replaces_a_folder_of_other_files(work, capsys):
    proj = project(work)
    code, err = specc(capsys, "build", "base.yaml", "-o", "proj", "--force")
    assert code == 0, err
    assert set(os.listdir(proj)) == BUILT
    assert leftovers(work.parent) == []


def test_a_folder_holding_the_spec_is_refused_even_with_force(work, capsys):
    proj = project(work)
    (proj / "base.yaml").write_text(TINY.read_text())
    for extra in ([], ["--force"]):
        code, err = specc(capsys, "build", "proj/base.yaml", "-o", "proj", *extra)
        assert code == 2
        assert "holds proj/base.yaml, an input of this build" in err and "not even with --force" in err, err
    assert sorted(os.listdir(proj)) == ["base.yaml", "data", "notes.txt"]
    assert (proj / "base.yaml").read_text() == TINY.read_text()
    # the spec two levels down, -o given absolute
    code, err = specc(capsys, "build", str(proj / "base.yaml"), "-o", str(work), "--force")
    assert code == 2 and "is the current directory" in err
    assert leftovers(work.parent) == []


def test_the_weights_file_is_protected_too(work, capsys):
    assert specc(capsys, "build", "base.yaml", "-o", "b0", "-O", "0")[0] == 0
    code, err = specc(capsys, "build", "base.yaml", "-o", "b0", "--weights", "b0/weights.safetensors", "--force")
    assert code == 2 and "holds b0/weights.safetensors, an input of this build" in err, err
    assert (work / "b0" / "weights.safetensors").is_file()


@pytest.mark.parametrize("out", [".", "./", "PWD", ".."])
@pytest.mark.parametrize("target", ["torch", "tvm-llvm"])
def test_the_current_directory_or_a_parent_is_refused(work, capsys, out, target):
    (work / "notes.txt").write_text("important\n")
    out = str(work) if out == "PWD" else out
    for extra in ([], ["--force"]):
        code, err = specc(capsys, "build", "base.yaml", "-o", out, "--target", target, *extra)
        assert code == 2, err
        what = "a parent of the current directory" if out == ".." else "is the current directory"
        assert what in err and "not even with --force" in err and "e.g. -o build" in err, err
    assert sorted(os.listdir(work)) == ["base.yaml", "notes.txt"]
    assert leftovers(work.parent) == []


def test_an_empty_folder_and_an_earlier_build_are_replaced(work, capsys):
    (work / "empty").mkdir()
    assert specc(capsys, "build", "base.yaml", "-o", "empty")[0] == 0
    assert set(os.listdir(work / "empty")) == BUILT
    (work / "empty" / "__pycache__").mkdir()  # importing the built model.py leaves this
    (work / "empty" / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"")
    code, err = specc(capsys, "build", "base.yaml", "-o", "empty", "-O", "0")
    assert code == 0, err
    assert set(os.listdir(work / "empty")) == BUILT
    assert json.loads((work / "empty" / "manifest.json").read_text())["opt_level"] == 0
    assert leftovers(work.parent) == []


def test_an_earlier_build_with_other_files_in_it_is_refused(work, capsys):
    assert specc(capsys, "build", "base.yaml", "-o", "out")[0] == 0
    (work / "out" / "notes.txt").write_text("mine\n")
    code, err = specc(capsys, "build", "base.yaml", "-o", "out")
    assert code == 2
    assert ("is an earlier specc build that also holds what specc did not write (notes.txt)" in err
            and "--force" in err), err
    assert (work / "out" / "notes.txt").read_text() == "mine\n"
    assert specc(capsys, "build", "base.yaml", "-o", "out", "--force")[0] == 0
    assert set(os.listdir(work / "out")) == BUILT


@pytest.mark.parametrize("text", ['{"name": "tiny", "files": {}}', "not json", '["versions"]'])
def test_a_manifest_that_specc_did_not_write_does_not_make_a_build(work, capsys, text):
    (work / "out").mkdir()
    (work / "out" / "manifest.json").write_text(text)
    code, err = specc(capsys, "build", "base.yaml", "-o", "out")
    assert code == 2 and "is not empty and is not a specc build (it holds manifest.json)" in err, err
    assert (work / "out" / "manifest.json").read_text() == text


def test_prune_follows_the_same_rules(work, capsys):
    proj = project(work)
    code, err = specc(capsys, "prune", "base.yaml", "--flops", "0.9", "--calib", "example", "-o", "proj")
    assert code == 2 and "'proj' is not empty and is not a specc build" in err, err
    assert sorted(os.listdir(proj)) == ["data", "notes.txt"]
    for out in (".", ".."):
        code, err = specc(capsys, "prune", "base.yaml", "--flops", "0.9", "--calib", "example", "-o", out, "--force")
        assert code == 2 and "current directory" in err, err
    code = main(["prune", "base.yaml", "--flops", "0.9", "--calib", "example", "-o", "proj", "--force"])
    assert code == 0
    assert set(os.listdir(proj)) == BUILT and "prune" in json.loads((proj / "manifest.json").read_text())
    assert sorted(os.listdir(work)) == ["base.yaml", "proj"]
    assert leftovers(work.parent) == []


def test_the_api_follows_the_same_rules(work):
    import specc
    from specc.dsl.diagnostics import SpecError

    proj = project(work)
    with pytest.raises(SpecError, match="is not empty and is not a specc build") as e:
        specc.build("base.yaml", proj)
    assert "force=True" in " ".join(e.value.diagnostics[0].notes)
    assert (proj / "notes.txt").is_file()
    specc.build("base.yaml", proj, force=True)
    assert set(os.listdir(proj)) == BUILT


# -- links ---------------------------------------------------------------------------------------

def test_a_link_to_a_folder_replaces_its_target_and_keeps_the_link(work, capsys):
    (work / "real").mkdir()
    (work / "outlink").symlink_to("real")
    for _ in range(2):  # the empty folder, then the earlier build
        code, err = specc(capsys, "build", "base.yaml", "-o", "outlink")
        assert code == 0, err
        assert (work / "outlink").is_symlink() and os.readlink(work / "outlink") == "real"
        assert set(os.listdir(work / "real")) == BUILT
    assert sorted(os.listdir(work)) == ["base.yaml", "outlink", "real"]
    assert leftovers(work.parent) == []


def test_a_link_to_a_folder_of_other_files_or_to_nothing_is_refused(work, capsys):
    project(work)
    (work / "plink").symlink_to("proj")
    code, err = specc(capsys, "build", "base.yaml", "-o", "plink")
    assert code == 2 and "'plink' is not empty and is not a specc build (it holds data/, notes.txt)" in err, err
    (work / "dangling").symlink_to("nowhere")
    code, err = specc(capsys, "build", "base.yaml", "-o", "dangling")
    assert code == 2 and "dangling: error: the output path is a symbolic link to nowhere, which does not exist" in err
    (work / "here").symlink_to(".")
    code, err = specc(capsys, "build", "base.yaml", "-o", "here", "--force")
    assert code == 2 and "is the current directory" in err, err
    assert sorted(os.listdir(work)) == ["base.yaml", "dangling", "here", "plink", "proj"]
    assert sorted(os.listdir(work / "proj")) == ["data", "notes.txt"]
    assert leftovers(work.parent) == []


# -- modes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_the_build_gets_the_umasks_modes(work, capsys, umask, mask):
    umask(mask)
    code, err = specc(capsys, "build", "base.yaml", "-o", "out/deep")
    assert code == 0, err
    assert mode(work / "out" / "deep") == 0o777 & ~mask and mode(work / "out") == 0o777 & ~mask
    for name in BUILT:
        assert mode(work / "out" / "deep" / name) == 0o666 & ~mask, name


def test_tvm_llvm_builds_follow_the_rules_and_get_the_umasks_modes(work, capsys, umask):
    pytest.importorskip("tvm")
    umask(0o022)
    code, err = specc(capsys, "build", "base.yaml", "-o", "tvm", "--target", "tvm-llvm")
    assert code == 0, err
    out = work / "tvm"
    names = set(os.listdir(out))
    assert names >= BUILT | {"model_lib.so", "loader.py"}
    assert mode(out) == 0o755
    for name in names:
        assert mode(out / name) == (0o755 if name.endswith(".so") else 0o644), name
    (out / "notes.txt").write_text("mine\n")
    code, err = specc(capsys, "build", "base.yaml", "-o", "tvm", "--target", "tvm-llvm")  # refused before compiling
    assert code == 2 and "also holds what specc did not write (notes.txt)" in err, err
    (out / "notes.txt").unlink()
    (work / "tlink").symlink_to("tvm")
    umask(0o027)
    code, err = specc(capsys, "build", "base.yaml", "-o", "tlink", "--target", "tvm-llvm")  # an earlier tvm build
    assert code == 0, err
    assert (work / "tlink").is_symlink() and set(os.listdir(out)) == names
    assert mode(out) == 0o750 and mode(out / "weights.safetensors") == 0o640
    assert sorted(os.listdir(work)) == ["base.yaml", "tlink", "tvm"]
    assert leftovers(work.parent) == []
