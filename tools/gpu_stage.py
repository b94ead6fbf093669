#!/usr/bin/env python3
"""Stage the zoo's TVM builds, and only what running them needs, into one folder for a GPU machine.

    python tools/gpu_stage.py [--out build/gpu_check] [--target cuda|llvm] [--models gpt,...] [-B 1 -B 8]

(tools/gpu_check.sh wraps this; its header says how to run the result.) The models: every spec in
specs/ (named by its stem), gpt_d256 and gpu_ops (tests/data/gpu_ops.yaml: operators no zoo spec
uses), or --models. Per model, models/NAME/: model.so.xz (the TVM
library, exported, xz-compressed: the runner unpacks it), kernels/SHA256.fatbin.xz (nvcc's fatbin
of each CUDA source module in it, for the runner's compile callback), tvm_manifest.json,
torch_model.py and weights.safetensors (the PyTorch backend's build of the same graph, at -O0, same
weights; the TVM build binds the same file), and cases.pt (inputs at each batch size with the
float64 reference outputs, all of them, computed here on the CPU). A model that cannot be staged
(its build for the target fails, or nvcc) is reported and left out; stage.json lists it under
"failed" with the reason, the runner reports it, and the exit status is 1.
runtime/ holds libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13 and the tvm_ffi
package (Python files, its extension and libtvm_ffi.so; no headers or sources) plus
typing_extensions; runner.py is tools/gpu_runner.py. The folder must stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import platform
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64

#: Zoo specs checked at other than their defaults: stem -> (overrides, fixed dims). The GPT family at
#: T=64 (its block_size), where attention is more than a few kernels' launch overhead.
ZOO_SIZES: dict[str, tuple[dict, dict]] = {
    "gpt": ({}, {"T": 64}),
    "lora_gpt": ({}, {"T": 64}),
    "peft_gpt": ({}, {"T": 64}),
}


def zoo_models() -> dict[str, tuple[str, dict, dict]]:
    """Every spec in specs/ (named by its file's stem) at its defaults unless ZOO_SIZES says otherwise:
    name -> (spec, overrides, fixed dims)."""
    return {p.stem: (f"specs/{p.name}", *ZOO_SIZES.get(p.stem, ({}, {})))
            for p in sorted((REPO / "specs").glob("*.yaml"))}


#: name -> (spec, overrides, fixed dims): the zoo, gpt at the issue's size, and a test model
MODELS = zoo_models() | {
    "gpt_d256": ("specs/gpt.yaml", {"d_model": 256, "layers": 4, "block_size": 128}, {"T": 128}),
    "tiny": ("tests/data/tiny.yaml", {}, {"T": 8}),
    "gpu_ops": ("tests/data/gpu_ops.yaml", {}, {"T": 8}),
}
ZOO = [*zoo_models(), "gpt_d256", "gpu_ops"]
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
    # the TVM library first: a model that cannot be built for the target stops here, before its cases
    ex, man = build_module(graph, TARGETS[target])
    cases = {}
    for b in batches:
        dims = {k: v for k, v in ({"B": b} | fixed).items() if k in graph.dims}
        inputs = model.example_inputs(seed=b, **dims)
        with torch.no_grad(), _default_dtype(torch.float64):  # float tensors made in forward too (one_hot(...).to)
            want = ref(*[x.double() if x.is_floating_point() else x for x in inputs])
        want = want if isinstance(want, tuple) else (want,)
        _check_outputs(name, man, want)
        cases[f"B{b}"] = {"dims": dims, "inputs": [x.float() if x.is_floating_point() else x for x in inputs],
                          "expected": [w.detach() for w in want]}
    torch.save(cases, d / "cases.pt")

    # for CUDA, each kernel module's source compiled to a fatbin here. Both travel xz-compressed: a
    # CUDA library holds its kernels' source (gelan's library is 11 MB; the zoo's 34 MB, 1.7 MB packed)
    fatbins = []
    if target == "cuda":
        for src in _cuda_sources(ex.mod):
            sha = hashlib.sha256(src.encode()).hexdigest()
            fatbin = nvcc_compile(src, TARGETS[target], "fatbin")
            (d / "kernels" / f"{sha}.fatbin.xz").write_bytes(lzma.compress(fatbin))
            fatbins.append(sha)
    man["library"] = "model.so.xz"
    man["fatbins"] = fatbins
    ex.export_library(str(d / "model.so"))
    (d / "model.so.xz").write_bytes(lzma.compress((d / "model.so").read_bytes()))
    (d / "model.so").unlink()
    (d / "tvm_manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return {"name": name, "spec": spec, "overrides": overrides, "batches": batches, "bytes": _tree_size(d)}


@contextmanager
def _default_dtype(dtype):
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _check_outputs(name: str, man: dict, want: tuple) -> None:
    """The torch reference returns what the TVM build does: as many outputs, of the same dtypes."""
    outs = man["outputs"]
    if len(want) != len(outs):
        raise RuntimeError(f"{name}: the torch build returns {len(want)} output(s), the TVM build "
                           f"{len(outs)} ({', '.join(o['name'] for o in outs)})")
    for o, w in zip(outs, want):
        # manifest dtypes are torch's names (float32, int64, bool); the reference runs in float64
        if w.is_floating_point() != o["dtype"].startswith(("float", "bfloat")) or (
                not w.is_floating_point() and str(w.dtype) != f"torch.{o['dtype']}"):
            raise RuntimeError(f"{name}: output {o['name']} is {o['dtype']} in the TVM build, {w.dtype} in torch's")


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
          limit_mib: float = LIMIT_MIB, log=print) -> dict:
    """Stage `models` (default: the zoo) built for `target` into `out` (replaced). A model that cannot be
    staged (its build for the target, nvcc or its reference fails) is reported, left out of the folder
    and listed under "failed" with the reason; the others are staged. Raises SystemExit for an unknown
    model or a folder over `limit_mib`."""
    import tvm
    import tvm_ffi

    models = models or ZOO
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)} (known: {', '.join(MODELS)})")
    batches = batches or [1, 8]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stage_runtime(out, target)
    staged, failed = [], {}
    for m in models:
        t0 = time.perf_counter()
        try:
            staged.append(stage_model(out, m, target, batches) | {"seconds": round(time.perf_counter() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - report it, stage the others
            shutil.rmtree(out / "models" / m, ignore_errors=True)
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            failed[m] = reason
            log(f"  {m:20s} NOT STAGED for {target}: {reason}\n" + "".join(
                "      " + line for line in traceback.format_exc().splitlines(keepends=True)[-12:]))
            continue
        log(f"  {m:20s} {staged[-1]['bytes'] / 2**20:6.2f} MiB  ({staged[-1]['seconds']:.0f} s)")
    shutil.copy2(REPO / "tools" / "gpu_runner.py", out / "runner.py")
    info = {"target": "cuda sm_90" if target == "cuda" else "llvm", "models": [m["name"] for m in staged],
            "failed": failed, "python": platform.python_version(), "tvm": tvm.__version__,
            "tvm_ffi": getattr(tvm_ffi, "__version__", "?"), "staged": staged}
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
    info = stage(Path(args.out), args.target, [m for m in args.models.split(",") if m], args.B,
                 log=lambda line: print(line, flush=True))
    print(f"staged {len(info['staged'])} model(s) for {info['target']} in {args.out}: "
          f"{info['bytes'] / 2**20:.1f} MiB in all (limit {LIMIT_MIB} MiB)")
    for m, reason in info["failed"].items():
        print(f"NOT STAGED: {m}: {reason}")
    return 1 if info["failed"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
