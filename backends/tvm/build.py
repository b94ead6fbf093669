"""The TVM target: the IR lowered to Relax (lowering.py), compiled with `tvm.compile` for CPU (llvm)
or CUDA, and run on torch tensors through DLPack.

    from specc.backends.tvm.build import compile_graph, export
    model = compile_graph(graph, target="llvm", weights=weights)   # a Runner: model(x) -> torch tensor
    export(graph, weights, "out/", target="llvm")                   # model_lib.so + weights + loader.py
    model = compile_graph(graph, weights=weights, tuning_db="db/")  # with MetaSchedule records (tuning.py)

One compiled library serves every value of the symbolic dimensions (batch, length): they are
symbolic shape variables of the Relax function. With a tuning database, static copies of the
function for the tuned sizes are compiled beside it and called for inputs of exactly those sizes.

Pipeline: optional LiftTransformParams (weight transposes and bias sums run once, at bind time);
on CPU, the row kernels (softmax, layer_norm, rms_norm: rowops.py) and fast vectorisable
exp/erf/tanh (schedules.CPUFastMath); LegalizeOps, FoldConstant, FuseOps/FuseTIR; the tuning
database's records (MetaScheduleApplyDatabase) when one is given; then the schedules: specc's CPU
rules (schedules.py: Matmul, RowReduction, Injective) on llvm, dlight's GPU rules (Matmul, GEMV,
Reduction, GeneralReduction, Fallback) on CUDA; then the standard VM lowering passes.

`schedule=` picks the CPU schedules: "specc" (default), "dlight" (dlight's CPU GEMV/Reduction
rules: what the first version offered), "none" (the legalised loops as they are).
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import tvm
from tvm import relax
from tvm.target import Target

from specc.compiler.dims import to_json as dim_json
from specc.compiler.ir import DTYPES, INT_DTYPES, Graph, Node

from .lowering import Signature, to_relax
from .runtime import MANIFEST, Runner, physical_cores

FUNC = "main"
SCHEDULES = ("specc", "dlight", "none")


# ---------------------------------------------------------------------------------------------
# targets and the pipeline
# ---------------------------------------------------------------------------------------------

def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "rocketlake"), the `mcpu` CPU targets get by default."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def make_target(target: str | Mapping[str, Any] | Target = "llvm") -> Target:
    """A Target from "llvm", "cuda", a config dict ({"kind": "cuda", "arch": "sm_90"}) or a Target.

    An llvm target names the host CPU (`mcpu`, as LLVM detects it; "native" would silently fall
    back to a generic x86-64 without AVX-512) and its physical core count (`num-cores`, which
    MetaSchedule needs) unless given. A library built so runs only on CPUs with the same features:
    for another machine, pass {"kind": "llvm", "mcpu": ...} for that machine's CPU.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target == "cuda":
            return Target({"kind": "cuda", "arch": "sm_90"})
        config: dict[str, Any] = {"kind": target}
    else:
        config = dict(target)
    if config.get("kind") == "llvm":
        if config.get("mcpu") in (None, "native"):
            config["mcpu"] = host_cpu()
        config.setdefault("num-cores", physical_cores())
    return Target(config)


def lower(graph: Graph, tgt: Target) -> tuple[tvm.IRModule, Signature]:
    """The graph's Relax module for `tgt` (CPU: hand-written kernels tiled for its vector width)."""
    from .schedules import vector_lanes

    return to_relax(graph, tgt.kind.name, FUNC, lanes=vector_lanes(tgt) if tgt.kind.name == "llvm" else 16)


def is_gpu(target: Target) -> bool:
    return "gpu" in target.keys


def pre_schedule_passes(target: Target, lift: bool = True, schedule: str = "specc",
                        shared: bool = False) -> list[tvm.transform.Pass]:
    """The passes up to fused, unscheduled TIR kernels (what tuning sees and the schedules take)."""
    T = relax.transform
    passes = [T.LiftTransformParams(shared_transform=True if shared else False)] if lift else []
    if not is_gpu(target) and schedule == "specc":
        from .rowops import CPURowKernels
        from .schedules import CPUFastMath, vector_lanes

        passes += [CPURowKernels(vector_lanes(target)), CPUFastMath()]
    passes += [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        T.LegalizeOps(),
        T.AnnotateTIROpPattern(),
        T.FoldConstant(),
        T.FuseOps(),
        T.FuseTIR(),
    ]
    return passes


def _current_database() -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.database.Database.current()


class _TunedKernels:
    """Two passes around MetaScheduleApplyDatabase that note which kernels took a database record."""

    def __init__(self) -> None:
        self.before: set[str] = set()
        self.names: list[str] = []

    @staticmethod
    def _scheduled(mod: tvm.IRModule) -> set[str]:
        return {gv.name_hint for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs}

    def passes(self, apply: tvm.transform.Pass) -> list[tvm.transform.Pass]:
        @tvm.transform.module_pass(opt_level=0, name="SpeccNoteScheduled")
        def note(mod, _ctx):
            self.before = self._scheduled(mod)
            return mod

        @tvm.transform.module_pass(opt_level=0, name="SpeccNoteTuned")
        def tuned(mod, _ctx):
            self.names = sorted(self._scheduled(mod) - self.before)
            return mod

        return [note, apply, tuned]


def pipeline(target: Target, lift: bool = True, cpu_schedule: bool = False, schedule: str = "specc",
             tuning_db: str | Path | None = None, shared: bool = False,
             tuned: _TunedKernels | None = None) -> tvm.transform.Pass:
    """The Relax pipeline: legalise, fuse, schedule (CPU: specc's rules; GPU: dlight), lower to the VM."""
    from tvm.s_tir import dlight

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    if cpu_schedule:
        schedule = "dlight"
    T = relax.transform
    passes = pre_schedule_passes(target, lift=lift, schedule=schedule, shared=shared)
    if tuning_db is not None:
        # the database is the current one (build_module enters it), else the JSON files in tuning_db
        apply = T.MetaScheduleApplyDatabase(None if _current_database() is not None else str(tuning_db))
        passes += tuned.passes(apply) if tuned is not None else [apply]
    if is_gpu(target):
        passes.append(dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                                  dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()))
    elif schedule == "dlight":
        passes.append(dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()))
    elif schedule == "specc":
        from .schedules import ApplyCPUSchedules

        passes.append(ApplyCPUSchedules(target))
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

#: Ops whose result holds every value of their first input and no other (moved, not computed): a range
#: an index needs of the result, that input needs too. Not slices: the values a slice leaves out may be
#: anything (the index read through a slice is clamped instead, `lowering._gather`).
_VALUE_KEEPING = frozenset({"reshape", "unsqueeze", "transpose", "permute", "expand", "flip", "detach",
                            "grad_reverse"})


def _table_size(graph: Graph, node: Node, slot: int) -> tuple[int, str] | None:
    """(n, what) when input `slot` of `node` indexes n rows or entries: embedding and one_hot ids, a
    gather's index along a dimension of static size."""
    name = f"{node.op} '{node.name or node.op}'"
    if node.op in ("embedding", "one_hot") and slot == 0:
        n = int(node.attr("num"))
        return n, f"{name} of {n} {'rows' if node.op == 'embedding' else 'classes'}"
    if node.op == "gather" and slot == 1:
        x = graph.type_of(node.inputs[0])
        n = x.shape[int(node.attr("dim")) % x.rank]
        if isinstance(n, int):
            return n, f"{name} along a dimension of size {n}"
    return None


def index_ranges(graph: Graph) -> dict[str, tuple[int, int, str]]:
    """For each integer input without a declared range that indexes a table (directly, or through ops
    that only move all its values: reshapes, transposes, flips, ...): (0, n, what) of the smallest table. The runner checks
    such an input as a declared range, so an id outside the table is an IndexError as in torch, not the
    nearest row (Relax's take clips) or a value read outside the tensor (gather_elements)."""
    ranges: dict[str, tuple[int, int, str]] = {}
    for name, nid in graph.inputs:
        t = graph.node(nid).type
        if t.dtype not in INT_DTYPES or t.value_range is not None:
            continue
        best: tuple[int, str] | None = None
        stack, seen = [nid], set()
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            for user in graph.users(cur):
                node = graph.node(user)
                for slot, ref in enumerate(node.inputs):
                    if ref.node != cur:
                        continue
                    table = _table_size(graph, node, slot)
                    if table is not None and (best is None or table[0] < best[0]):
                        best = table
                    elif table is None and node.op in _VALUE_KEEPING and slot == 0:
                        stack.append(user)
        if best is not None:
            ranges[name] = (0, *best)
    return ranges


def manifest(graph: Graph, sig: Signature, target: Target, lift: bool) -> dict[str, Any]:
    """What a runner needs to call the compiled function: inputs, weights and outputs, in order."""
    tables = index_ranges(graph)
    return {
        "name": graph.name,
        "function": FUNC,
        "target": json.loads(str(target)),
        "target_kind": target.kind.name,
        "lifted": lift,
        "inputs": [{"name": n, "dtype": DTYPES[t.dtype], "shape": [dim_json(d) for d in t.shape],
                    "value_range": list(t.value_range) if t.value_range else None,
                    **({"index_range": list(tables[n])} if n in tables else {})} for n, t in sig.inputs],
        "params": [{"name": n, "dtype": DTYPES[p.dtype], "shape": list(p.shape)} for n, p in sig.params],
        "outputs": [{"name": n, "dtype": DTYPES[t.dtype], "shape": [dim_json(d) for d in t.shape]}
                    for n, t in sig.outputs],
        "dims": {s: {"example": ex, "min": lo, "max": hi} for s, (ex, lo, hi) in graph.dims.items()},
        "versions": {"tvm": tvm.__version__},
    }


def build_module(graph: Graph, target: str | Mapping[str, Any] | Target = "llvm", *, lift: bool = True,
                 cpu_schedule: bool = False, schedule: str = "specc",
                 tuning_db: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """(executable, manifest) for `graph`: the Relax module compiled for `target`.

    With `tuning_db` (a folder `tuning.tune` wrote), the sizes this graph was tuned at get static
    copies of the function, whose kernels take the database's schedules.
    """
    tgt = make_target(target)
    mod, sig = lower(graph, tgt)
    specialised: list[dict[str, Any]] = []
    database: Any = nullcontext()
    if tuning_db is not None:
        from .tuning import check_database, fingerprint, open_database, specialise, spec_name, tuned_dims

        check_database(tuning_db)  # DatabaseError: missing, not a folder, unreadable or damaged
        key = fingerprint(graph)
        dims = tuned_dims(tuning_db, graph, tgt, key=key)
        if dims:
            from .lowering import input_shapes

            mod = specialise(mod, dims, FUNC, shapes=input_shapes(graph))
            specialised = [{"function": spec_name(d), "dims": d} for d in dims]
        database = open_database(tuning_db, graph, key=key)  # DatabaseError: a row MetaSchedule cannot read
    shared = bool(specialised)
    tuned = _TunedKernels()
    # the records serve only where the graph was tuned and the model ran faster with them (tuning.py's
    # model check): with no such size, none applies, not even to kernels of `main` that happen to be static
    records = tuning_db if specialised else None
    with tgt, database:
        ex = tvm.compile(mod, tgt, relax_pipeline=pipeline(tgt, lift=lift, cpu_schedule=cpu_schedule,
                                                           schedule=schedule, tuning_db=records, shared=shared,
                                                           tuned=tuned))
    man = manifest(graph, sig, tgt, lift)
    if specialised:
        man["specialised"] = specialised
        man["transform"] = "transform_params"
    if tuning_db is not None:
        man["tuned_kernels"] = tuned.names  # kernels whose schedule came from the database
    return ex, man


def compile_graph(graph: Graph, target: str | Mapping[str, Any] | Target = "llvm",
                  weights: Mapping[str, Any] | None = None, *, device: Any | None = None, lift: bool = True,
                  cpu_schedule: bool = False, schedule: str = "specc",
                  tuning_db: str | Path | None = None) -> Runner:
    """The graph compiled for `target`, as a Runner (call it on torch tensors, get torch tensors back).

    `weights` (name -> tensor, as `init_weights` or weights.safetensors give them; for a graph
    optimised by passes, `materialise(graph, base)`) are bound when given; else call `.bind()`.
    `tuning_db`: a folder written by `tuning.tune` (never tunes; uses the records it finds).
    """
    ex, man = build_module(graph, target, lift=lift, cpu_schedule=cpu_schedule, schedule=schedule,
                           tuning_db=tuning_db)
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
    mod, _ = lower(graph, tgt)
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


#: The exported library's file name. Not model.so: Python imports an extension module before a source
#: file of the same name, so `import model` beside a model.so would try to load the library.
LIBRARY = "model_lib.so"


def export(graph: Graph, weights: Mapping[str, Any], out_dir: str | Path,
           target: str | Mapping[str, Any] | Target = "llvm", *, lift: bool = True, schedule: str = "specc",
           tuning_db: str | Path | None = None, opt_level: int | None = None) -> Path:
    """Write LIBRARY (export_library), weights.safetensors, tvm_manifest.json and loader.py into out_dir.

    `loader.load(out_dir)` gives a Runner with the weights bound; it needs tvm and numpy only (the
    TVM runtime: see tools/gpu_check.sh for loading without the compiler library). `opt_level`: the
    specc opt level `graph` was optimised at, recorded in weights.safetensors as the torch target
    records it (`--weights` takes only an -O0 build's).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex, man = build_module(graph, target, lift=lift, schedule=schedule, tuning_db=tuning_db)
    man["library"] = LIBRARY
    man["weights"] = "weights.safetensors"
    ex.export_library(str(out / LIBRARY))
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(weights.items())}, str(out / "weights.safetensors"),
              metadata=None if opt_level is None else {"specc_opt_level": str(opt_level)})
    (out / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("runtime.py"), out / "loader.py")
    return out


__all__ = ["compile_graph", "run", "export", "LIBRARY", "build_module", "make_target", "pipeline", "pre_schedule_passes",
           "host_cpu", "Runner"]
