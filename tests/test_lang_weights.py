"""Given weights: `specc build --weights FILE.safetensors`, `specc.load/build(..., weights={...})`
put tensors into named parameters of the unoptimised graph; the rest keep their seeded
initialisation, and optimised builds derive their weights from these values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import specc
from specc.cli import main

SPEC = """\
specc: 1
name: small
inputs:
  img: f32[B, 3, 8, 8]
graph: |
  c = conv2d(img, 4, 3, padding=1)
  n = batch_norm(c)
  h = relu(n)
  p = mean(h, dim=[2, 3])
  y = linear(p, 5)
outputs:
  y: f32[B, 5]
"""


def given() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"n.running_mean": torch.randn(4, generator=gen), "n.running_var": torch.rand(4, generator=gen) + 0.5,
            "n.weight": torch.randn(4, generator=gen), "y.weight": torch.randn(5, 4, generator=gen)}


def test_given_tensors_replace_those_parameters_only():
    plain = specc.load(SPEC, opt_level=0).state_dict()
    model = specc.load(SPEC, opt_level=0, weights=given())
    state = model.state_dict()
    for name, value in given().items():
        assert torch.equal(state[name], value), name
    for name in ("c.weight", "c.bias", "n.bias", "y.bias"):
        assert torch.equal(state[name], plain[name]), name  # seeded, as without given weights


@pytest.mark.parametrize("opt_level", [1, 2])
def test_optimised_builds_derive_from_the_given_weights(opt_level):
    ref = specc.load(SPEC, opt_level=0, weights=given())
    model = specc.load(SPEC, opt_level=opt_level, weights=given())
    assert not hasattr(model, "n")  # batch norm folded into the convolution at -O1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_build_writes_given_values(tmp_path):
    specc.build(SPEC, tmp_path / "out", opt_level=0, weights={"y.bias": torch.arange(5.0)})
    stored = load_file(str(tmp_path / "out" / "weights.safetensors"))
    assert torch.equal(stored["y.bias"], torch.arange(5.0))


def test_values_are_cast_to_the_parameter_dtype():
    model = specc.load(SPEC, opt_level=0, weights={"y.bias": torch.arange(5, dtype=torch.float64)})
    assert model.y.bias.dtype == torch.float32 and torch.equal(model.y.bias.detach(), torch.arange(5.0))


@pytest.mark.parametrize("weights, messages", [
    ({"y.wieght": torch.zeros(5, 4)}, ["weights: 'y.wieght' is not a parameter of small"]),
    ({"y.weight": torch.zeros(4, 5)}, ["weights: 'y.weight' has shape [4, 5], but the parameter has shape [5, 4]"]),
    ({"n.num_batches_tracked": torch.tensor(1.5)}, ["weights: 'n.num_batches_tracked' is float32, but the "
                                                    "parameter is i64"]),
    ({"y.weight": "zeros"}, ["weights: 'y.weight' is not a tensor"]),
    ({"a": torch.zeros(1), "y.bias": torch.zeros(2)}, ["'a' is not a parameter", "'y.bias' has shape [2]"]),
])
def test_bad_weights_are_user_errors(weights, messages):
    with pytest.raises(specc.SpecError) as e:
        specc.load(SPEC, weights=weights)
    got = [d.message for d in e.value.diagnostics]
    assert len(got) == len(messages)
    for m, g in zip(messages, got):
        assert m in g, got


def test_unknown_names_list_close_ones():
    with pytest.raises(specc.SpecError) as e:
        specc.load(SPEC, weights={"y.wieght": torch.zeros(5, 4)})
    assert e.value.diagnostics[0].notes == ("close names: y.weight, n.weight, c.weight",)


def test_tied_parameters_are_given_at_their_owner():
    spec = """\
specc: 1
name: tied
inputs:
  ids: i64[B, T] in range(10)
graph: |
  tok = embedding(ids, 10, 8)
  head = linear(tok, 10, bias=false, tie=tok)
outputs:
  head: null
"""
    with pytest.raises(specc.SpecError, match="'head.weight' shares the storage of 'tok.weight'"):
        specc.load(spec, weights={"head.weight": torch.zeros(10, 8)})
    table = torch.randn(10, 8)
    model = specc.load(spec, weights={"tok.weight": table})
    assert torch.equal(model.head.weight.detach(), table)


def test_cli_weights(tmp_path, capsys):
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    w = tmp_path / "given.safetensors"
    save_file(given(), str(w))
    assert main(["build", str(spec), "-o", str(tmp_path / "out"), "-O", "0", "--weights", str(w)]) == 0
    stored = load_file(str(tmp_path / "out" / "weights.safetensors"))
    for name, value in given().items():
        assert torch.equal(stored[name], value)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["name"] == "small"


def test_cli_weights_errors(tmp_path, capsys):
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    w = tmp_path / "bad.safetensors"
    save_file({"y.wieght": torch.zeros(5, 4), "c.weight": torch.zeros(1)}, str(w))
    code = main(["build", str(spec), "-o", str(tmp_path / "out"), "--weights", str(w), "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{w}: error: weights: 'c.weight' has shape [1], but the parameter has shape [4, 3, 3, 3]" in err
    assert f"{w}: error: weights: 'y.wieght' is not a parameter of small" in err
    assert "close names: y.weight" in err and err.rstrip().endswith("2 errors")
    assert not (tmp_path / "out").exists()

    code = main(["build", str(spec), "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "missing.st")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read weights" in err and "Traceback" not in err, err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    code = main(["build", str(spec), "-o", str(tmp_path / "out"), "--weights", str(tmp_path / "junk.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read weights" in err and "Traceback" not in err, err


def _import_built(directory):
    import importlib.util
    import sys
    import uuid

    name = f"given_weights_build_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, directory / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module.load(directory)


def test_cli_weights_for_the_tvm_target(tmp_path, capsys):
    """`--target tvm-llvm --weights` compiles the given values (the batch norm folded into the convolution
    at -O1 derives its weights from them), as the torch build of the same file does; bad files are the same
    located errors, with nothing written."""
    pytest.importorskip("tvm")
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    w = tmp_path / "given.safetensors"
    save_file(given(), str(w))
    for target, out in (("torch", "t"), ("tvm-llvm", "v"), ("tvm-llvm", "seeded")):
        extra = [] if out == "seeded" else ["--weights", str(w)]
        assert main(["build", str(spec), "-o", str(tmp_path / out), "--target", target, *extra]) == 0
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = specc.load(SPEC, opt_level=0, weights=given()).double()(x.double())
        torch_out = _import_built(tmp_path / "t")(x)
    tvm_out, seeded = _import_built(tmp_path / "v")(x), _import_built(tmp_path / "seeded")(x)
    assert (torch_out.double() - want).abs().max() < 1e-5
    assert (tvm_out.double() - want).abs().max() < 1e-5
    assert (seeded.double() - want).abs().max() > 1e-2  # the seeded build differs: the file was used

    # a TVM build's weights.safetensors records its opt level too: -O1's (folded) is refused
    code = main(["build", str(spec), "-o", str(tmp_path / "from_tvm"), "--weights", str(tmp_path / "v" / "weights.safetensors"),
                 "--no-color"])
    assert code == 2 and "holds the weights of an -O1 build" in capsys.readouterr().err

    bad = tmp_path / "bad.safetensors"
    save_file({"y.wieght": torch.zeros(5, 4)}, str(bad))
    code = main(["build", str(spec), "-o", str(tmp_path / "bad_out"), "--target", "tvm-llvm", "--weights", str(bad),
                 "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{bad}: error: weights: 'y.wieght' is not a parameter of small" in err
    assert not (tmp_path / "bad_out").exists()


def test_an_optimised_builds_weights_are_refused_with_the_reason(tmp_path, capsys):
    """weights.safetensors records the build's opt level: an -O1 build's file (batch norm folded into the
    convolution: other names) given to --weights is an error that says why and what to give; an -O0
    build's file is taken as it is."""
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    for level in ("0", "1"):
        assert main(["build", str(spec), "-o", str(tmp_path / f"O{level}"), "-O", level]) == 0
    capsys.readouterr()
    code = main(["build", str(spec), "-o", str(tmp_path / "again"), "--weights", str(tmp_path / "O1" / "weights.safetensors"),
                 "--no-color"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    # refused even though every name of this file is also a parameter of the spec (the folded
    # convolution keeps the name c.weight): its values are not the spec's
    assert set(load_file(str(tmp_path / "O1" / "weights.safetensors"))) < set(given()) | {"c.weight", "c.bias", "y.bias"}
    assert "error: weights: " in err and "holds the weights of an -O1 build" in err
    assert "an -O0 build's weights.safetensors" in err
    assert not (tmp_path / "again").exists()
    assert main(["build", str(spec), "-o", str(tmp_path / "again"), "-O", "0",
                 "--weights", str(tmp_path / "O0" / "weights.safetensors")]) == 0
    assert load_file(str(tmp_path / "again" / "weights.safetensors")).keys() == \
        load_file(str(tmp_path / "O0" / "weights.safetensors")).keys()
