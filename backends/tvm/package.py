"""The `specc build --target tvm-llvm|tvm-cuda` output: the compiled library plus a model.py with the
same interface as the PyTorch target (`Model`, `load(directory=None)`, `example_inputs(seed=0)`),
taking and returning torch tensors. The folder is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from specc.backends.pytorch.build import EXAMPLE_INPUTS
from specc.compiler.dims import to_json as dim_json
from specc.compiler.ir import DTYPES, Graph

TARGETS = {"tvm-llvm": {"kind": "llvm"}, "tvm-cuda": {"kind": "cuda", "arch": "sm_90"}}

_MODEL_PY = '''"""{name}: the TVM build ({target}) of a specc spec. Edit the spec, not this file.

    import model
    m = model.load()                      # the compiled library with its weights bound
    y = m(*model.example_inputs())        # torch tensors in, torch tensors out
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

#: Inputs in the order Model.forward takes them: dtype, shape, value range of integer inputs.
INPUTS = {inputs}
#: Example sizes of the symbolic dimensions.
DIMS = {dims}
#: The sizes each symbolic dimension may take: (smallest, largest), None for no largest.
BOUNDS = {bounds}
TARGET = {target!r}


def _loader():
    spec = importlib.util.spec_from_file_location("specc_tvm_loader_" + str(id(INPUTS)),
                                                  Path(__file__).with_name("loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Model(torch.nn.Module):
    """Calls the compiled library; one library serves every size of the symbolic dimensions."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, *inputs: torch.Tensor):
        return self.runner(*inputs)


def load(directory: str | Path | None = None) -> Model:
    directory = Path(__file__).resolve().parent if directory is None else Path(directory)
    if TARGET == "tvm-cuda" and not torch.cuda.is_available():
        raise RuntimeError("this build holds CUDA kernels (sm_90) and needs an NVIDIA GPU; none is available here")
    return Model(_loader().load(directory)).eval()
'''


def model_py(graph: Graph, target: str) -> str:
    inputs = {name: (DTYPES[graph.node(nid).type.dtype], tuple(dim_json(d) for d in graph.node(nid).type.shape),
                     graph.node(nid).type.value_range) for name, nid in graph.inputs}
    dims = {s: ex for s, (ex, _, _) in graph.dims.items()}
    bounds = {s: (lo, hi) for s, (_, lo, hi) in graph.dims.items()}
    return _MODEL_PY.format(name=graph.name, target=target, inputs=repr(inputs), dims=repr(dims),
                            bounds=repr(bounds)) + EXAMPLE_INPUTS


class PackageError(ValueError):
    """A build that cannot be done as asked: bad options, an unusable tuning database or output folder.
    `path` is the file or folder the error is about (None: the options themselves)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def check_options(target: str, out: str | Path, tuning_db: str | Path | None, tune_trials: int, *,
                  force: bool = False, protect=()) -> None:
    """Raise PackageError for options that cannot work, before anything is compiled, tuned or written
    (SpecError for an output folder that may not be replaced: see specc.backends.outdir)."""
    from .tuning import DatabaseError, check_database

    if target not in TARGETS:
        raise PackageError(f"unknown target {target!r} (targets: {', '.join(TARGETS)})")
    if tune_trials < 0:
        raise PackageError(f"--tune {tune_trials}: the number of trials cannot be negative")
    if tune_trials and tuning_db is None:
        raise PackageError("--tune needs --tuning-db DIR to keep the records in")
    if tune_trials and target != "tvm-llvm":
        raise PackageError(f"--tune tunes CPU kernels: use it with --target tvm-llvm, not {target}")
    if tuning_db is not None:
        try:
            check_database(tuning_db, create=bool(tune_trials))
        except DatabaseError as e:
            raise PackageError(str(e), e.path) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PackageError("the output path exists and is not a folder", out)
    from specc.backends.outdir import check

    out = check(out, force=force, protect=(tuning_db, *protect))
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PackageError(f"cannot make the output folder: {parent} is not a folder", out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PackageError(f"cannot write the output folder: {parent} is not writable", out)


def build_package(graph: Graph, weights: Mapping[str, Any], out: str | Path, target: str,
                  manifest: Mapping[str, Any], tuning_db: str | Path | None = None, tune_trials: int = 0,
                  tune_dims: Any = None, opt_level: int | None = None, force: bool = False,
                  protect=()) -> Path:
    """Compile `graph` (already optimised; `weights` its parameters) for `target` into `out`, atomically.

    With `tuning_db`, the database's records for this graph are used; with `tune_trials` > 0 too, the
    graph's kernels that have no record yet are tuned first (at `tune_dims`, default the spec's
    example sizes; CPU targets only), so that later builds reuse them.

    Options that cannot work (see `check_options`) and a failure to write raise PackageError; a failed
    build leaves `out` as it was (no partial folder, an earlier build untouched). An `out` holding
    anything but an earlier specc build is an error unless `force`; one holding the tuning database, a
    `protect` path or the current directory, always (specc.backends.outdir).
    """
    from .build import export

    check_options(target, out, tuning_db, tune_trials, force=force, protect=protect)
    from specc.backends.outdir import replace_folder

    from .tuning import DatabaseError

    if tune_trials:
        from .tuning import tune

        try:
            tune(graph, tuning_db, tune_trials, dims=tune_dims, target=TARGETS[target])
        except DatabaseError as e:
            raise PackageError(str(e), e.path) from None

    out = Path(out)

    def fill(tmp: Path) -> None:
        export(graph, weights, tmp, TARGETS[target], tuning_db=tuning_db, opt_level=opt_level)
        (tmp / "model.py").write_text(model_py(graph, target))
        (tmp / "manifest.json").write_text(json.dumps(dict(manifest, target=target), indent=2) + "\n")

    try:
        replace_folder(out, fill, force=force, protect=(tuning_db, *protect))
    except DatabaseError as e:  # a row of the tuning database MetaSchedule cannot read
        raise PackageError(str(e), e.path) from None
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise PackageError(f"cannot write the build: {e.strerror or e}{where}", out) from None
    return out
