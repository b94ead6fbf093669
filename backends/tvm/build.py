"""The TVM target: the IR lowered to Relax (lowering.py), compiled with `tvm.compile` for CPU (llvm)
or CUDA, and run on torch tensors through DLPack.

    from specc.backends.tvm.build import compile_graph, export
    model = compile_graph(graph, target="llvm", weights=weights)   # a Runner: model(x) -> torch tensor
    export(graph, weights, "out/", target="llvm")                   # model.so + weights + loader.py

One compiled library serves every value of the symbolic dimensions (batch, length): they are
symbolic shape variables of the Relax function.

Pipeline: optional LiftTransformParams (weight transposes and bias sums run once, at bind time),
LegalizeOps, FoldConstant, FuseOps/FuseTIR, then for GPU targets the dlight default schedules
(Matmul, GEMV, Reduction, GeneralReduction, Fallback); CPU kernels are left untuned (or, with
cpu_schedule=True, the dlight CPU rules GEMV/Reduction), then the standard VM lowering passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import tvm
from tvm import relax
from tvm.target import Target

from specc.compiler.dims import Sym
from specc.compiler.ir import DTYPES, Graph

from .lowering import Signature, to_relax
from .runtime import MANIFEST, Runner

FUNC = "main"


# ---------------------------------------------------------------------------------------------
# targets and the pipeline
# ---------------------------------------------------------------------------------------------

def make_target(target: str | Mapping[str, Any] | Target = "llvm") -> Target:
    """A Target from "llvm", "cuda", a config dict ({"kind": "cuda", "arch": "sm_90"}) or a Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target == "cuda":
            return Target({"kind": "cuda", "arch": "sm_90"})
        return Target({"kind": target})
    config = dict(target)
    if config.get("kind") == "llvm" and config.get("mcpu") == "native":
        # TVM would silently fall back to a generic CPU for "native": name the host's CPU instead.
        from tvm.target import codegen

        config["mcpu"] = codegen.llvm_get_system_cpu()
    return Target(config)


def is_gpu(target: Target) -> bool:
    return "gpu" in target.keys


def pipeline(target: Target, lift: bool = True, cpu_schedule: bool = False) -> tvm.transform.Pass:
    """The Relax pipeline: legalise, fuse, schedule (GPU: dlight), lower to the VM."""
    from tvm.s_tir import dlight

    T = relax.transform
    passes = [T.LiftTransformParams()] if lift else []
    passes += [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        T.LegalizeOps(),
        T.AnnotateTIROpPattern(),
        T.FoldConstant(),
        T.FuseOps(),
        T.FuseTIR(),
    ]
    if is_gpu(target):
        passes.append(dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                                  dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()))
    elif cpu_schedule:
        passes.append(dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()))
    passes += [
        T.RewriteDataflowReshape(),
        T.ToNonDataflow(),
        T.RemovePurityChecking(),
        T.CallTIRRewrite(),
        T.StaticPlanBlockMemory(),
    ]
    if is_gpu(target):
        passes.append(T.RewriteCUDAGraph())
    passes += [
        T.LowerAllocTensor(),
        T.KillAfterLastUse(),
        T.LowerRuntimeBuiltin(),
        T.ComputePrimValue(),
        T.VMShapeLower(),
        T.AttachGlobalSymbol(),
    ]
    return tvm.transform.Sequential(passes, name="specc_tvm")


# ---------------------------------------------------------------------------------------------
# compile and run
# ---------------------------------------------------------------------------------------------

def _dim_json(d: Any) -> Any:
    if isinstance(d, Sym):
        if len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
            return d.terms[0][0][0]
        return [[c, list(m)] for m, c in d.terms]
    return d


def manifest(graph: Graph, sig: Signature, target: Target, lift: bool) -> dict[str, Any]:
    """What a runner needs to call the compiled function: inputs, weights and outputs, in order."""
    return {
        "name": graph.name,
        "function": FUNC,
        "target": json.loads(str(target)),
        "target_kind": target.kind.name,
        "lifted": lift,
        "inputs": [{"name": n, "dtype": DTYPES[t.dtype], "shape": [_dim_json(d) for d in t.shape],
                    "value_range": list(t.value_range) if t.value_range else None} for n, t in sig.inputs],
        "params": [{"name": n, "dtype": DTYPES[p.dtype], "shape": list(p.shape)} for n, p in sig.params],
        "outputs": [{"name": n, "dtype": DTYPES[t.dtype], "shape": [_dim_json(d) for d in t.shape]}
                    for n, t in sig.outputs],
        "dims": {s: {"example": ex, "min": lo, "max": hi} for s, (ex, lo, hi) in graph.dims.items()},
        "versions": {"tvm": tvm.__version__},
    }


def build_module(graph: Graph, target: str | Mapping[str, Any] | Target = "llvm", *, lift: bool = True,
                 cpu_schedule: bool = False) -> tuple[Any, dict[str, Any]]:
    """(executable, manifest) for `graph`: the Relax module compiled for `target`."""
    tgt = make_target(target)
    mod, sig = to_relax(graph, tgt.kind.name, FUNC)
    ex = tvm.compile(mod, tgt, relax_pipeline=pipeline(tgt, lift=lift, cpu_schedule=cpu_schedule))
    return ex, manifest(graph, sig, tgt, lift)


def compile_graph(graph: Graph, target: str | Mapping[str, Any] | Target = "llvm",
                  weights: Mapping[str, Any] | None = None, *, device: Any | None = None, lift: bool = True,
                  cpu_schedule: bool = False) -> Runner:
    """The graph compiled for `target`, as a Runner (call it on torch tensors, get torch tensors back).

    `weights` (name -> tensor, as `init_weights` or weights.safetensors give them; for a graph
    optimised by passes, `materialise(graph, base)`) are bound when given; else call `.bind()`.
    """
    ex, man = build_module(graph, target, lift=lift, cpu_schedule=cpu_schedule)
    runner = Runner(ex, man, device)
    if weights is not None:
        runner.bind(weights)
    return runner


def device_source(graph: Graph, target: str | Mapping[str, Any] | Target = "cuda") -> str:
    """The generated kernel source of `graph` for a GPU target (CUDA C for cuda), after the pipeline.

    Needs no GPU: TIR -> CUDA codegen runs anywhere. (Turning the source into a loadable binary is
    tvm.compile's job on a machine with the CUDA driver; `nvcc_compile` checks the source compiles.)
    """
    tgt = make_target(target)
    mod, _ = to_relax(graph, tgt.kind.name, FUNC)
    with tgt:
        mod = pipeline(tgt)(mod)
    prims = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    lib = tvm.tirx.build(tvm.IRModule(prims), target=tgt)
    return "\n".join(m.inspect_source() for m in lib.imports)


def nvcc_compile(source: str, target: str | Mapping[str, Any] | Target = "cuda", fmt: str = "fatbin") -> bytes:
    """Compile CUDA source with nvcc for the target's arch (e.g. sm_90); the binary's bytes."""
    from tvm.support import nvcc

    with make_target(target):
        return bytes(nvcc.compile_cuda(source, target_format=fmt, compiler="nvcc"))


def run(model: Runner, *inputs: Any) -> Any:
    """Run a compiled model on torch tensors: torch tensors out (one, or a tuple in output order)."""
    return model(*inputs)


def export(graph: Graph, weights: Mapping[str, Any], out_dir: str | Path,
           target: str | Mapping[str, Any] | Target = "llvm", *, lift: bool = True) -> Path:
    """Write model.so (export_library), weights.safetensors, tvm_manifest.json and loader.py into out_dir.

    `loader.load(out_dir)` gives a Runner with the weights bound; it needs tvm and numpy only.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex, man = build_module(graph, target, lift=lift)
    man["library"] = "model.so"
    man["weights"] = "weights.safetensors"
    ex.export_library(str(out / "model.so"))
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(weights.items())}, str(out / "weights.safetensors"))
    (out / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("runtime.py"), out / "loader.py")
    return out


__all__ = ["compile_graph", "run", "export", "build_module", "make_target", "pipeline", "Runner"]
