"""The GPU check's staging (tools/gpu_check.sh, tools/gpu_stage.py, tools/gpu_runner.py), here, without a GPU.

* Staging a model for CUDA sm_90 writes the library, the fatbin nvcc built from its CUDA source,
  the torch reference and the runtime without the 260 MB compiler library, under 64 MiB, and the
  runner script compiles.
* With a stand-in libcuda.so.1 (every driver function the CUDA runtime plugin links, each
  returning an error), the staged runner's loader loads the CUDA library here: TVM calls the
  compile callback with the very source whose fatbin was staged, and the compiler library is
  never loaded. (Running the kernels needs the GPU: tools/gpu_check.sh run.)
* The same loader on an llvm build runs the model on the CPU and matches the float64 reference,
  for models with several inputs, several outputs and an integer output too; an integer output
  off by one, a float output off by more than the tolerance, or a model that could not be staged
  fails the run.
* The staged model list is the zoo: every spec in specs/ (and gpt_d256).
"""

from __future__ import annotations

import importlib.util
import json
import lzma
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


def _runner_module():
    spec = importlib.util.spec_from_file_location("specc_gpu_runner", REPO / "tools" / "gpu_runner.py")
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
        fatbin = lzma.decompress((d / "kernels" / f"{sha}.fatbin.xz").read_bytes())
        assert fatbin[:4] == bytes.fromhex("50ed55ba")  # a fatbin's magic number
    assert man["library"] == "model.so.xz"
    assert {p.name for p in d.iterdir()} == {"model.so.xz", "torch_model.py", "weights.safetensors", "cases.pt",
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
    return runner.read_fatbin(stage / "models/tiny", sha)
man = json.loads((stage / "models/tiny/tvm_manifest.json").read_text())
lib = ffi.load_module(str(runner.unpacked_library(stage / "models/tiny", man)))
vm = lib["vm_load_executable"]()
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


def test_the_model_list_is_the_zoo():
    """The zoo, gpt at the issue's size, and the model of the operators no zoo spec uses."""
    stage = _stage_module()
    specs = sorted(p.stem for p in (REPO / "specs").glob("*.yaml"))
    assert len(specs) >= 19
    assert stage.ZOO == [*specs, "gpt_d256", "gpu_ops"]
    for name in stage.ZOO:
        spec, _, fixed = stage.MODELS[name]
        assert (REPO / spec).is_file(), name
        assert set(fixed) <= {"B", "T"}
    assert stage.MODELS["gpt"][2] == {"T": 64} and stage.MODELS["gpt_d256"][1]["d_model"] == 256


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(out / "runner.py"), "--device", "cpu", "--iters", "2", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def llvm_stage(tmp_path_factory):
    """set_prompting (two int64 inputs; outputs f32 logits and i64 positions) and dann (a scalar input,
    two float outputs) built for llvm, plus a model whose spec is missing (it cannot be staged)."""
    stage = _stage_module()
    stage.MODELS["missing_spec"] = ("specs/no_such_spec.yaml", {}, {})
    lines: list[str] = []
    out = tmp_path_factory.mktemp("gpu") / "stage"
    info = stage.stage(out, "llvm", ["set_prompting", "dann", "missing_spec"], [1, 4], log=lines.append)
    return out, info, "\n".join(lines)


def test_a_model_that_cannot_be_staged_is_reported_and_the_others_are_staged(llvm_stage):
    out, info, log = llvm_stage
    assert info["models"] == ["set_prompting", "dann"]
    assert list(info["failed"]) == ["missing_spec"] and "no_such_spec.yaml" in info["failed"]["missing_spec"]
    assert "missing_spec" in log and "NOT STAGED for llvm" in log
    assert not (out / "models" / "missing_spec").exists()
    assert json.loads((out / "stage.json").read_text())["failed"] == info["failed"]
    r = _run(out)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "missing_spec         NOT STAGED for llvm" in r.stdout
    assert "1 failure(s)" in r.stdout


def test_runner_compares_every_output_of_multi_input_models(llvm_stage):
    out, _, _ = llvm_stage
    man = json.loads((out / "models" / "set_prompting" / "tvm_manifest.json").read_text())
    assert [i["dtype"] for i in man["inputs"]] == ["int64", "int64"]
    assert [(o["name"], o["dtype"]) for o in man["outputs"]] == [("logits", "float32"), ("positions", "int64")]
    r = _run(out, "--models", "set_prompting,dann")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiler library loaded: no; all within tolerance" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("set_prompting ", "dann "))]
    assert [row[:2] for row in rows] == [["set_prompting", "B1"], ["set_prompting", "B4"], ["dann", "B1"],
                                         ["dann", "B4"]]
    for row in rows:
        assert float(row[3]) < 1e-5 and row[4] in ("logits", "positions", "domain")


def test_runner_fails_an_integer_output_off_by_one_and_a_float_one_off_by_more_than_the_tolerance(llvm_stage):
    import torch

    out, _, _ = llvm_stage
    path = out / "models" / "set_prompting" / "cases.pt"
    cases = torch.load(path)
    try:
        bad = {k: {**v, "expected": list(v["expected"])} for k, v in cases.items()}
        bad["B1"]["expected"][1] = bad["B1"]["expected"][1].clone()
        bad["B1"]["expected"][1][0, 0] += 1  # positions: one element off by one
        logits = bad["B4"]["expected"][0]
        bad["B4"]["expected"][0] = logits + 1e-2 * (1 + logits.abs().max())  # 100 times the tolerance
        torch.save(bad, path)
        r = _run(out, "--models", "set_prompting")
    finally:
        torch.save(cases, path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("set_prompting ")}
    assert "ERROR ABOVE TOLERANCE" in rows["B1"] and "positions" in rows["B1"]
    assert float(rows["B1"].split()[3]) == 1.0
    assert "ERROR ABOVE TOLERANCE" in rows["B4"] and "logits" in rows["B4"]
    assert "2 failure(s)" in r.stdout


def test_compare_checks_count_shape_dtype_and_special_values():
    import torch

    compare = _runner_module().compare
    f, i = torch.tensor([1.0, float("-inf"), float("nan")]), torch.tensor([3, 4])
    assert compare((f, i), (f.double(), i), ["y", "k"], ["float32", "int64"]) == (0.0, "y", True)
    err, worst, ok = compare((f + 1e-3, i), (f.double(), i), ["y", "k"], ["float32", "int64"])
    assert not ok and worst == "y" and err == pytest.approx(1e-3, rel=1e-3)
    assert compare((f, i + 1), (f.double(), i), ["y", "k"], ["float32", "int64"])[1:] == ("k", False)
    nan_for_value = torch.tensor([1.0, float("-inf"), 0.0])
    assert compare((f,), (nan_for_value.double(),), ["y"], ["float32"])[0] == float("inf")
    b = torch.tensor([True, False])
    assert compare((b,), (b,), ["m"], ["bool"])[2] and not compare((~b,), (b,), ["m"], ["bool"])[2]
    with pytest.raises(ValueError, match="1 output"):
        compare((f,), (f, i), ["y", "k"], ["float32", "int64"])
    with pytest.raises(ValueError, match="shape"):
        compare((i[:1],), (i,), ["k"], ["int64"])
    with pytest.raises(ValueError, match="dtype"):
        compare((i.int(),), (i,), ["k"], ["int64"])
