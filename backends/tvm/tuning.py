"""MetaSchedule tuning with a persistent database: tune a spec once, reuse the records in later builds.

    from specc.backends.tvm.tuning import tune
    report = tune(graph, "tuning_db/", trials=64, dims=[{"B": 1, "T": 128}])
    model = compile_graph(graph, weights=w, tuning_db="tuning_db/")  # reuses the records

MetaSchedule measures kernels, so it tunes static shapes: `dims` (default: the spec's example
values) fixes the symbolic dimensions, and each tuned set of values becomes a static-shape copy of
the model's function (`main__B1_T128`), compiled beside the symbolic `main`; the runner calls the
copy when the inputs have exactly those sizes and `main` otherwise (scheduled by specc's rules).

The database folder holds MetaSchedule's JSON database (database_workload.json,
database_tuning_record.json: one record per kernel, keyed by the kernel's structure, which names
its ops and shapes) and specc's index, specc_tuning.json: which graphs (by fingerprint) were tuned
at which sizes, for which target, and each kernel's name, shapes and trial count. Kernels already
in the database are never tuned again: tuning a second spec that shares kernels (same op, same
shapes) with the first costs only the new ones, and `compile_graph(..., tuning_db=...)` never tunes.

The hand-written kernels (LSTM recurrence, attention) and the row kernels (softmax, norms) are not tuned.

A kernel that wins alone can lose inside the model (its inputs and weights are not in cache there as
they were when it was measured alone; gpt at batch 8 ran 0.97x of torch eager tuned against 0.78x with
specc's schedules alone). So after tuning, `tune` times the whole model both ways at each size tuned
(interleaved rounds, `check_model`), and the index marks a size where the records made the model
slower: later builds leave that size to the symbolic function and specc's schedules. A build with a
database is thus never slower than the default build at the sizes tuned, up to timing noise.
"""

from __future__ import annotations

import hashlib
import json
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import tvm
from tvm import relax, tirx
from tvm.target import Target

from specc.compiler.dims import evaluate
from specc.compiler.ir import DTYPES, Graph

INDEX = "specc_tuning.json"
_IS_SCHEDULED = "tirx.is_scheduled"


def fingerprint(graph: Graph) -> str:
    """A stable hash of the graph as lowered to Relax (same spec and overrides: same fingerprint): its
    Relax function only, which names the hand-written TIR kernels it calls but leaves out their bodies,
    so that a change inside a kernel (not tuned; its tuned neighbours keep their records) does not
    orphan a database."""
    from .lowering import to_relax

    mod, _ = to_relax(graph, "llvm", "main")
    return hashlib.sha256(mod["main"].script().encode()).hexdigest()[:16]


def spec_name(dims: Mapping[str, int]) -> str:
    """The name of the static copy of `main` for these sizes, e.g. main__B1_T128."""
    return "main__" + "_".join(f"{k}{int(v)}" for k, v in sorted(dims.items()))


def _dims_list(graph: Graph, dims: Mapping[str, int] | Iterable[Mapping[str, int]] | None) -> list[dict[str, int]]:
    from .lowering import _symbols

    syms = set(_symbols(graph))
    if dims is None:
        dims = [{s: graph.dims[s][0] for s in syms if s in graph.dims and graph.dims[s][0] is not None}]
    elif isinstance(dims, Mapping):
        dims = [dims]
    out = []
    for d in dims:
        d = {k: int(v) for k, v in d.items() if k in syms}
        missing = syms - set(d)
        if missing:
            raise ValueError(f"tuning needs a size for every symbolic dimension; missing {sorted(missing)}")
        for s, v in d.items():
            lo, hi = graph.dims[s][1:] if s in graph.dims else (None, None)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"{s}={v} is outside the spec's bounds [{lo}, {hi}]")
        out.append(d)
    return out


def specialise(mod: tvm.IRModule, dims_list: list[dict[str, int]], func: str = "main",
               shapes: Any = None) -> tvm.IRModule:
    """`mod` plus, for each dims, a copy of `func` with the symbolic sizes bound (static shapes).
    `shapes`: the graph's lowering.InputShapes, whose axis variables (an input axis a * S + b) are bound
    to a * S + b, and whose symbols that are not variables of the function are left out.

    The copies' calls of fusable TIR kernels written over size variables of their own (the lowering's
    conv kernels, and its TE kernels: nan-keeping relu, maximum, reductions) go to static copies of those
    kernels: FuseTIR binds such a variable to a symbol of
    the caller, not to a constant, so it cannot merge the symbolic kernel into a fused function of
    static shapes."""
    mod = tvm.IRModule(dict(mod.functions_items()))
    base = mod[func]
    for dims in dims_list:
        name = spec_name(dims)
        binding = dict(dims)
        if shapes is not None:
            binding = {k: v for k, v in dims.items() if isinstance(shapes.syms.get(k), tirx.Var)}
            binding.update({v: evaluate(d, dims) for v, d in shapes.derived.items()})
        one = relax.transform.BindSymbolicVars(binding)(tvm.IRModule({func: base}))[func]
        mod[name] = one.with_attr("global_symbol", name)
        mod = _StaticKernels(mod).run(name)
    return mod


def _static_shape(sinfo: Any) -> list[int] | None:
    shape = getattr(sinfo, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


def _static_value(arg: Any) -> int | None:
    """The value of a size argument, when it is a constant."""
    return int(arg.value) if isinstance(arg, tirx.IntImm) else None


@relax.expr_functor.mutator
class _StaticKernels(relax.PyExprMutator):
    """call_tir of a fusable symbolic PrimFunc with static arguments -> call_tir of its static copy."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.copies: dict[tuple, relax.GlobalVar] = {}

    def run(self, name: str) -> tvm.IRModule:
        gv = self.mod_.get_global_var(name)
        self.builder_.update_func(gv, self.visit_expr(self.mod_[gv]))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - the visitor's name
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or len(call.args) != 2:
            return call
        callee = self.mod_[call.args[0]]
        if not isinstance(callee, tirx.PrimFunc):
            return call
        # (a kernel of emit_te has no op_pattern yet: the pipeline annotates it, and may fuse it; a
        # hand-scheduled kernel is never fused)
        attrs = callee.attrs or {}
        pattern = attrs.get("op_pattern")
        if (pattern is not None and int(pattern) >= 8) or "tirx.is_scheduled" in attrs \
                or not tirx.analysis.undefined_vars(callee.body, callee.params):
            return call
        args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        # a size argument (a TE kernel's size variable that its buffers' shapes do not define, as L of a
        # [B, C, L - 2] input; an integer in the static copy) binds to its value; each buffer to its shape
        args.append(call)
        types = [None if isinstance(a, tirx.IntImm) else getattr(a, "ty", None) for a in args[:-1]]
        types.append(call.ty_args[0])
        shapes = [_static_shape(t) if t is not None else _static_value(a) for a, t in zip(args, types)]
        if any(sh is None for sh in shapes) or len(shapes) != len(callee.params):
            return call
        key = (call.args[0].name_hint, tuple(tuple(sh) if isinstance(sh, list) else sh for sh in shapes))
        if key not in self.copies:
            # the size arguments first (specialize drops them from the signature): a buffer's shape must be
            # variables (B, not L - 2) to be replaced, and L - 2 is 7 once L is 9
            static = callee.specialize({p: tirx.IntImm("int64", sh) for p, sh, t in zip(callee.params, shapes, types)
                                        if t is None})
            sized = [(sh, t) for sh, t in zip(shapes, types) if t is not None]
            # (a parameter of a PrimFunc here is a buffer-typed variable: its shape and offset are its own)
            static = static.specialize({
                p: tirx.decl_buffer([tirx.IntImm("int64", v) for v in sh], t.dtype,
                                    elem_offset=p.elem_offset, offset_factor=p.offset_factor)
                for p, (sh, t) in zip(static.params, sized) if not all(isinstance(d, tirx.IntImm) for d in p.shape)})
            self.copies[key] = self.builder_.add_func(static, call.args[0].name_hint + "_static")
        buffers = [a for a, t in zip(args[:-1], types) if t is not None]
        return relax.call_tir(self.copies[key], relax.Tuple(buffers) if isinstance(call.args[1], relax.Tuple)
                              else buffers[0], out_ty=call.ty_args[0])

# ---------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------

def read_index(db_dir: str | Path) -> dict[str, Any]:
    path = Path(db_dir) / INDEX
    if not path.exists():
        return {"specc_tuning": 1, "graphs": {}}
    return json.loads(path.read_text())


def _write_index(db_dir: Path, index: dict[str, Any]) -> None:
    tmp = db_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, db_dir / INDEX)


def tuned_dims(db_dir: str | Path | None, graph: Graph, target: Target | None = None, *,
               key: str | None = None, include_slower: bool = False) -> list[dict[str, int]]:
    """The sizes `graph` was tuned at in `db_dir` (for this target's CPU), oldest first, without those
    where the model ran slower with the records (unless `include_slower`). `key`: the graph's
    fingerprint, where the caller has it already (it lowers the graph to Relax)."""
    if db_dir is None:
        return []
    graphs = read_index(db_dir)["graphs"]
    entry = graphs.get(key or fingerprint(graph))
    if not entry:
        if any(g.get("name") == graph.name for g in graphs.values()):
            import warnings

            from specc.compiler.notices import SpeccWarning

            warnings.warn(f"tuning database {db_dir}: '{graph.name}' was tuned there, but not this graph of it "
                          f"(other parameters, another -O level, or an older specc): its records are not used; "
                          f"tune this graph (`specc build --tune N`, or python -m specc.backends.tvm.tuning "
                          f"with the same --set and -O)", SpeccWarning, stacklevel=2)
        return []
    out = []
    for rec in entry["tuned"]:
        if target is not None and rec.get("target_key") not in (None, _target_key(target)):
            continue
        if rec.get("use") == "scheduled" and not include_slower:
            continue  # the whole model ran faster without the records at these sizes (model_check)
        if rec["dims"] not in out:
            out.append(rec["dims"])
    return out


def _target_key(target: Target) -> str:
    return f"{target.kind.name}:{target.attrs.get('mcpu', '')}"


# ---------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------

@dataclass
class TuneReport:
    """What a `tune` call did: kernels tuned now, kernels whose records were already there."""

    db_dir: str
    dims: list[dict[str, int]]
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    specc_kept: list[str] = field(default_factory=list)  # kernels where specc's schedule beat the search
    trials: int = 0
    seconds: float = 0.0
    #: the whole model's seconds per call with the records and with specc's schedules alone, per size
    #: checked (function name, e.g. main__B1_T128): (tuned, scheduled)
    model: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def slower(self) -> list[str]:
        """The sizes where the model ran slower with the records: later builds do without them there."""
        return [name for name, (tuned, scheduled) in self.model.items() if tuned > scheduled]

    def __str__(self) -> str:
        checked = "".join(f"; {name}: {1e3 * t:.3g} ms with the records, {1e3 * sch:.3g} ms without"
                          + (" (builds use specc's schedules there)" if t > sch else "")
                          for name, (t, sch) in self.model.items())
        return (f"tuned {len(self.tuned)} kernel(s) ({self.trials} trials each at most, {self.seconds:.0f} s; "
                f"specc's own schedule kept for {len(self.specc_kept)}), reused {len(self.reused)} record(s) "
                f"from {self.db_dir}, sizes {self.dims}{checked}")


def tuning_tasks(graph: Graph, target: Target, dims_list: list[dict[str, int]], lift: bool = True) -> list[Any]:
    """MetaSchedule tasks (static-shape kernels after fusion) of the graph at the given sizes."""
    from tvm.s_tir import meta_schedule as ms

    from .build import FUNC, lower, pre_schedule_passes

    from .lowering import input_shapes

    mod, _ = lower(graph, target)
    mod = specialise(mod, dims_list, shapes=input_shapes(graph))
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != FUNC})
    with target:
        mod = tvm.transform.Sequential(pre_schedule_passes(target, lift=lift, shared=True))(mod)
    # only the kernels the model calls per forward pass: not the weight transforms run once at bind time
    entries = [spec_name(d) for d in dims_list]
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items()
                        if not isinstance(f, relax.Function) or gv.name_hint in entries})
    mod = relax.transform.DeadCodeElimination(entries)(mod)
    tasks = []
    for task in ms.relax_integration.extract_tasks(mod, target):
        func = task.dispatched[0]["main"]
        if func.attrs is not None and _IS_SCHEDULED in func.attrs and int(func.attrs[_IS_SCHEDULED]) == 1:
            continue  # hand-scheduled (row kernels, the LSTM recurrence)
        if _has_symbolic_shape(func):
            continue
        if not _has_blocks(func):
            continue
        tasks.append(task)
    return tasks


def _has_symbolic_shape(func: tirx.PrimFunc) -> bool:
    for p in func.params:
        ty = p.ty
        shape = getattr(ty, "shape", None)
        if shape is not None and any(not isinstance(d, tirx.IntImm) for d in shape):
            return True
    return False


def _has_blocks(func: tirx.PrimFunc) -> bool:
    try:
        from tvm.s_tir import Schedule
        from tvm.s_tir.dlight.analysis import get_root_block

        sch = Schedule(func)
        return len(sch.get_child_blocks(get_root_block(sch))) > 0
    except Exception:  # noqa: BLE001
        return False


def import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule's TuneContext does, once per process) quickly.

    That import parses ~500 TVMScript functions, and TVMScript's decorator calls inspect.stack(),
    which reads the source line of every frame through inspect.getmodule: a scan of sys.modules
    per frame. With torch loaded (thousands of modules) the import took 40-80 s here. During this
    one import, inspect.stack() gives the source line of the three innermost frames (all that
    TVMScript's class-scope check reads) via linecache, and no source for the outer frames.
    """
    import inspect
    import linecache
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack

    def stack(context: int = 1):
        out = []
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno) if len(out) < 3 and context else ""
            out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                         [line] if line else None, 0 if line else None, positions=None))
            frame = frame.f_back
        return out

    inspect.stack = stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


class DatabaseError(ValueError):
    """A tuning database folder that cannot be used (missing, not a folder, unreadable or damaged files)."""

    def __init__(self, db_dir: str | Path, message: str):
        super().__init__(f"tuning database {db_dir}: {message}")
        self.path = str(db_dir)


#: MetaSchedule's JSONDatabase files in a database folder
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def check_database(db_dir: str | Path, create: bool = False) -> None:
    """Raise DatabaseError unless `db_dir` is a usable tuning database: an existing folder (or, with
    `create`, a path where one can be made) whose index and MetaSchedule files, where present, read."""
    path = Path(db_dir)
    if path.exists() and not path.is_dir():
        raise DatabaseError(db_dir, "not a folder")
    if not path.exists():
        if create:
            return  # tuning creates it
        raise DatabaseError(db_dir, "no such folder (a database is made by tuning: add --tune TRIALS)")
    try:
        index = read_index(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DatabaseError(db_dir, f"cannot read {INDEX}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise DatabaseError(db_dir, f"{INDEX} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if not (isinstance(index, dict) and isinstance(index.get("graphs"), dict)
            and all(isinstance(g, dict) and isinstance(g.get("tuned", []), list) and
                    all(isinstance(r, dict) and isinstance(r.get("dims"), dict) for r in g.get("tuned", []))
                    for g in index["graphs"].values())):
        raise DatabaseError(db_dir, f"{INDEX} is not a specc tuning index")
    workloads = 0
    for name in (WORKLOADS, RECORDS):
        f = path / name
        if not f.exists():
            continue
        try:
            lines = f.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatabaseError(db_dir, f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatabaseError(db_dir, f"{name}:{n}: not valid JSON: {e.msg}") from None
            if not (isinstance(row, list) and len(row) == 2):
                raise DatabaseError(db_dir, f"{name}:{n}: not a MetaSchedule database row")
            if name == WORKLOADS:
                workloads += 1
            elif not (isinstance(row[0], int) and 0 <= row[0] < workloads):
                raise DatabaseError(db_dir, f"{name}:{n}: refers to workload {row[0]!r}, which "
                                            f"database_workload.json does not hold")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DatabaseError(db_dir, "the folder is not writable")
    # what MetaSchedule makes of the rows (a damaged module or trace): open_database says, for the rows a
    # build reads


def workload_key(mod: tvm.IRModule) -> str:
    """A kernel's key in database_workload.json (the first column): its structural hash, as MetaSchedule's
    JSONDatabase with module_equality="structural" writes it."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def open_database(db_dir: str | Path, graph: Graph | None = None, *, key: str | None = None):
    """The MetaSchedule database in `db_dir`. With `graph` (a build's), only the rows of the kernels the
    index lists for that graph: a database tuned for a whole zoo holds hundreds of kernels, and
    MetaSchedule parses every module it holds (about 15 s for the zoo's 400). Where the index lists
    none for the graph (a database written before it did, or one not written by `tune`), all rows.
    `key`: the graph's fingerprint, where the caller has it already."""
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    wanted = None
    if graph is not None:
        try:
            wanted = read_index(db_dir)["graphs"].get(key or fingerprint(graph), {}).get("workloads")
        except (OSError, ValueError):
            wanted = None
    if wanted is None:
        db_dir.mkdir(parents=True, exist_ok=True)
        return _json_database(db_dir, db_dir)
    # the graph's rows, renumbered, in a scratch copy (read once: nothing is committed during a build)
    keep: dict[int, int] = {}
    workloads: list[str] = []
    wanted = set(wanted)
    path = db_dir / WORKLOADS
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else []):
        if line.strip() and line[2:line.index('"', 2)] in wanted:  # ["HASH", "..."]
            keep[n] = len(workloads)
            workloads.append(line)
    records: list[str] = []
    path = db_dir / RECORDS
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        head, rest = line[1:].split(",", 1)
        if int(head) in keep:
            records.append(f"[{keep[int(head)]},{rest}")
    with tempfile.TemporaryDirectory(prefix="specc_db_") as tmp:
        (Path(tmp) / WORKLOADS).write_text("".join(w + "\n" for w in workloads))
        (Path(tmp) / RECORDS).write_text("".join(r + "\n" for r in records))
        return _json_database(Path(tmp), db_dir)


def _json_database(files: Path, db_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(path_workload=str(files / WORKLOADS), path_tuning_record=str(files / RECORDS),
                                        module_equality="structural")
    except Exception as e:  # noqa: BLE001 - TVM reports a bad row as an InternalError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(db_dir, f"MetaSchedule cannot read the database: {first}") from None


def tune(graph: Graph, db_dir: str | Path, trials: int = 64, *, dims: Any = None,
         target: str | Mapping[str, Any] | Target = "llvm", weights: Any = None, lift: bool = True,
         seed: int | None = 0, log_dir: str | Path | None = None, strategy: str = "evolutionary",
         workers: str = "inprocess", timeout_sec: float = 300.0, measure_repeats: int = 3,
         verbose: bool = False, check_model: bool = True, check_seconds: float = 2.0) -> TuneReport:
    """Tune the graph's kernels at `dims` (a dict or a list of dicts of symbolic sizes; default: the
    spec's example sizes) with MetaSchedule, `trials` measured candidates per kernel, into the
    database in `db_dir`. Kernels that already have a record there are skipped. `weights` is
    accepted for symmetry with compile_graph and unused: kernels are tuned on random data.

    strategy: "evolutionary" (MetaSchedule's default: a cost model ranks mutated candidates) or
    "replay-trace" (random samples of the design space: much cheaper per trial, for quick runs).
    verbose: MetaSchedule's progress on the console (it is always written to DB_DIR/logs).
    workers: "inprocess" (build and measure in this process: see `in_process_workers`) or "popen"
    (MetaSchedule's worker processes, with `timeout_sec` per build and per measurement: generous,
    because each worker imports TVM; MetaSchedule's default 30 s timed out on a loaded 2-core machine).
    check_model: after tuning (or when a size was never checked), time the whole model with the records
    and without, `check_seconds` per size (see `model_check`); the index keeps the records out of later
    builds at a size where they made the model slower.
    """
    from tvm.s_tir import meta_schedule as ms

    from .build import make_target

    del weights
    t0 = time.perf_counter()
    import_tensor_intrinsics()
    import logging

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET or not verbose:
        ms_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)  # the console handler's level
    tgt = make_target(target)
    if tgt.kind.name != "llvm":
        raise ValueError("tune: CPU (llvm) targets only for now")
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    dims_list = _dims_list(graph, dims)
    report = TuneReport(str(db_dir), dims_list, trials=trials)
    database = open_database(db_dir)
    todo = []
    tasks = tuning_tasks(graph, tgt, dims_list, lift=lift)
    for task in tasks:
        mod = task.dispatched[0]
        if database.query_tuning_record(mod, tgt, task.task_name) is not None:
            report.reused.append(task.task_name)
        else:
            todo.append(task)
    if todo and trials > 0:
        work_dir = str(log_dir or db_dir / "logs")
        # MetaSchedule configures its loggers by handler name and fails on a handler without one
        # (pytest's log capture puts such handlers there): set those aside while it does, then add
        # them back so that they still see the run
        unnamed = [h for h in ms_logger.handlers if h.get_name() is None]
        for h in unnamed:
            ms_logger.removeHandler(h)
        try:
            contexts, weights_ = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo, work_dir=work_dir, seed=seed, strategy=strategy)
        finally:
            for h in unnamed:
                ms_logger.addHandler(h)
        evaluator = ms.runner.EvaluatorConfig(number=measure_repeats, repeat=1, min_repeat_ms=20)
        with scratch_tempdir() as scratch:
            export = exporter(scratch)
            if workers == "inprocess":
                builder, runner = in_process_workers(evaluator, export)
            elif workers == "popen":
                builder = ms.builder.LocalBuilder(timeout_sec=timeout_sec, f_export=export)
                runner = ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator,
                                               f_alloc_argument=alloc_arguments)
            else:
                raise ValueError(f"workers must be 'inprocess' or 'popen', not {workers!r}")
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights_, work_dir=work_dir,
                max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                num_trials_per_iter=min(64, max(trials, 1)), database=database,
                builder=builder, runner=runner,
                cost_model=_cost_model() if strategy == "evolutionary" else "random")
        report.tuned = [t.task_name for t in todo]
        report.specc_kept = seed_with_specc_schedules(database, todo, tgt, measure_repeats)
    key = fingerprint(graph)  # (it lowers the graph: once for the index's two updates)
    unchecked = _record(db_dir, graph, key, tgt, dims_list, report, todo, tasks,
                        recheck=bool(report.tuned or report.specc_kept))
    if check_model and unchecked:
        report.model = model_check(graph, db_dir, tgt, unchecked, check_seconds)
        _record_check(db_dir, key, tgt, report.model)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def scratch_tempdir():
    """A private directory for the candidates of a tuning run, removed after it (see `exporter`)."""
    scratch = tempfile.mkdtemp(prefix="specc-tune-")
    try:
        yield Path(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def exporter(scratch: Path) -> Callable[[Any], str]:
    """MetaSchedule's f_export for a tuning run: each candidate exported as a tar into its own directory
    under `scratch`. MetaSchedule's default exports into a fresh `tempfile.mkdtemp()` directory that
    nothing removes (its runner's default cleanup does nothing): tens of kilobytes per trial left in
    the system's temporary directory. The function is a closure with its imports inside, so that
    cloudpickle sends it by value to LocalBuilder's worker processes, which need not import specc;
    neither TMPDIR nor `tempfile.tempdir` changes, so the rest of the process is not affected."""
    where = str(scratch)

    def export(mod: Any) -> str:
        import os as os_
        import tempfile as tempfile_

        from tvm.support.tar import tar

        path = os_.path.join(tempfile_.mkdtemp(dir=where), "tvm_tmp_mod." + tar.output_format)
        mod.export_library(path, fcompile=tar)
        return path

    return export


def alloc_arguments(device: Any, args_info: list, alloc_repeat: int) -> list:
    """A kernel's arguments for measuring it (MetaSchedule's f_alloc_argument): floats random, integers
    and booleans zero. MetaSchedule's default fills integer tensors with random values too, and a
    gather or an embedding lookup then reads far outside its table: a crash, which in-process
    measuring does not survive (moe_router's gather did that)."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    random_fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) or \
        tvm.get_global_func("tvm.contrib.random.random_fill")

    def fill(arg: Any) -> None:
        if str(arg.dtype).startswith(("float", "bfloat")):
            random_fill(arg)
        else:
            arg.copyfrom(np.zeros([int(d) for d in arg.shape], str(arg.dtype)))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def in_process_workers(evaluator_config: Any, export: Callable[[Any], str]):
    """A MetaSchedule builder and runner that work in this process.

    MetaSchedule's LocalBuilder starts fresh worker processes for every batch of candidates (to
    dodge a memory leak), and each imports TVM: seconds per batch on a small machine, minutes over
    a tuning run. In-process building and measuring skip that; a candidate that crashed the
    compiler would take the tuning process with it (none did in our runs).
    """
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner import PyRunner, RunnerFuture, RunnerResult
    from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    out.append(BuilderResult(export(default_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # noqa: BLE001 - reported to the tuner as a failed candidate
                    out.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return out

    @derived_object
    class InProcessRunner(PyRunner):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def run(self, runner_inputs):
            futures = []
            for ri in runner_inputs:
                try:
                    rt = tvm.runtime.load_module(ri.artifact_path)
                    dev = tvm.runtime.device(ri.device_type, 0)
                    args = alloc_arguments(dev, [a.as_json() for a in ri.args_info], 1)
                    res = RunnerResult(default_run_evaluator(rt, dev, self.config, args), None)
                except Exception as e:  # noqa: BLE001
                    res = RunnerResult(None, f"{type(e).__name__}: {e}")
                futures.append(RunnerFuture(f_done=lambda: True, f_result=lambda r=res: r))
            return futures

    return InProcessBuilder(), InProcessRunner(evaluator_config)


def _measure(func: tirx.PrimFunc, target: Target, repeats: int) -> float | None:
    """Median seconds of one call of `func` (built for `target`) on random inputs, or None if it fails."""
    import statistics

    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

    try:
        lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        dev = tvm.cpu(0)
        args = alloc_arguments(dev, [a.as_json() for a in ArgInfo.from_prim_func(func)], 1)
        config = EvaluatorConfig(number=max(repeats, 1), repeat=3, min_repeat_ms=20)
        return statistics.median(default_run_evaluator(lib, dev, config, args))
    except Exception:  # noqa: BLE001
        return None


def _same_results(func: tirx.PrimFunc, scheduled: tirx.PrimFunc, target: Target) -> bool:
    """Whether `scheduled` computes what `func` computes, on random inputs (float tolerance 1e-5)."""
    import numpy as np

    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        shape, dtype = [int(d) for d in p.ty.shape], str(p.ty.dtype)
        if "int" in dtype or dtype == "bool":
            args.append(np.zeros(shape, dtype))  # as alloc_arguments: indices inside every table
        else:
            args.append(np.abs(rng.standard_normal(shape)).astype(dtype))
    outs = []
    try:
        for f in (func, scheduled):
            lib = tvm.tirx.build(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
            tensors = [tvm.runtime.tensor(a.copy()) for a in args]
            lib["main"](*tensors)
            outs.append(tensors[-1].numpy().astype("float64"))
    except Exception:  # noqa: BLE001
        return False
    scale = max(1.0, float(np.nanmax(np.abs(outs[0]))) if outs[0].size else 1.0)
    return bool(np.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * scale, equal_nan=True))


#: MetaSchedule's record replaces specc's own schedule only when it measured at least this much faster
#: alone: kernels it won by a few per cent alone lost inside the models (gpt at batch 8 ran 0.92x of
#: torch eager tuned against 0.89x with specc's schedules only; repvgg 1.22x against 1.07x).
KEEP_SPECC_MARGIN = 0.10


def seed_with_specc_schedules(database: Any, tasks: list[Any], target: Target, repeats: int = 3) -> list[str]:
    """For each task, measure specc's own schedule (schedules.py) and, unless the best record MetaSchedule
    found beats it by KEEP_SPECC_MARGIN, commit it to the database as that kernel's record: the database
    then never holds a schedule slower than the default build's. A schedule is committed only after it
    computed the same results as the unscheduled kernel. Returns the kernels so kept."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import TuningRecord

    from .schedules import default_rules

    kept = []
    for task in tasks:
        mod = task.dispatched[0]
        func = mod["main"]
        sch = None
        for rule in default_rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                break
        if sch is None or not _same_results(func, sch.mod["main"], target):
            continue
        mine = _measure(sch.mod["main"], target, repeats)
        if mine is None:
            continue
        workload = database.commit_workload(mod)
        best = database.get_top_k(workload, 1)
        theirs = min((float(t) for t in best[0].run_secs), default=None) if best and best[0].run_secs else None
        if theirs is None or mine * (1 - KEEP_SPECC_MARGIN) < theirs:
            database.commit_tuning_record(TuningRecord(sch.trace, workload, [mine], target,
                                                       ArgInfo.from_prim_func(func)))
            kept.append(task.task_name)
    return kept


def _cost_model() -> str:
    """xgboost's cost model when installed, else random search guided by measurements only."""
    try:
        import xgboost  # noqa: F401
        return "xgb"
    except ImportError:
        return "random"


def _record(db_dir: Path, graph: Graph, key: str, target: Target, dims_list: list[dict[str, int]],
            report: TuneReport, todo: list[Any], tasks: list[Any], recheck: bool) -> list[dict[str, int]]:
    """Add the graph, its sizes and its kernels to the index; returns the sizes whose model check is to be
    made: those never checked, or all of `dims_list` when `recheck` (records were added)."""
    index = read_index(db_dir)
    entry = index["graphs"].setdefault(key, {"name": graph.name, "tuned": []})
    unchecked = []
    for dims in dims_list:
        rec = _size_record(entry, dims, target)
        if rec is None:
            rec = {"dims": dims, "target": str(target), "target_key": _target_key(target)}
            entry["tuned"].append(rec)
        if recheck or "use" not in rec:
            rec.pop("use", None)  # until checked, the build compiles the records at this size
            rec.pop("model_ms", None)
            unchecked.append(dims)
    # the kernels (MetaSchedule workloads, by structural hash) this graph's builds look up: a build
    # reads only those rows of the database (open_database)
    entry["workloads"] = sorted(set(entry.get("workloads", [])) | {workload_key(t.dispatched[0]) for t in tasks})
    kernels = index.setdefault("kernels", {})
    for task in todo:
        func = task.dispatched[0]["main"]
        shapes = [[int(d) for d in p.ty.shape] for p in func.params if getattr(p.ty, "shape", None) is not None]
        kernels.setdefault(task.task_name + ":" + "x".join("_".join(map(str, s)) for s in shapes),
                           {"op": task.task_name, "shapes": shapes, "trials": report.trials,
                            "target": str(target)})
    _write_index(db_dir, index)
    return unchecked


def _size_record(entry: dict[str, Any], dims: Mapping[str, int], target: Target) -> dict[str, Any] | None:
    for rec in entry["tuned"]:
        if rec["dims"] == dims and rec.get("target_key") in (None, _target_key(target)):
            return rec
    return None


def _record_check(db_dir: Path, key: str, target: Target, model: Mapping[str, tuple[float, float]]) -> None:
    """Mark each checked size of the graph `key` "tuned" (the records serve builds there) or "scheduled"
    (they do not)."""
    index = read_index(db_dir)
    entry = index["graphs"][key]
    for rec in entry["tuned"]:
        name = spec_name(rec["dims"])
        if name in model and rec.get("target_key") in (None, _target_key(target)):
            tuned, scheduled = model[name]
            rec["use"] = "scheduled" if tuned > scheduled else "tuned"
            rec["model_ms"] = {"tuned": round(1e3 * tuned, 4), "scheduled": round(1e3 * scheduled, 4)}
    _write_index(db_dir, index)


def model_check(graph: Graph, db_dir: str | Path, target: Target, dims_list: list[dict[str, int]],
                seconds: float = 2.0) -> dict[str, tuple[float, float]]:
    """Seconds per call of the whole model built with the database's records and without them (specc's
    schedules), at each of `dims_list`: {function name: (tuned, scheduled)}. Zero weights, random float
    inputs and integer inputs at the bottom of their range; the two libraries run in interleaved rounds,
    `seconds` in all per size."""
    import torch

    from .bench import interleaved
    from .build import compile_graph

    # the build with the records compiles a static copy of every size in dims_list (none is marked yet)
    runners = {"tuned": compile_graph(graph, target, tuning_db=db_dir), "scheduled": compile_graph(graph, target)}
    weights = {p["name"]: torch.zeros(p["shape"], dtype=getattr(torch, p["dtype"]))
               for p in runners["scheduled"].manifest["params"]}
    for runner in runners.values():
        runner.bind(weights)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dims in dims_list:
        inputs = []
        for _, nid in graph.inputs:
            t = graph.node(nid).type
            shape, dtype = [evaluate(d, dims) for d in t.shape], getattr(torch, DTYPES[t.dtype])
            if dtype.is_floating_point:
                inputs.append(torch.randn(shape, generator=gen, dtype=dtype))
            else:
                inputs.append(torch.full(shape, t.value_range[0] if t.value_range else 0, dtype=dtype))
        runners["tuned"](*inputs)
        if runners["tuned"].last_function != spec_name(dims):
            continue  # no static copy at these sizes (nothing to choose between)
        times = interleaved({k: (lambda r=r: r(*inputs)) for k, r in runners.items()}, seconds / 2)
        out[spec_name(dims)] = (times["tuned"], times["scheduled"])
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m specc.backends.tvm.tuning SPEC --db DIR [--set k=v] [--dims B=1,T=128]... [--trials N] [-O N]"""
    import argparse

    import specc

    ap = argparse.ArgumentParser(prog="python -m specc.backends.tvm.tuning",
                                 description="Tune a spec's kernels for this CPU into a MetaSchedule database "
                                             "(later builds: compile_graph(..., tuning_db=DIR)).")
    ap.add_argument("spec")
    ap.add_argument("--db", required=True, help="the database folder (created; extended when it exists)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="spec parameter override")
    ap.add_argument("--dims", action="append", default=[], metavar="B=1,T=128",
                    help="sizes of the symbolic dimensions to tune at (repeatable; default: the spec's examples)")
    ap.add_argument("--trials", type=int, default=64, help="measured candidates per kernel (default 64)")
    ap.add_argument("--strategy", choices=("evolutionary", "replay-trace"), default="evolutionary")
    ap.add_argument("--workers", choices=("inprocess", "popen"), default="inprocess")
    ap.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=1,
                    help="specc's optimisation level of the graph to tune (default 1, as `specc build`: a "
                         "database serves the graph it was tuned for, so tune at the level you build at)")
    ap.add_argument("-v", "--verbose", action="store_true", help="MetaSchedule's progress on the console")
    args = ap.parse_args(argv)

    def parse(items: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kv in items.split(","):
            k, v = kv.split("=", 1)
            out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
        return out

    overrides: dict[str, Any] = {}
    for item in args.set:
        overrides.update(parse(item))
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(args.spec, **overrides), PassContext(opt_level=args.opt_level))
    dims = [parse(d) for d in args.dims] or None
    report = tune(graph, args.db, args.trials, dims=dims, strategy=args.strategy, workers=args.workers,
                  verbose=args.verbose)
    print(report)
    return 0


__all__ = ["tune", "TuneReport", "model_check", "DatabaseError", "check_database", "tuned_dims", "specialise", "spec_name", "fingerprint", "read_index",
           "open_database", "workload_key", "tuning_tasks", "seed_with_specc_schedules", "INDEX"]


if __name__ == "__main__":
    raise SystemExit(main())
