"""Custom operators from Python (`@specc.custom_op`), used by a spec only through `imports:` and
only when the user allows each import; the generated model.py imports the module and calls it."""

from __future__ import annotations

import re
import sys
import textwrap
import uuid

import pytest
import torch

import specc
from specc.cli import main
from specc.compiler.registry import REGISTRY
from specc.custom import unregister

HEAD_RE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")

OPS = '''
import torch
import specc

MARKER = None  # set by the tests: a file that importing this module creates


def scaled_tanh(x, alpha=1.0, weight=None):
    return torch.tanh(alpha * x) * weight


def mix(xs, scale=1):
    return sum(xs) * scale


@specc.custom_op("{p}scaled_tanh", args=["x", ("alpha", "float", 1.0)],
                 params=lambda c: {{"weight": (c.t("x").shape[-1],)}}, torch=scaled_tanh,
                 flops=lambda c, outs: 3 * outs[0].numel())
def _scaled_tanh(c):
    """scaled_tanh(x, alpha=1): tanh(alpha * x) * weight, a learned gain per feature."""
    x = c.t("x")
    if x.dtype != "f32":
        raise specc.OpError("{p}scaled_tanh: x must be f32, got " + str(x), "x")
    return x


@specc.custom_op("{p}mix", args=[("xs", "tensors"), ("scale", "int", 1)], torch=mix)
def _mix(c):
    xs = c.t("xs")
    if len({{str(t) for t in xs}}) != 1:
        raise specc.OpError("{p}mix: all inputs must have one type", "xs")
    return xs[0]


def wrong(x, mode=0):
    return [x, x[..., :-1], x.long(), (x, x), 2.0][mode]


@specc.custom_op("{p}wrong", args=["x", ("mode", "int", 0)], torch=wrong)
def _wrong(c):
    return c.t("x")


@specc.custom_op("{p}broken", torch=mix)
def _broken(c):
    return c.t("x").shape[5]  # a bug in the rule: IndexError
'''


@pytest.fixture
def ops(tmp_path, monkeypatch):
    """A fresh custom-op module on sys.path: (module name, op-name prefix). Unregistered afterwards."""
    name = f"lang_ops_{uuid.uuid4().hex[:8]}"
    prefix = name[-8:] + "_"
    prefix = "op" + prefix
    (tmp_path / f"{name}.py").write_text(OPS.format(p=prefix))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, prefix
    for op, opdef in list(REGISTRY.items()):
        if opdef.module == name:
            unregister(op)
    sys.modules.pop(name, None)


def spec_text(module: str, p: str, graph: str | None = None, imports: str | None = None) -> str:
    graph = graph or f"""
h = linear(x, 8)
y = {p}scaled_tanh(h, alpha=2.0, init=ones)
z = {p}mix([y, h], scale=3)
w = {p}scaled_tanh(z, share=y)
"""
    body = textwrap.indent(graph.strip(), "  ")
    return (f"specc: 1\nname: cust\nimports: {imports or '[' + module + ']'}\ninputs:\n  x: f32[B, 8]\n"
            f"graph: |\n{body}\noutputs:\n  w: f32[B, 8]\n")


def errors(capsys, *args) -> tuple[str, list[tuple[int, int, str]]]:
    code = main([*args, "--no-color"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    return err, [(int(m["line"]), int(m["col"]), m["msg"]) for m in map(HEAD_RE.match, err.splitlines()) if m]


def test_custom_op_builds_runs_and_matches_a_hand_computation(ops):
    module, p = ops
    text = spec_text(module, p)
    s = specc.check(text, allow_imports=[module])
    assert s.params == 8 * 8 + 8 + 8  # the shared gain counts once
    assert s.flops_by_op[f"{p}scaled_tanh"] == 2 * 3 * 2 * 8
    model = specc.load(text, allow_imports=[module], opt_level=0)
    assert model.w.weight is model.y.weight and torch.all(model.y.weight == 1.0)
    x = torch.randn(3, 8)
    h = model.h(x)
    y = torch.tanh(2.0 * h) * model.y.weight
    z = (y + h) * 3
    expected = torch.tanh(z) * model.y.weight
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_generated_source_imports_the_module(ops, tmp_path):
    module, p = ops
    specc.build(spec_text(module, p), tmp_path / "out", allow_imports=[module])
    source = (tmp_path / "out" / "model.py").read_text()
    assert f"import {module} as _ext_{module}" in source
    assert f"_ext_{module}.{p[:-1]}" not in source  # the call names the torch function, not the op
    assert f"_ext_{module}.scaled_tanh(h, alpha=2.0, weight=self.y.weight)" in source
    assert f"_ext_{module}.mix([y, h], scale=3)" in source
    assert "class Parameters(nn.Module):" in source


def test_what_an_implementation_returns_is_checked_against_its_shape_rule(ops):
    """The generated model checks a custom operator's result against the declared type: a wrong shape,
    dtype or number of values is a RuntimeError naming the operator, not a wrong model."""
    module, p = ops
    for mode, message in ((1, f"custom operator {p}wrong has shape [5, 7], its shape rule declares [5, 8]"),
                          (2, f"custom operator {p}wrong has dtype torch.int64, its shape rule declares "
                              f"torch.float32"),
                          (3, f"custom operator {p}wrong is a tuple, not a tensor"),
                          (4, f"custom operator {p}wrong is a float, not a tensor")):
        model = specc.load(spec_text(module, p, f"w = {p}wrong(x, mode={mode})"), allow_imports=[module])
        with pytest.raises(RuntimeError) as info:
            model(torch.randn(5, 8))
        assert str(info.value) == message
    model = specc.load(spec_text(module, p, f"w = {p}wrong(x)"), allow_imports=[module])
    for batch in (1, 5):  # the symbolic batch: the size the input gives
        x = torch.randn(batch, 8)
        assert torch.equal(model(x), x)
        assert model.double()(x.double()).dtype == torch.float64  # a declared float: the model's float dtype


def test_custom_op_parameters_can_be_frozen(ops):
    module, p = ops
    text = spec_text(module, p, graph=f"w = {p}scaled_tanh(linear(x, 8), frozen=true)")
    model = specc.load(text, allow_imports=[module], opt_level=0)
    assert not model.w.weight.requires_grad
    assert specc.check(text, allow_imports=[module]).trainable_params == 8 * 8 + 8


def test_an_import_the_user_has_not_allowed_is_refused_and_nothing_is_imported(ops, tmp_path, capsys):
    module, p = ops
    other = f"lang_other_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{other}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(module, p, imports=f"[{other}, {module}]"))
    err, heads = errors(capsys, "check", str(path), "--allow-import", other)
    col = path.read_text().splitlines()[2].index(module) + 1
    assert heads == [(3, col, f"the spec imports the Python module '{module}', which you have not allowed")], err
    assert f"--allow-import {module}" in err
    assert not marker.exists() and other not in sys.modules and module not in sys.modules
    with pytest.raises(specc.SpecError, match="not allowed"):
        specc.load(path)  # the Python API allows nothing by default either
    assert module not in sys.modules


def test_a_failing_import_is_located(tmp_path, capsys, monkeypatch):
    bad = f"lang_bad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{bad}.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(bad, "x_", graph="w = unknown_op(x)"))
    err, heads = errors(capsys, "check", str(path), "--allow-import", bad)
    assert heads == [(3, 11, f"cannot import module '{bad}': RuntimeError: no GPU here")], err
    missing = f"lang_missing_{uuid.uuid4().hex[:8]}"
    path.write_text(spec_text(missing, "x_", graph="w = relu(x)"))
    err, heads = errors(capsys, "check", str(path), "--allow-import", missing)
    assert heads[0][:2] == (3, 11) and "ModuleNotFoundError" in heads[0][2], err


def test_a_custom_op_needs_its_module_in_imports(ops, tmp_path, capsys):
    module, p = ops
    __import__(module)  # registered in this process, but the spec does not import it
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(module, p, imports="[]"))
    err, heads = errors(capsys, "check", str(path))
    assert heads[0][2] == f"'{p}scaled_tanh' is a custom operator of module '{module}', which this spec does not " \
                          f"import", err
    assert f"add `imports: [{module}]`" in err


def test_shape_rule_errors_are_located(ops, tmp_path, capsys):
    module, p = ops
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(module, p, graph=f"""
a = {p}scaled_tanh(cast(x, f64))
b = {p}mix([x, cast(x, f64)])
w = {p}broken(x)
"""))
    err, heads = errors(capsys, "check", str(path), "--allow-import", module)
    lines = path.read_text().splitlines()
    assert heads[0][:2] == (7, lines[6].index("cast") + 1)
    assert heads[0][2] == f"{p}scaled_tanh: x must be f32, got f64[B, 8]"
    assert heads[1][:2] == (8, lines[7].index("[x") + 1) and "all inputs must have one type" in heads[1][2]
    assert heads[2][0] == 9 and "the shape rule raised IndexError" in heads[2][2]


def test_module_names_must_be_dotted_identifiers(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text("x", "x_", graph="w = relu(x)", imports="['os; rm -rf', 'a..b', a.b, __main__]"))
    err, heads = errors(capsys, "check", str(path))
    assert [h[:2] for h in heads] == [(3, 11), (3, 25), (3, 38)], err
    assert all("is not a module name" in h[2] for h in heads)
    with pytest.raises(SystemExit) as e:  # a usage error of the command line
        main(["check", str(path), "--allow-import", "not a module"])
    assert e.value.code == 2 and "is not a module name" in capsys.readouterr().err


def test_bad_declarations_are_refused(ops):
    module, _ = ops
    mod = __import__(module)
    rule = mod._mix
    with pytest.raises(ValueError, match="already registered"):
        specc.custom_op("linear", args=["x"], infer=rule, torch=mod.mix, module=module)
    with pytest.raises(ValueError, match="word of the spec language"):
        specc.custom_op("repeat", args=["x"], infer=rule, torch=mod.mix, module=module)
    with pytest.raises(ValueError, match="kind"):
        specc.custom_op("bad_kind_op", args=[("x", "owner")], infer=rule, torch=mod.mix, module=module)
    with pytest.raises(ValueError, match="top level"):
        specc.custom_op("bad_fn_op", args=["x"], infer=rule, torch=lambda x: x, module=module)
    with pytest.raises(ValueError, match="not __main__"):
        specc.custom_op("bad_mod_op", args=["x"], infer=rule, torch="mix", module="__main__")
    with pytest.raises(ValueError, match="tensor arguments must come before"):
        specc.custom_op("bad_order_op", args=[("k", "int"), "x"], infer=rule, torch=mod.mix, module=module)
    with pytest.raises(ValueError, match="torch= .* is required"):
        specc.custom_op("no_torch_op", args=["x"], infer=rule, module=module)
    assert not {"bad_kind_op", "bad_fn_op", "bad_mod_op", "bad_order_op", "no_torch_op"} & set(REGISTRY)


def test_cli_build_with_allow_import(ops, tmp_path, capsys):
    module, p = ops
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(module, p))
    assert main(["build", str(path), "-o", str(tmp_path / "out"), "--allow-import", module, "--run"]) == 0
    assert "ran " in capsys.readouterr().out


def test_verify_api_takes_the_allowed_imports(ops):
    from specc.dsl.diagnostics import SpecError
    from specc.verify import verify

    module, p = ops
    text = spec_text(module, p)
    assert verify(text, examples=3, allow_imports=[module]).ok
    with pytest.raises(SpecError, match="import"):
        verify(text, examples=3)
