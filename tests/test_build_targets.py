"""`specc build --target tvm-llvm|tvm-cuda`: the same Model/load/example_inputs interface as the torch
target."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from specc.backends.pytorch.build import import_model_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def specc(*args):
    return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True, timeout=600)


def test_tvm_llvm_build_has_the_torch_interface_and_equal_outputs(tmp_path):
    r = specc("build", str(TINY), "-o", str(tmp_path / "tvm"), "--target", "tvm-llvm", "--run")
    assert r.returncode == 0, r.stderr
    assert "ran " in r.stdout
    assert {p.name for p in (tmp_path / "tvm").iterdir()} >= {"model_lib.so", "model.py", "loader.py",
                                                               "weights.safetensors", "manifest.json"}
    # the usage model.py's docstring shows, in a fresh interpreter: `import model` finds model.py
    use = ("import sys; sys.path.insert(0, sys.argv[1]); import model; "
           "print(tuple(model.load()(*model.example_inputs()).shape), model.TARGET)")
    r = subprocess.run([sys.executable, "-c", use, str(tmp_path / "tvm")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(2,", "8,", "8)", "tvm-llvm"], r.stdout
    r = specc("build", str(TINY), "-o", str(tmp_path / "torch"))
    assert r.returncode == 0, r.stderr
    tvm_mod, torch_mod = import_model_module(tmp_path / "tvm"), import_model_module(tmp_path / "torch")
    for b, t in ((1, 3), (4, 7)):  # one library, any size of the symbolic dimensions
        inputs = torch_mod.example_inputs(seed=b, B=b, T=t)
        with torch.no_grad():
            want = torch_mod.load().double()(*(i.double() for i in inputs))
        got = tvm_mod.load()(*inputs)
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() < 1e-4  # float32 kernels against the float64 torch run


# An op a target cannot lower (a custom operator: every registered op has a TVM lowering) is a located
# error: tests/test_tvm_errors.py, with the other error paths of the TVM targets.


def test_tvm_cuda_build_says_it_cannot_run_here(tmp_path):
    r = specc("build", str(TINY), "-o", str(tmp_path / "cuda"), "--target", "tvm-cuda", "--run")
    assert r.returncode == 0, r.stderr
    assert "not run: the library holds CUDA kernels" in r.stdout
    module = import_model_module(tmp_path / "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
            module.load()
