"""The GPU check's staging (tools/gpu_check.sh, tools/gpu_stage.py, tools/gpu_runner.py), here, without a GPU.

* Staging a model for CUDA sm_90 writes the library, the fatbin nvcc built from its CUDA source,
  the torch reference and the runtime without the 260 MB compiler library, under 64 MiB, and the
  runner script compiles.
* With a stand-in libcuda.so.1 (every driver function the CUDA runtime plugin links, each
  returning an error), the staged runner's loader loads the CUDA library here: TVM calls the
  compile callback with the very source whose fatbin was staged, and the compiler library is
  never loaded. (Running the kernels needs the GPU: tools/gpu_check.sh run.)
* The same loader on an llvm build runs the model on the CPU and matches the float64 reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

REPO = Path(__file__).resolve().parents[1]


def _stage_module():
    spec = importlib.util.spec_from_file_location("specc_gpu_stage", REPO / "tools" / "gpu_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cuda_stage(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the CUDA kernels cannot be compiled to a fatbin here")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    out = tmp_path_factory.mktemp("gpu") / "stage"
    info = _stage_module().stage(out, "cuda", ["tiny"], [1, 2])
    return out, info


def test_cuda_stage_is_small_and_complete(cuda_stage):
    out, info = cuda_stage
    assert info["bytes"] == _size(out) < 64 * 2**20
    d = out / "models" / "tiny"
    man = json.loads((d / "tvm_manifest.json").read_text())
    assert man["target_kind"] == "cuda" and man["fatbins"]
    for sha in man["fatbins"]:
        assert (d / "kernels" / f"{sha}.fatbin").stat().st_size > 0
    assert {p.name for p in d.iterdir()} >= {"model.so", "torch_model.py", "weights.safetensors", "cases.pt",
                                              "tvm_manifest.json", "kernels"}
    runtime = {p.name for p in (out / "runtime").iterdir()}
    assert {"libtvm_runtime.so", "libtvm_runtime_cuda.so", "tvm_ffi"} <= runtime
    assert not list(out.rglob("libtvm_compiler*"))
    py_compile.compile(str(out / "runner.py"), doraise=True)
    assert json.loads((out / "stage.json").read_text())["models"] == ["tiny"]


LOAD_WITH_STUB_DRIVER = r"""
import ctypes, hashlib, json, sys
from pathlib import Path
ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)  # the stand-in libcuda.so.1
stage = Path(sys.argv[1])
sys.path.insert(0, str(stage))
import runner
ffi = runner.load_runtime("cuda")
seen = []
@ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def compile_callback(code, *_):
    sha = hashlib.sha256(code.encode()).hexdigest()
    seen.append(sha)
    return (stage / "models/tiny/kernels" / f"{sha}.fatbin").read_bytes()
lib = ffi.load_module(str(stage / "models/tiny/model.so"))
vm = lib["vm_load_executable"]()
man = json.loads((stage / "models/tiny/tvm_manifest.json").read_text())
print(json.dumps({"seen": seen, "staged": man["fatbins"], "tvm_imported": "tvm" in sys.modules,
                  "compiler": runner.compiler_library_loaded()}))
"""


def test_cuda_library_loads_through_the_runtime_alone(cuda_stage, tmp_path):
    out, _ = cuda_stage
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler for the stand-in libcuda.so.1")
    cc = shutil.which("gcc") or shutil.which("cc")
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(out / "runtime" / "libtvm_runtime_cuda.so")],
                             capture_output=True, text=True, check=True).stdout.split()
    cu = sorted({s.split("@")[0] for s in symbols if s.startswith("cu") and not s.startswith("cuda")})
    src = tmp_path / "stub.c"
    src.write_text("".join(f"int {s}(void) {{ return 999; }}\n" for s in cu))
    stub = tmp_path / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(stub), str(src), "-Wl,-soname,libcuda.so.1"], check=True)
    r = subprocess.run([sys.executable, "-c", LOAD_WITH_STUB_DRIVER, str(out), str(stub)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["seen"] and set(result["seen"]) <= set(result["staged"])
    assert not result["tvm_imported"] and not result["compiler"]


def test_runner_on_cpu_matches_the_reference(tmp_path):
    out = tmp_path / "stage"
    _stage_module().stage(out, "llvm", ["tiny"], [1, 3])
    r = subprocess.run([sys.executable, str(out / "runner.py"), "--device", "cpu", "--iters", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiler library loaded: no; all within tolerance" in r.stdout
    assert "tiny" in r.stdout and "B3" in r.stdout
