#!/usr/bin/env python3
"""Stage the zoo's TVM builds, and only what running them needs, into one folder for a GPU machine.

    python tools/gpu_stage.py [--out build/gpu_check] [--target cuda|llvm] [--models gpt,...] [-B 1 -B 8]

(tools/gpu_check.sh wraps this; its header says how to run the result.) Per model, models/NAME/:
model.so (the TVM library, exported), kernels/SHA256.fatbin (nvcc's fatbin of each CUDA source
module in it, for the runner's compile callback), tvm_manifest.json, torch_model.py and
weights.safetensors (the PyTorch backend's build of the same graph, at -O0, same weights), and
cases.pt (inputs at each batch size and the float64 reference outputs, computed here on the CPU).
runtime/ holds libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13 and the tvm_ffi
package (Python files, its extension and libtvm_ffi.so; no headers or sources) plus
typing_extensions; runner.py is tools/gpu_runner.py. The folder must stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64

#: name -> (spec, overrides, fixed dims)
MODELS = {
    "gpt": ("specs/gpt.yaml", {}, {"T": 64}),
    "gpt_d256": ("specs/gpt.yaml", {"d_model": 256, "layers": 4, "block_size": 128}, {"T": 128}),
    "itransformer": ("specs/itransformer.yaml", {}, {}),
    "lstm_classifier": ("specs/lstm_classifier.yaml", {}, {}),
    "repvgg": ("specs/repvgg.yaml", {}, {}),
    "lora_gpt": ("specs/lora_gpt.yaml", {}, {"T": 64}),
    "glyph_embedding": ("specs/glyph_embedding.yaml", {}, {}),
    "tiny": ("tests/data/tiny.yaml", {}, {"T": 8}),
}
ZOO = ["gpt", "gpt_d256", "itransformer", "lstm_classifier", "repvgg", "lora_gpt", "glyph_embedding"]
TARGETS = {"cuda": {"kind": "cuda", "arch": "sm_90"}, "llvm": {"kind": "llvm"}}


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_runtime(out: Path, target: str) -> None:
    """The TVM runtime without its compiler: libtvm_runtime (+ CUDA), tvm_ffi, typing_extensions."""
    import tvm
    import tvm_ffi
    import typing_extensions

    rt = out / "runtime"
    rt.mkdir(parents=True, exist_ok=True)
    tvm_lib = Path(tvm.__file__).resolve().parent / "lib"
    libs = ["libtvm_runtime.so"]
    if target == "cuda":
        libs.append("libtvm_runtime_cuda.so")
    for name in libs:
        shutil.copy2(tvm_lib / name, rt / name)
    if target == "cuda":
        for cand in (Path("/usr/local/cuda/lib64/libcudart.so.13"), Path("/usr/local/cuda-13.0/lib/libcudart.so.13")):
            if cand.exists():
                shutil.copy2(cand, rt / "libcudart.so.13")
                break
    src = Path(tvm_ffi.__file__).resolve().parent
    skip = {"include", "3rdparty", "src", "cmake", "__pycache__", "stub"}

    def ignore(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        out_names = [n for n in names if n in skip or n.endswith((".pyx", ".pxd", ".pxi", ".pyi", ".h", ".cc"))]
        if here == src:
            out_names += [n for n in names if n in ("CMakeLists.txt",)]
        return out_names

    shutil.copytree(src, rt / "tvm_ffi", ignore=ignore, dirs_exist_ok=True)
    shutil.copy2(typing_extensions.__file__, rt / "typing_extensions.py")


def stage_model(out: Path, name: str, target: str, batches: list[int]) -> dict:
    import torch

    import specc
    from specc.api import read_source
    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import build_module, nvcc_compile
    from specc.compiler.passes import PassContext

    spec, overrides, fixed = MODELS[name]
    path = REPO / spec
    text, file = read_source(path)
    graph = specc.compile(path, **overrides)
    weights = init_weights(graph)
    d = out / "models" / name
    (d / "kernels").mkdir(parents=True, exist_ok=True)

    # the torch reference: the PyTorch backend's build of the same graph (no passes) and weights
    files = artifacts(graph, text, file, weights=weights, ctx=PassContext(opt_level=0))
    (d / "torch_model.py").write_bytes(files["model.py"])
    (d / "weights.safetensors").write_bytes(files["weights.safetensors"])
    model = load_in_memory(files)
    ref = model.double().eval()
    cases = {}
    for b in batches:
        inputs = model.example_inputs(seed=b, **({"B": b} | fixed))
        with torch.no_grad():
            want = ref(*[x.double() if x.is_floating_point() else x for x in inputs])
        want = want if isinstance(want, tuple) else (want,)
        cases[f"B{b}"] = {"inputs": [x.float() if x.is_floating_point() else x for x in inputs],
                          "expected": [w.detach() for w in want]}
    torch.save(cases, d / "cases.pt")

    # the TVM library; for CUDA, each kernel module's source compiled to a fatbin here
    ex, man = build_module(graph, TARGETS[target])
    fatbins = []
    if target == "cuda":
        for src in _cuda_sources(ex.mod):
            sha = hashlib.sha256(src.encode()).hexdigest()
            (d / "kernels" / f"{sha}.fatbin").write_bytes(nvcc_compile(src, TARGETS[target], "fatbin"))
            fatbins.append(sha)
    man["library"] = "model.so"
    man["fatbins"] = fatbins
    ex.export_library(str(d / "model.so"))
    (d / "tvm_manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return {"name": name, "spec": spec, "overrides": overrides, "batches": batches, "bytes": _tree_size(d)}


def _cuda_sources(mod) -> list[str]:
    out = []

    def walk(m):
        if m.kind == "cuda":
            out.append(m.inspect_source("cuda"))
        for im in m.imports:
            walk(im)

    walk(mod)
    return out


def stage(out: Path, target: str = "cuda", models: list[str] | None = None, batches: list[int] | None = None,
          limit_mib: float = LIMIT_MIB) -> dict:
    import tvm
    import tvm_ffi

    models = models or ZOO
    batches = batches or [1, 8]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stage_runtime(out, target)
    staged = [stage_model(out, m, target, batches) for m in models]
    shutil.copy2(REPO / "tools" / "gpu_runner.py", out / "runner.py")
    info = {"target": json.dumps(TARGETS[target]) if target == "cuda" else "llvm", "models": models,
            "python": platform.python_version(), "tvm": tvm.__version__,
            "tvm_ffi": getattr(tvm_ffi, "__version__", "?"), "staged": staged}
    info["target"] = "cuda sm_90" if target == "cuda" else "llvm"
    (out / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
    size = _tree_size(out)
    info["bytes"] = size
    if size > limit_mib * 2**20:
        raise SystemExit(f"staged {size / 2**20:.1f} MiB in {out}: over the {limit_mib} MiB a GPU machine takes")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "build" / "gpu_check"))
    ap.add_argument("--target", choices=("cuda", "llvm"), default="cuda")
    ap.add_argument("--models", default=",".join(ZOO), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("-B", type=int, action="append", help="batch sizes (default 1 and 8)")
    args = ap.parse_args(argv)
    if args.target == "cuda":
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    info = stage(Path(args.out), args.target, args.models.split(","), args.B)
    for m in info["staged"]:
        print(f"  {m['name']:16s} {m['bytes'] / 2**20:6.2f} MiB")
    print(f"staged {len(info['staged'])} model(s) for {info['target']} in {args.out}: "
          f"{info['bytes'] / 2**20:.1f} MiB in all (limit {LIMIT_MIB} MiB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
