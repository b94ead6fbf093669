"""Spec files are untrusted input: no YAML feature constructs objects, nothing reaches eval/exec, no
spec text can inject code into the generated model.py, and no spec can make `check` hang, recurse
without bound or allocate weights. Every refusal is a located error."""

from __future__ import annotations

import ast
import builtins
import importlib.util
import os
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
import torch
import yaml

import specc
from specc import SpecError

BASE = """\
specc: 1
name: m
params:
  d: 8
inputs:
  x: f32[B, T, d]
graph: |
  y = relu(linear(x, d))
outputs:
  y: null
"""

#: What a generated model.py may import, and nothing else.
ALLOWED_IMPORTS = {"__future__", "json", "math", "pathlib", "torch", "torch.nn.functional", "torch.nn"}


def errors(text: str, **overrides) -> list[tuple[int, int, str]]:
    with pytest.raises(SpecError) as info:
        specc.check(text, **overrides)
    return [(d.span.line, d.span.col, d.message) for d in info.value.diagnostics]


@pytest.fixture
def no_side_effects(monkeypatch):
    """Fail the test if anything calls os.system, eval, exec or an unsafe YAML loader."""
    specc.check(BASE)  # warm every import and cache first: importing runs exec

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called with {args!r:.200}")
        return call

    monkeypatch.setattr(os, "system", forbidden("os.system"))
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, forbidden(name))
    for name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
        monkeypatch.setattr(yaml, name, forbidden(f"yaml.{name}"))


# ---------------------------------------------------------------------------------------------
# YAML features
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [
    ('!!python/object/apply:os.system ["echo PWNED"]', "!!python/object/apply:os.system"),
    ("!!python/object/new:os.system [echo PWNED]", "!!python/object/new:os.system"),
    ("!!python/name:os.system", "!!python/name:os.system"),
    ("!!python/module:os", "!!python/module:os"),
    ("!!python/tuple [1, 2]", "!!python/tuple"),
    ("!!binary aGVsbG8=", "!!binary"),
    ("!!set {a, b}", "!!set"),
    ("!!omap [a: 1]", "!!omap"),
    ("!local thing", "!local"),
    ("!<tag:example.com,2000:x> thing", "tag:example.com,2000:x"),
])
def test_yaml_tags_are_refused_where_they_stand(no_side_effects, value, shown):
    text = BASE.replace("name: m\n", f"name: m\ndescription: {value}\n")
    assert errors(text) == [(3, 14, f"YAML tag '{shown}' is not allowed in spec files")]


def test_tagged_and_complex_keys_and_merge_keys_are_refused(no_side_effects):
    text = BASE.replace("  d: 8\n", "  d: 8\n  ? !!python/name:os.system\n  : 1\n  ? [a, b]\n  : 2\n  <<: {e: 1}\n")
    assert errors(text) == [
        (5, 5, "YAML complex or tagged keys are not allowed in spec files"),
        (7, 5, "YAML complex or tagged keys are not allowed in spec files"),
        (9, 3, "YAML merge keys (<<) are not allowed in spec files"),
    ]


def test_anchors_and_aliases_are_refused_even_when_exponential(no_side_effects):
    laughs = "params:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        laughs += f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    text = BASE.replace("params:\n  d: 8\n", laughs)
    t0 = time.perf_counter()
    found = errors(text)
    assert time.perf_counter() - t0 < 1.0
    assert found[0] == (4, 6, "YAML anchors (&name) are not allowed in spec files")
    assert found[1] == (5, 6, "YAML anchors (&name) are not allowed in spec files")
    assert found[2] == (5, 10, "YAML aliases (*name) are not allowed in spec files")
    assert len(found) == 9 + 8 * 9  # every anchor and every alias, at its own place


def test_escapes_cannot_smuggle_control_characters(no_side_effects):
    text = BASE.replace("name: m\n", 'name: m\ndescription: "a\\0b"\npaper: "x\\ud800"\n"k\\e": 1\n')
    assert errors(text) == [
        (3, 14, "the text contains the character U+0000 (from an escape); control characters are not allowed "
                "in spec files"),
        (4, 8, "the text contains the character U+D800 (from an escape); control characters are not allowed "
               "in spec files"),
        (5, 1, "the key contains the character U+001B (from an escape); control characters are not allowed "
               "in spec files"),
    ]


def test_nothing_is_evaluated(no_side_effects):
    text = BASE.replace("name: m\n", "name: m\ndescription: __import__('os').system('echo PWNED')\n") \
        .replace("  d: 8\n", "  d: 8\n  s: \"__import__('os').system('echo PWNED')\"\n") \
        .replace("relu(linear(x, d))", "relu(linear(x, d)) if s == 'eval(1)' else relu(x)")
    assert specc.check(text).outputs[0].name == "y"
    graph = specc.compile(text)
    assert graph.params["s"] == "__import__('os').system('echo PWNED')"
    errs = errors(BASE.replace("relu(linear(x, d))", "__import__('os').system('echo')"))
    assert errs == [(8, 23, "unexpected character '.'")]  # the grammar has no attribute access


# ---------------------------------------------------------------------------------------------
# Names: only validated identifiers reach generated code
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, where, message", [
    (("name: m", "name: \"m(nn.Module): pass\\nimport os\\nclass X\""), (2, 7),
     "name: 'm(nn.Module): pass\\nimport os\\nclass X' is not a valid name"),
    (("  d: 8", "  \"d=os.system('x')\": 8\n  d: 8"), (4, 3), "params: 'd=os.system('x')' is not a valid name"),
    (("  x: f32", "  \"x): import os #\": f32[B]\n  x: f32"), (6, 3), "inputs: 'x): import os #' is not a valid name"),
    (("  y: null", "  y: null\n  \"y\\n\": null"), (11, 3), "outputs: 'y\\n' is not a valid name"),
    (("  y: null", "  __class__: null"), (10, 3), "outputs: '__class__' starts with '__'"),
    (("inputs:", "dims:\n  \"T; import os\": 4\ninputs:"), (6, 3), "dims: 'T; import os' is not a valid name"),
    (("graph: |", "blocks:\n  \"b(h):\\n import os\\n def f(h)\": |\n    return h\ngraph: |"), (8, 8),
     "syntax error: unexpected ':'"),
    (("graph: |", "blocks:\n  __init__(h): |\n    return h\ngraph: |"), (8, 3),
     "block name: '__init__' starts with '__'"),
    (("  y = relu", "  __dict__ = relu(x)\n  y = relu"), (8, 3), "'__dict__' starts with '__'"),
    (("  y = relu", "  self = relu(x)\n  y = relu"), (8, 3), "'self' is a reserved word"),
])
def test_names_that_could_break_generated_code_are_refused(edit, where, message):
    text = BASE.replace(*edit, 1)
    assert text != BASE
    found = errors(text)
    assert found[0][:2] == where and found[0][2].startswith(message), found


def build_and_import(tmp_path: Path, text: str, name: str = "spec.yaml"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec_path = tmp_path / name
    spec_path.write_text(text)
    out = tmp_path / "out"
    specc.build(spec_path, out)
    source = (out / "model.py").read_text()
    tree = ast.parse(source)  # valid Python
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Name):
            assert node.id not in ("os", "subprocess", "system", "eval", "exec", "__import__"), ast.dump(node)
        elif isinstance(node, ast.Attribute):
            assert node.attr not in ("system", "popen"), ast.dump(node)
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    # top level: the docstring, imports, constants, classes and functions; no other statement
    kinds = {type(n).__name__ for n in tree.body}
    assert kinds <= {"Expr", "Import", "ImportFrom", "Assign", "AnnAssign", "ClassDef", "FunctionDef"}, kinds
    assert isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
    assert all(isinstance(n.value, ast.Constant) for n in tree.body if isinstance(n, ast.Expr))
    mod_name = f"untrusted_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(mod_name, out / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)  # imports cleanly
        model = module.load(out)
        outputs = model(*module.example_inputs())
    finally:
        del sys.modules[mod_name]
    return source, tree, outputs


INJECTION = "\n".join([
    "specc: 1",
    "name: m",
    r'''paper: "Attention\"\"\" + __import__('os').system('echo PWNED') + \"\"\" \\"''',
    "description: |",
    '  Triple quotes end a docstring: """',
    "  import os",
    '  os.system("echo PWNED")',
    "  \"\"\" and ''' too, a trailing backslash \\",
    "params:",
    "  d: 8",
    r'''  note: "\"\"\"\nimport os\nos.system('echo PWNED')\n\"\"\""''',
    '  act: "gelu"',
    "inputs:",
    "  x: f32[B, T, d]",
    "graph: |",
    '  h = linear(x, d)  # a comment with """ and import os',
    '  y = mlp(h, hidden=2 * d, act=act) if note != "" else h',
    "outputs:",
    "  y: f32[B, T, d]",
    "",
])


def test_free_text_cannot_inject_code_into_model_py(tmp_path, capfd):
    source, tree, outputs = build_and_import(tmp_path, INJECTION)
    assert tuple(outputs.shape) == (2, 8, 8)
    assert "PWNED" not in capfd.readouterr().out
    doc = ast.get_docstring(tree)
    assert "import os" in doc  # the text is kept, inside the docstring ...
    code_lines = [ln for ln in source.splitlines() if ln.startswith(("import", "from"))]
    assert code_lines == ["from __future__ import annotations", "import json", "import math",
                          "from pathlib import Path", "import torch", "import torch.nn.functional as F",
                          "from torch import nn"]  # ... and never becomes a statement


#: Characters that make source read otherwise than it runs (Trojan Source) or hide: bidi embeddings,
#: overrides and isolates, marks, zero-width and other format characters, separators, a tag character.
INVISIBLE = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u200b\u200d\u00ad"
             "\ufeff\u2028\u2029\U000e0041")


def test_invisible_and_bidi_characters_never_reach_model_py(tmp_path):
    def escaped(text: str) -> str:  # YAML double-quoted escapes: the file itself stays plain
        return "".join(c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                       for c in text)

    text = BASE.replace("name: m\n", "name: m\n"
                        f'description: "admin{escaped(INVISIBLE)} check # secret"\n'
                        f'paper: "Attention \u202eIs All\u2066 You Need"\n'
                        'params:\n  note: "ok\\u202e"\n', 1).replace("params:\n  d: 8", "  d: 8")
    source, tree, _ = build_and_import(tmp_path, text, name="spec\u202e\u200f\x1b.yaml")
    bad = sorted({f"U+{ord(c):04X}" for c in source if c != "\n" and not c.isprintable()})
    assert not bad, bad
    for c in INVISIBLE.replace("\u2028", "").replace("\u2029", ""):  # line separators: spaces, as all whitespace
        # each is written as its escape, which the docstring decodes back to the character
        assert (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}") in source, hex(ord(c))
    doc = ast.get_docstring(tree)
    assert " ".join(f"admin{INVISIBLE} check # secret".split()) in doc
    assert "Paper: Attention \u202eIs All\u2066 You Need" in doc and "spec\u202e\u200f\x1b.yaml" in doc
    assert "\\u202eIs All\\u2066 You Need" in source and "note='ok/u202e'" in source


def test_builtin_and_module_names_are_renamed_not_shadowed(tmp_path):
    text = """\
specc: 1
name: Model
params:
  d: 4
inputs:
  x: f32[B, T, d]
  F: f32[B, T, d]
blocks:
  torch(nn, math): |
    json = linear(nn, d) + math
    Path = json * 2
    return Path
  Model(self_): |
    return relu(self_)
graph: |
  layer = torch(x, F)
  load = Model(layer)
  example_inputs = linear(load, d)
  training = linear(example_inputs, d)
  print = training
outputs:
  print: null
"""
    source, tree, outputs = build_and_import(tmp_path, text)
    assert tuple(outputs.shape) == (2, 8, 4)


BLOCK_NAMED = """\
specc: 1
name: bn
params: {d: 8}
dims: {B: 2, T: {example: 3}}
inputs:
  x: f32[B, T, d]
blocks:
  BLOCK(h): |
    h = h + mlp(h, hidden=16) + attention(h, heads=2) + parameter(d)
    return h
graph: |
  y = BLOCK(x)
  y = BLOCK(y)
outputs:
  y: f32[B, T, d]
"""


def _module_level_names(source: str) -> set[str]:
    from specc.backends.pytorch.codegen import bound_names

    return set(bound_names(ast.parse(source).body))


def test_block_names_never_take_a_name_the_generated_module_uses(tmp_path):
    # a block class F hid `torch.nn.functional as F` (the build passed, the import failed); every
    # module-level name of model.py (imports, constants, helpers, load, ...) and some builtins as block names
    plain_source, _, plain = build_and_import(tmp_path / "plain", BLOCK_NAMED.replace("BLOCK", "blk"))
    taken = _module_level_names(plain_source)
    assert {"F", "Path", "INPUTS", "DIMS", "TIED", "ACTIVATIONS", "Parameters", "Model", "load"} <= taken
    names = {"F", "parameters", "Parameters", "Path", "INPUTS", "ACTIVATIONS", "DIMS", "TIED", "list", "super",
             "Model", "load", "nn", "math", "torch", "Tensor", "MLP", "MultiHeadAttention", "Exception"}
    names |= {n for n in taken if not n.startswith("__") and n not in ("annotations",)}
    for i, name in enumerate(sorted(names)):
        source, _, outputs = build_and_import(tmp_path / str(i), BLOCK_NAMED.replace("BLOCK", name))
        assert torch.equal(outputs, plain), name
        classes = [n.name for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
        assert len(classes) == len(set(classes)) and len(_module_level_names(source)) == len(taken), name


def test_a_module_name_defined_twice_is_a_codegen_error():
    from specc.backends.pytorch.codegen import CodegenError, check_module

    check_module("import torch\nclass G:\n    F = 1\n")
    with pytest.raises(CodegenError, match="'F' twice"):
        check_module("import torch.nn.functional as F\n\nclass F:\n    pass\n")


def test_spec_file_name_cannot_inject_code(tmp_path):
    build_and_import(tmp_path, BASE, name='evil"""\nimport os\n""".yaml')


def test_symbolic_dimension_names_do_not_shadow_generated_names(tmp_path):
    text = BASE.replace("f32[B, T, d]", "f32[torch, F, d]").replace("relu(linear(x, d))",
                                                                    "softmax(reshape(x, torch * F, d))")
    build_and_import(tmp_path, text)


# ---------------------------------------------------------------------------------------------
# Resources: no hang, no unbounded recursion, no allocation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph, where, message", [
    ("a = d\n" + "a = a * a\n" * 12 + "y = relu(x)", (17, 7), "result out of range"),  # 8 ** 512
    ("a = B + T + d\n" + "a = a * a\n" * 8 + "y = relu(x)", (12, 7), "the symbolic expression is too large"),
    ("a = 'ab'\n" + "a = a + a\n" * 40 + "y = relu(x)", (21, 7),
     "the string would be longer than 10000 characters"),
    ("y = " + "-" * 500 + "x", (8, 105), "this expression is nested too deeply (more than 100 levels;"),
    ("y = " + "relu(" * 300 + "x" + ")" * 300, (8, 492), "this expression is nested too deeply (more than 100 levels;"),
    ("y = split(x, 10 ** 9)", (8, 16), "split: at most 4096 parts, got 1000000000"),
    ("y = lstm(x, 4, layers=10 ** 9)", (8, 18), "lstm: at most 1024 layers, got 1000000000"),
    ("y = reshape(x, 2 ** 40, 2 ** 40, -1)", (8, 18),
     "reshape: cannot reshape f32[B, T, 8] (8*B*T elements) into [1099511627776, 1099511627776, -1]"),
])
def test_hostile_arithmetic_is_bounded(graph, where, message):
    text = BASE.replace("  y = relu(linear(x, d))\n", "".join("  " + ln + "\n" for ln in graph.splitlines()))
    t0 = time.perf_counter()
    found = errors(text)
    assert time.perf_counter() - t0 < 2.0
    assert found[0][:2] == where and found[0][2].startswith(message), found


def test_huge_numbers_in_params_overrides_and_scalars():
    text = BASE.replace("  d: 8\n", "  d: 8\n  big: 0x" + "f" * 300 + "\n  inf: .inf\n")
    assert errors(text) == [
        (5, 8, "params.big: the integer is too large (more than 1024 bits)"),
        (6, 8, "params.inf: expected a finite number, got inf"),
    ]
    text = BASE.replace("  d: 8\n", "  d: 8\n  long: " + "9" * 5000 + "\n")
    assert errors(text) == [(5, 9, "invalid !!int value '" + "9" * 40 + "...'")]  # more digits than Python reads
    assert errors(BASE, d=10 ** 400)[0][2] == "bad override for 'd': the integer is too large (more than 1024 bits)"
    assert errors(BASE, d=float("nan"))[0][2] == "bad override for 'd': expected an integer, got nan"
    ints = BASE.replace("f32[B, T, d]", "i64[B, T, d]").replace("relu(linear(x, d))", "x * 2 ** 64")
    assert errors(ints) == [(8, 11, "the integer 18446744073709551616 does not fit the dtype i64 "
                                    "(range(-9223372036854775808, 9223372036854775808))")]


def test_huge_dimensions_are_refused():
    found = errors(BASE.replace("f32[B, T, d]", "f32[B, 4294967296, 4294967296]"))
    assert found == [(6, 25, "the dimension 4294967296 is too large (sizes and element counts must stay "
                             "below 2**63)")]
    found = errors(BASE, d=2 ** 70)
    assert found[0][2].startswith("the dimension 1180591620717411303424 is too large")


def test_billions_of_parameters_check_fast_without_allocating_weights():
    text = """\
specc: 1
name: big
params:
  vocab: 256000
  d: 16384
  layers: 64
inputs:
  ids: i64[B, T] in range(vocab)
blocks:
  block(h): |
    h = h + attention(rms_norm(h), heads=128, causal=true)
    return h + mlp(rms_norm(h), hidden=4 * d, act=silu)
graph: |
  h = embedding(ids, vocab, d)
  h = repeat(layers, block, h)
  logits = linear(rms_norm(h), vocab, bias=false)
outputs:
  logits: f32[B, T, vocab]
"""
    specc.check(text, layers=1)  # warm up
    tracemalloc.start()
    t0 = time.perf_counter()
    summary = specc.check(text)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.params > 200e9
    assert elapsed < 1.0, f"check took {elapsed:.2f}s"
    assert peak < 50e6, f"check allocated {peak / 1e6:.0f} MB"


def test_failing_build_through_the_api_leaves_nothing(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(BASE.replace("relu(", "relu(nope + "))
    with pytest.raises(SpecError):
        specc.build(spec_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
