"""`specc check` / `specc build` on bad input, through a real subprocess: exit status 2, every error as
`FILE:LINE:COL: error: MESSAGE` with the source line and a caret, and never a Python traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: FILE:LINE:COL: error: MSG, or FILE: error: MSG for a problem with the whole file (it cannot be read).
HEAD_RE = re.compile(r"^(?P<file>.+?)(?::(?P<line>\d+):(?P<col>\d+))?: error: (?P<msg>.*)$")

GOOD = """\
specc: 1
name: m
params:
  d: 16
inputs:
  x: f32[B, T, d]
graph: |
  y = relu(linear(x, d))
outputs:
  y: f32[B, T, d]
"""


def specc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    env.pop("SPECC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=60)


def failed(*args: str, cwd: Path | None = None, r: subprocess.CompletedProcess | None = None
           ) -> tuple[str, list[tuple[str, int, int, str]]]:
    """Run specc (or take its result `r`), expect a user error: exit 2, no traceback; returns stderr
    and the parsed error heads."""
    r = r or specc(*args, cwd=cwd)
    assert r.returncode == 2, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.stdout == "", r.stdout  # errors go to stderr; nothing else ran (e.g. no os.system output)
    assert "internal error" not in r.stderr, r.stderr
    heads = [(m["file"], int(m["line"] or 0), int(m["col"] or 0), m["msg"])
             for m in map(HEAD_RE.match, r.stderr.splitlines()) if m]
    assert heads, r.stderr
    n = len(heads)
    assert r.stderr.rstrip().endswith(f"{n} error{'s' if n != 1 else ''}"), r.stderr
    return r.stderr, heads


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


def test_good_spec_checks(tmp_path):
    r = specc("check", str(write(tmp_path, GOOD)), "--no-color")
    assert r.returncode == 0 and "m: ok" in r.stdout, r.stderr


# ---------------------------------------------------------------------------------------------
# Files that are not specs
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err, heads = failed("check", str(path))
    assert heads[0][:3] == (str(path), 0, 0)  # a whole-file problem: no line or column
    assert "cannot read spec file: No such file or directory" in heads[0][3]


def test_directory_instead_of_file(tmp_path):
    d = tmp_path / "dir.yaml"
    d.mkdir()
    err, heads = failed("check", str(d))
    assert heads[0][0] == str(d) and "cannot read spec file" in heads[0][3]


def test_non_utf8_bytes(tmp_path):
    path = write(tmp_path, b"specc: 1\nname: caf\xe9\n")
    err, heads = failed("check", str(path))
    assert heads[0][:3] == (str(path), 2, 10)
    assert "not UTF-8 text (byte 0xe9)" in heads[0][3]


MALFORMED = [
    ("", 1, 1, "the spec file is empty"),
    ("# only a comment\n\n", 1, 1, "the spec file is empty"),
    ("- a\n- b\n", 1, 1, "a spec file must be a YAML mapping (key: value lines)"),
    ("just a string\n", 1, 1, "a spec file must be a YAML mapping (key: value lines)"),
    ("specc: 1\nname: m\x00x\n", 2, 8, "YAML error: character U+0000 is not allowed in a spec file"),
    ("specc: 1\ninputs: {x: f32[B, 4]\n", 2, 16, "YAML syntax error: expected ',' or '}', but got '['"),
    ("specc: 1\n  name: m\n", 2, 7, "YAML syntax error: mapping values are not allowed here"),
]


def check_all(tmp: Path, texts: list[str]) -> list[tuple[Path, float, subprocess.CompletedProcess]]:
    """`specc check` on each text, run concurrently (each CLI start costs a few tenths of a second)."""
    paths = [write(tmp, text, f"case{i}.yaml") for i, text in enumerate(texts)]

    def one(path: Path):
        t0 = time.perf_counter()
        r = specc("check", str(path))
        return path, time.perf_counter() - t0, r

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, paths))


@pytest.fixture(scope="module")
def malformed_results(tmp_path_factory):
    return check_all(tmp_path_factory.mktemp("malformed"), [case[0] for case in MALFORMED])


@pytest.mark.parametrize("i", range(len(MALFORMED)), ids=[repr(c[0][:20]) for c in MALFORMED])
def test_malformed_files(malformed_results, i):
    _, line, col, message = MALFORMED[i]
    path, _, r = malformed_results[i]
    err, heads = failed(r=r)
    assert heads == [(str(path), line, col, message)], err


def test_binary_garbage(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 4)
    err, heads = failed("check", str(path))
    assert heads[0][1:] == (2, 118, "the spec file is not UTF-8 text (byte 0x80)")  # after the newline at byte 10
    path = write(tmp_path, "specc: 1\n\x01\x02\x03\x7f garbage \ufffe\n".encode())
    err, heads = failed("check", str(path))
    assert heads[0][1:3] == (2, 1) and "is not allowed in a spec file" in heads[0][3]
    assert "\x01" not in err  # control characters are escaped, never sent to the terminal


def test_deeply_nested_yaml(tmp_path):
    flow = write(tmp_path, "specc: 1\nname: " + "[" * 5000 + "]" * 5000 + "\n", "flow.yaml")
    err, heads = failed("check", str(flow))
    assert heads == [(str(flow), 2, 70, "the spec nests mappings or lists more than 64 levels deep")]
    block = write(tmp_path, "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(200)), "block.yaml")
    err, heads = failed("check", str(block))
    assert heads == [(str(block), 64, 64, "the spec nests mappings or lists more than 64 levels deep")]


# ---------------------------------------------------------------------------------------------
# Values that must not hang, crash or allocate
# ---------------------------------------------------------------------------------------------

def graph_spec(graph: str, blocks: str = "") -> str:
    return GOOD.replace("graph: |\n  y = relu(linear(x, d))\n", blocks + "graph: |\n" + graph)


HOSTILE = [
    ("  y = linear(x, 1" + "0" * 5000 + ")\n", "", 8, 17, "the number 10000000000000000000... has too many digits"),
    ("  y = x * 1e999\n", "", 8, 11, "the number 1e999 is too large"),
    ("  y = linear(x, 10 ** 10 ** 10)\n", "", 8, 17, "result out of range"),
    ("  y = linear(x, d // (d - 16))\n", "", 8, 17, "division by zero"),
    ("  y = linear(x, 2 ** 62)\n", "", 8, 17,
     "linear: parameter 'weight' would have 73786976294838206464 elements; at most 2**63 - 1 can be stored"),
    ("  y = repeat(10 ** 12, blk, x)\n", "blocks:\n  blk(h): |\n    return relu(h)\n", 11, 14,
     "repeat count 1000000000000 is too large (at most 10000)"),
    ("  y = repeat(-3, blk, x)\n", "blocks:\n  blk(h): |\n    return relu(h)\n", 11, 14,
     "repeat count must be a non-negative integer, got the integer -3"),
    ("  y = a(x)\n", "blocks:\n  a(h): |\n    return b(h)\n  b(h): |\n    return a(h)\n", 11, 12,
     "block 'a' calls itself (through a -> b -> a)"),
    ("  y = x" + " + x" * 500 + "\n", "", 8, 7, "this expression is nested too deeply (more than 100 levels; "
     "each operator of a chain such as a + b + c is a level: split it into named steps)"),
]


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory):
    return check_all(tmp_path_factory.mktemp("hostile"), [graph_spec(g, b) for g, b, *_ in HOSTILE])


@pytest.mark.parametrize("i", range(len(HOSTILE)), ids=[c[4][:30] for c in HOSTILE])
def test_hostile_values_give_located_errors_quickly(hostile_results, i):
    *_, line, col, message = HOSTILE[i]
    path, seconds, r = hostile_results[i]
    err, heads = failed(r=r)
    # wall time of one of nine CLI runs started at once on however few cores the machine has (each
    # imports torch): the bound tells an answer from a computation that would never end, as a number
    # with billions of digits would, not a fast answer from a slow one
    assert seconds < 30
    assert heads == [(str(path), line, col, message)], err


def test_nested_repeats_are_bounded(tmp_path):
    blocks = ("blocks:\n  a(h): |\n    return relu(h)\n  b(h): |\n    return repeat(1000, a, h)\n"
              "  c(h): |\n    return repeat(1000, b, h)\n")
    path = write(tmp_path, graph_spec("  y = repeat(1000, c, x)\n", blocks))
    t0 = time.perf_counter()
    err, heads = failed("check", str(path))
    assert time.perf_counter() - t0 < 10
    assert heads == [(str(path), 9, 12, "the model has more than 100000 operations once blocks and repeats "
                                        "are expanded")]


def test_long_chain_of_blocks_is_bounded(tmp_path):
    n = 300
    blocks = "blocks:\n" + "".join(f"  b{i}(h): |\n    return b{i + 1}(h)\n" for i in range(n))
    blocks += f"  b{n}(h): |\n    return relu(h)\n"
    path = write(tmp_path, graph_spec("  y = b0(x)\n", blocks))
    err, heads = failed("check", str(path))
    assert heads == [(str(path), 71, 12, "blocks call blocks more than 32 levels deep")]  # in b31


# ---------------------------------------------------------------------------------------------
# Untrusted YAML
# ---------------------------------------------------------------------------------------------

def test_yaml_tags_anchors_and_aliases_are_refused(tmp_path):
    text = """\
specc: 1
name: !!python/object/apply:os.system ["echo PWNED"]
params:
  d: &D 16
  e: *D
inputs:
  x: !custom f32[B, d]
graph: |
  y = x
outputs:
  y: null
"""
    path = write(tmp_path, text)
    err, heads = failed("check", str(path))  # stdout stays empty: nothing was echoed
    assert [h[1:] for h in heads] == [
        (2, 7, "YAML tag '!!python/object/apply:os.system' is not allowed in spec files"),
        (4, 6, "YAML anchors (&name) are not allowed in spec files"),
        (5, 6, "YAML aliases (*name) are not allowed in spec files"),
        (7, 6, "YAML tag '!custom' is not allowed in spec files"),
    ]


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

def test_bad_overrides_are_all_reported_with_spec_errors(tmp_path):
    path = write(tmp_path, GOOD.replace("relu(linear(x, d))", "lienar(x, d)"))
    err, heads = failed("check", str(path), "--set", "dd=3", "--set", "d=abc", "--set", "novalue",
                        "--set", "d=4")
    assert sorted(heads) == sorted([
        ("<--set>", 1, 1, "unknown parameter 'dd' in override (did you mean 'd'?)"),
        ("<--set>", 2, 3, "bad override for 'd': expected an integer, got 'abc'"),
        ("<--set>", 3, 1, "bad override 'novalue': expected NAME=VALUE, e.g. --set d_model=256"),
        ("<--set>", 4, 1, "parameter 'd' is set twice"),
        (str(path), 8, 7, "unknown operator 'lienar' (did you mean 'linear'?)"),
    ])
    assert "    2 | d=abc\n      |   ^~~\n" in err


def test_override_that_breaks_shapes_points_into_the_spec(tmp_path):
    path = write(tmp_path, GOOD)
    err, heads = failed("check", str(path), "--set", "d=0")
    assert heads == [(str(path), 6, 16, "a dimension must be positive, got 0"),  # the input's type
                     (str(path), 10, 16, "a dimension must be positive, got 0")]  # the output's
    err, heads = failed("check", str(path), "--set", "d=1e400")
    assert heads == [("<--set>", 1, 3, "bad override for 'd': expected an integer, got '1e400'")]


# ---------------------------------------------------------------------------------------------
# Output format
# ---------------------------------------------------------------------------------------------

def test_every_error_printed_with_source_line_and_caret(tmp_path):
    text = """\
specc: 1
name: m
params:
  d: 16
inputs:
  x: f32[B, T, d]
blocks:
  enc(h): |
    return h + lienar(h, d)
graph: |
  a = enc(x)
  b = relu(x +)
  c = linear(x, 8) + x
outputs:
  c: f32[B, T, 8]
"""
    path = write(tmp_path, text)
    err, heads = failed("check", str(path))
    assert err == f"""\
{path}:9:16: error: unknown operator 'lienar' (did you mean 'linear'?)
    9 |     return h + lienar(h, d)
      |                ^~~~~~
      = note: operators are listed by `specc ops`; blocks are defined under 'blocks:'
      = note: in block 'enc' called at {path}:11:7
{path}:12:15: error: syntax error: unexpected ')'
   12 |   b = relu(x +)
      |               ^
{path}:13:22: error: add: cannot broadcast f32[B, T, 8] with f32[B, T, 16]: dimension -1 is 8 vs 16
   13 |   c = linear(x, 8) + x
      |                      ^
3 errors
"""


def test_ir_command_reports_the_same_errors(tmp_path):
    path = write(tmp_path, GOOD.replace("linear(x, d)", "linear(x, d, bais=true)"))
    err, heads = failed("ir", str(path))
    assert heads == [(str(path), 8, 25, "linear() has no argument 'bais' (did you mean 'bias'?)")]


# ---------------------------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------------------------

def test_failing_build_leaves_no_output_directory(tmp_path):
    path = write(tmp_path, GOOD.replace("relu(", "rleu("))
    out = tmp_path / "out"
    err, heads = failed("build", str(path), "-o", str(out))
    assert heads == [(str(path), 8, 7, "unknown operator 'rleu' (did you mean 'relu'?)")]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_failing_build_keeps_a_previous_build_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.py").write_text("# previous build\n")
    path = write(tmp_path, GOOD)
    failed("build", str(path), "-o", str(out), "--set", "d=-1")
    assert [p.name for p in out.iterdir()] == ["model.py"]
    assert (out / "model.py").read_text() == "# previous build\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "spec.yaml"]


def test_an_output_path_that_is_a_file_or_under_one_is_a_user_error(tmp_path, capsys):
    from specc.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("specc: 1\nname: s\ninputs:\n  x: f32[B, 4]\ngraph: |\n  y = relu(x)\noutputs:\n  y: f32[B, 4]\n")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["build", str(spec), "-o", str(afile), "--no-color"]) == 2
    assert "the output path exists and is not a folder" in capsys.readouterr().err
    assert main(["build", str(spec), "-o", str(afile / "sub"), "--no-color"]) == 2
    assert f"{afile} is not a folder" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def test_run_with_example_inputs_larger_than_memory(tmp_path):
    """`build --run` at example sizes whose inputs cannot fit in memory: an error at the input, before
    anything is built (the run had been an internal error after the build was written)."""
    spec = tmp_path / "huge.yaml"
    spec.write_text(GOOD.replace("inputs:", "dims:\n  T: {example: 100000000000}\ninputs:"))
    r = specc("build", str(spec), "-o", str(tmp_path / "out"), "--run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert re.search(rf"{re.escape(str(spec))}:8:3: error: the example inputs need \d+\.\d GiB at the example "
                     r"sizes \(B=2, T=100000000000\), more than this machine's", r.stderr), r.stderr
    assert not (tmp_path / "out").exists()
    assert specc("build", str(spec), "-o", str(tmp_path / "out")).returncode == 0  # without --run: fine


def test_ops_lists_every_operator_and_prints_the_whole_text_of_named_ones():
    from specc.compiler import ops  # noqa: F401  (registers the operators)
    from specc.compiler.registry import REGISTRY

    r = specc("ops")
    assert r.returncode == 0, r.stderr
    listed = {line.split("(")[0] for line in r.stdout.splitlines() if "(" in line}
    public = {n for n, d in REGISTRY.items() if d.category != "internal"}
    assert len(public) > 50 and public <= listed
    # the first paragraph on one line, not cut at the first line break of the text
    [attention] = [line for line in r.stdout.splitlines() if line.startswith("attention(")]
    assert attention.rstrip().endswith("rope_dim=none, kv_heads=none): multi-head softmax attention.")
    r = specc("ops", "conv2d", "attention")
    assert r.returncode == 0 and "padding may be 'same'" in r.stdout and "[B, out, H', W']" in r.stdout
    assert "A query with no allowed position gets zeros" in r.stdout
    r = specc("ops", "conv2x")
    assert r.returncode == 2 and "unknown operator 'conv2x' (did you mean 'conv2d'?)" in r.stderr


def test_check_json_prints_the_errors_as_json(tmp_path, capsys):
    """`specc check --json` on a bad spec: exit 2, the located errors as JSON on stdout (for editors and
    tools), the rendered text on stderr as without --json."""
    import json

    from specc.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("specc: 1\nname: bad\ninputs:\n  x: f32[B, 4]\ngraph: |\n  y = lienar(x, 2)\noutputs:\n  y:\n")
    assert main(["check", str(path), "--json", "--no-color"]) == 2
    out, err = capsys.readouterr()
    got = json.loads(out)["errors"]
    assert len(got) == 1 and got[0]["file"] == str(path) and (got[0]["line"], got[0]["col"]) == (6, 7)
    assert got[0]["message"].startswith("unknown operator 'lienar'") and got[0]["severity"] == "error"
    assert "lienar" in err and "1 error" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "SPEC", "-o", "RUN", "--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["train", "SPEC", "-o", "RUN", "--threads", "x"], "argument --threads: expected a positive integer, got 'x'"),
    (["train", "SPEC", "-o", "RUN", "--until", "-1"], "argument --until: expected an integer >= 0, got -1"),
    (["verify", "SPEC", "--examples", "0"], "argument --examples: expected a positive integer, got 0"),
])
def test_numeric_arguments_are_checked_as_usage_errors(tmp_path, capsys, argv, message):
    """--threads 0 had been taken (as 1), --until -1 ran nothing, --examples 0 exited 1: usage errors, exit 2."""
    from specc.cli import main

    argv = [str(ROOT / "tests" / "data" / "train_moons.yaml") if a == "SPEC" else
            str(tmp_path / "run") if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_into_a_file_is_a_user_error(tmp_path):
    afile = write(tmp_path, "keep me", "tok.npz")
    err, heads = failed("train", "specs/gpt.yaml", "-o", str(afile), "--set", "train.steps=1")
    assert heads == [(str(afile), 0, 0, "the output path exists and is not a folder")]
    assert afile.read_text() == "keep me"


DIVIDES = "specc: 1\nname: d\ninputs:\n  a: i64[B, 4]\n  b: i64[B, 4]\ngraph: |\n  q = a // b + a % b\noutputs:\n  q:\n"


def test_an_integer_division_by_an_input_zero(tmp_path):
    """build --run on example inputs that divide by 0: a user error naming the cause (it was an internal
    error); verify skips such inputs, says so, and still verifies on the others."""
    spec = write(tmp_path, DIVIDES)
    r = specc("build", str(spec), "-o", str(tmp_path / "out"), "--run")
    assert r.stdout.startswith("built d -> ")  # the build itself is complete
    err, heads = failed(r=subprocess.CompletedProcess(r.args, r.returncode, "", r.stderr))
    assert heads[0][3] == ("the build is complete, but on its example inputs the model divided an integer by 0 "
                           "(torch raises ZeroDivisionError)")
    assert "give the divisor's input a range without 0" in err
    r = specc("verify", str(spec), "--examples", "20")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert re.search(r"note: \d+ generated inputs made the unoptimised model divide an integer by 0", r.stdout)
    assert "ok: 20 runs, no mismatch" in r.stdout
    fine = write(tmp_path, DIVIDES.replace("b: i64[B, 4]", "b: i64[B, 4] in range(1, 8)"), "fine.yaml")
    r = specc("verify", str(fine), "--examples", "5")
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout


@pytest.mark.parametrize("line, col, message", [
    ("seed: 99999999999999999999999", 7, "seed: must be at most 9223372036854775807, got 99999999999999999999999"),
    ("seed: true", 7, "seed: expected an integer, got a boolean"),
    ("seed: -1", 7, "seed: must be at least 0, got -1"),
])
def test_the_seed_is_an_int64(tmp_path, line, col, message):
    spec = write(tmp_path, GOOD + line + "\n")
    _, heads = failed("check", str(spec))
    assert heads == [(str(spec), 11, col, message)]


@pytest.mark.parametrize("decl, col, message", [
    ("u8[B] in range(300)", 17, "range(0, 300) does not fit u8, whose values lie in [0, 255]"),
    ("i8[B] in range(-200, 100)", 17, "range(-200, 100) does not fit i8, whose values lie in [-128, 127]"),
    ("i32[B] in range(2**31 + 1)", 18, "range(0, 2147483649) does not fit i32, whose values lie in "
                                       "[-2147483648, 2147483647]"),
])
def test_a_value_range_must_fit_its_dtype(tmp_path, decl, col, message):
    spec = write(tmp_path, GOOD.replace("  x: f32[B, T, d]\n", f"  x: f32[B, T, d]\n  ids: {decl}\n"))
    _, heads = failed("check", str(spec))
    assert heads == [(str(spec), 7, col, message)]


def test_digits_are_ascii_and_eps_is_not_negative(tmp_path):
    spec = write(tmp_path, GOOD.replace("linear(x, d)", "linear(x, \uff14)"))
    assert failed("check", str(spec))[1] == [(str(spec), 8, 22, "unexpected character '\uff14'")]
    spec = write(tmp_path, GOOD.replace("relu(linear(x, d))", "layer_norm(x, eps=-1.0)"))
    assert failed("check", str(spec))[1] == [(str(spec), 8, 21, "layer_norm: eps must be 0 or more, got -1.0")]
