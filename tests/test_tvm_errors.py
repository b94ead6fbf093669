"""The error paths of the TVM targets (`specc build --target tvm-llvm|tvm-cuda`, `specc verify --target
tvm-llvm`): each is a clear error naming what is wrong (the file or folder as its location), exit 2,
no traceback, and no output written (an earlier build in the output folder stays as it was).

The CLI runs in this process (`specc.cli.main`): importing TVM and torch per subprocess costs seconds.
"""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from specc.cli import main  # noqa: E402
from specc.compiler.registry import REGISTRY  # noqa: E402
from specc.custom import unregister  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
HEAD = re.compile(r"^(?P<where>\S+?)(:(?P<line>\d+):(?P<col>\d+))?: error: (?P<msg>.*)$")


def fails(capsys, *args: str, note: str | None = None) -> list[tuple[str, str]]:
    """Run the CLI, expect exit 2 with diagnostics (and `note`) and no traceback; (location, message) of
    each error."""
    code = main([*args, "--no-color"])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    assert note is None or f"= note: {note}" in captured.err, captured.err
    assert "built " not in captured.out, captured.out
    found = [m for m in map(HEAD.match, captured.err.splitlines()) if m]
    assert found, captured.err
    return [(m["where"] + (f":{m['line']}:{m['col']}" if m["line"] else ""), m["msg"]) for m in found]


def build(out: Path, *extra: str, spec: Path = TINY, target: str = "tvm-llvm") -> tuple[str, ...]:
    return ("build", str(spec), "-o", str(out), "--target", target, *extra)


def test_missing_tuning_database_without_tune(capsys, tmp_path):
    out, db = tmp_path / "deep" / "out", tmp_path / "no_db"
    [(where, msg)] = fails(capsys, *build(out, "--tuning-db", str(db)))
    assert where == str(db)
    assert f"tuning database {db}: no such folder" in msg and "--tune" in msg
    assert not (tmp_path / "deep").exists() and not db.exists()  # nothing made, not even a parent


def test_tuning_database_that_is_a_file(capsys, tmp_path):
    db = tmp_path / "db.json"
    db.write_text("{}")
    [(where, msg)] = fails(capsys, *build(tmp_path / "out", "--tuning-db", str(db)))
    assert where == str(db) and msg.endswith(f"tuning database {db}: not a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, text, says", [
    ("specc_tuning.json", "{bad json", "specc_tuning.json is not valid JSON (line 1)"),
    ("specc_tuning.json", "[1, 2]", "specc_tuning.json is not a specc tuning index"),
    ("database_workload.json", "not json\n", "database_workload.json:1: not valid JSON"),
    ("database_workload.json", '["only one"]\n', "database_workload.json:1: not a MetaSchedule database row"),
    ("database_tuning_record.json", "[3, []]\n", "database_tuning_record.json:1: refers to workload 3"),
    ("database_workload.json", '["123", "not a module"]\n', "MetaSchedule cannot read the database"),
])
def test_damaged_tuning_database(capsys, tmp_path, file, text, says):
    db = tmp_path / "db"
    db.mkdir()
    (db / file).write_text(text)
    [(where, msg)] = fails(capsys, *build(tmp_path / "out", "--tuning-db", str(db)))
    assert where == str(db) and f"tuning database {db}: " in msg and says in msg, msg
    assert not (tmp_path / "out").exists()
    assert (db / file).read_text() == text  # the database is left as it was


def test_tune_needs_a_database_folder(capsys, tmp_path):
    [(where, msg)] = fails(capsys, *build(tmp_path / "out", "--tune", "2"))
    assert where == str(TINY) and "--tune needs --tuning-db DIR" in msg
    assert not (tmp_path / "out").exists()


def test_tune_is_for_the_cpu_target(capsys, tmp_path):
    db = tmp_path / "db"
    [(where, msg)] = fails(capsys, *build(tmp_path / "out", "--tune", "2", "--tuning-db", str(db), target="tvm-cuda"))
    assert "--tune tunes CPU kernels: use it with --target tvm-llvm, not tvm-cuda" in msg
    assert not db.exists() and not (tmp_path / "out").exists()


def test_negative_tune(capsys, tmp_path):
    [(_, msg)] = fails(capsys, *build(tmp_path / "out", "--tune", "-4", "--tuning-db", str(tmp_path / "db")))
    assert "--tune -4: the number of trials cannot be negative" in msg
    assert not (tmp_path / "db").exists()


def test_output_path_that_is_a_file_is_left_alone(capsys, tmp_path):
    out = tmp_path / "out"
    out.write_text("mine")
    [(where, msg)] = fails(capsys, *build(out))
    assert where == str(out) and msg.endswith("the output path exists and is not a folder")
    assert out.read_text() == "mine"
    below = out / "sub"
    [(where, msg)] = fails(capsys, *build(below))
    assert where == str(below) and f"{out} is not a folder" in msg


def test_failed_build_keeps_the_earlier_build(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.py").write_text("# an earlier build\n")
    fails(capsys, *build(out, "--tuning-db", str(tmp_path / "missing")))
    assert [p.name for p in out.iterdir()] == ["model.py"]
    assert (out / "model.py").read_text() == "# an earlier build\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


@pytest.mark.parametrize("command", ["build", "verify"])
def test_an_input_dimension_the_backend_cannot_solve_is_located(capsys, tmp_path, command):
    """T * S where neither is a whole dimension of an input or solved from one (a * S + b, expressions of
    such symbols are supported: tests/test_tvm_input_dims.py): an error at the input's line, for build and
    verify."""
    spec = tmp_path / "expr.yaml"
    spec.write_text("specc: 1\nname: e\ninputs:\n  x: f32[B, T * S]\ngraph: |\n  y = relu(x)\noutputs:\n  y:\n")
    args = build(tmp_path / "out", spec=spec) if command == "build" else \
        ("verify", str(spec), "--target", "tvm-llvm", "--examples", "2")
    [(where, msg)] = fails(capsys, *args, note="targets that support it: torch")
    assert where == f"{spec}:4:3", where
    assert "input 'x': dimension 1 is the expression S*T; the TVM backend takes an input dimension that is a " \
           "symbol, a * S + b, or an expression of symbols the inputs give (whole, or solved from such a " \
           "dimension)" in msg
    assert not (tmp_path / "out").exists()


OPS = '''
import specc


def twice(x):
    return 2 * x


@specc.custom_op("{name}", torch=twice)
def _twice(c):
    return c.t("x")
'''


@pytest.fixture
def custom_op(tmp_path, monkeypatch):
    """(module, op): a custom operator, which the TVM targets cannot lower."""
    module = f"tvm_err_ops_{uuid.uuid4().hex[:8]}"
    op = "twice_" + module[-8:]
    (tmp_path / f"{module}.py").write_text(OPS.format(name=op))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module, op
    for name, opdef in list(REGISTRY.items()):
        if opdef.module == module:
            unregister(name)
    sys.modules.pop(module, None)


def custom_spec(tmp_path: Path, module: str, op: str) -> Path:
    spec = tmp_path / "custom.yaml"
    spec.write_text(f"specc: 1\nname: c\nimports: [{module}]\ninputs:\n  x: f32[B, 4]\n"
                    f"graph: |\n  h = relu(x)\n  y = {op}(h)\noutputs:\n  y:\n")
    return spec


@pytest.mark.parametrize("target", ["tvm-llvm", "tvm-cuda"])
def test_op_without_a_lowering_is_a_located_error(capsys, tmp_path, custom_op, target):
    module, op = custom_op
    spec = custom_spec(tmp_path, module, op)
    errors = fails(capsys, *build(tmp_path / "out", "--allow-import", module, spec=spec, target=target),
                   note="targets that support it: torch")
    assert errors == [(f"{spec}:8:7", f"operator '{op}' has no lowering for target {target}")]
    assert not (tmp_path / "out").exists()


def test_verify_on_tvm_with_an_op_without_a_lowering(capsys, tmp_path, custom_op):
    module, op = custom_op
    spec = custom_spec(tmp_path, module, op)
    errors = fails(capsys, "verify", str(spec), "--target", "tvm-llvm", "--examples", "2", "--allow-import", module,
                   note="targets that support it: torch")
    assert errors == [(f"{spec}:8:7", f"operator '{op}' has no lowering for target tvm-llvm")]
