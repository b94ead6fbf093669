"""The PyTorch target: `model.py` + `weights.safetensors` + `manifest.json`, written atomically,
and the same artifacts loaded in memory for `specc.load`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from specc.compiler.diagnostics import Diagnostic, Span, SpecError
from specc.compiler.dims import to_json as dim_json
from specc.compiler.ir import DTYPE_BYTES, DTYPES, Graph
from specc.compiler.passes import PassContext, optimize
from specc.compiler.summary import summarize

from .codegen import generate_source
from .weights import init_weights, materialise

VERSION = "0.1.0"

_FOOTER = '''

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file with the standard library and torch alone (little-endian hosts)."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end > start:
            flat = torch.frombuffer(bytearray(data[base + start:base + end]), dtype=dtype)
        else:
            flat = torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def load(directory: str | Path | None = None, compile: bool = TORCH_COMPILE) -> Model:
    """The model with its weights (from weights.safetensors beside this file by default), in eval mode.

    With compile=True (the default when built with `specc build --torch-compile`), the model is
    wrapped by torch.compile; its first call compiles. The input checks, which the compiled forward
    skips, run before each call of the wrapper.
    """
    directory = Path(__file__).resolve().parent if directory is None else Path(directory)
    with torch.device("meta"):
        model = Model()
    state = read_safetensors(directory / "weights.safetensors")
    # Compared by name, before loading: torch's BatchNorm fills in a missing num_batches_tracked
    # itself, so load_state_dict's own `missing` cannot tell a tied buffer from a stored one.
    stored = set(model.state_dict()) - set(TIED)
    missing, unexpected = sorted(stored - set(state)), sorted(set(state) - stored)
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():  # the dtype_ref buffers are not stored: made here, float32 as the weights' floats
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module.register_buffer(name, torch.empty(0, dtype=torch.float32), persistent=False)
    if TIED:
        model.tie_weights()
    model.eval()
    if not compile:
        return model
    compiled = torch.compile(model)

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:  # in eager Python, before the compiled call
        check_inputs(model, *_bound_inputs(model.forward, args, kwargs))

    compiled.register_forward_pre_hook(check, with_kwargs=True)
    return compiled


def _bound_inputs(forward, args: tuple, kwargs: dict) -> list:
    """forward's arguments, positional or by keyword, in its parameters' order (a TypeError as forward's
    own where they do not fit)."""
    code = forward.__code__
    names = code.co_varnames[1:code.co_argcount]  # after self
    if len(args) > len(names):
        raise TypeError(f"forward() takes {len(names)} inputs but {len(args)} were given")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        if name in bound:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        bound[name] = value
    missing = [name for name in names if name not in bound]
    if missing:
        raise TypeError(f"forward() missing inputs: {', '.join(missing)}")
    return [bound[name] for name in names]
'''


#: The generated files' input checks and example_inputs() (torch alone), shared by every target's model.py.
EXAMPLE_INPUTS = '''

def _size(d, sizes: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, str):
        return sizes[d]
    total = 0
    for coef, symbols in d:
        for s in symbols:
            coef *= sizes[s]
        total += coef
    return total


def _show(d) -> str:
    """A declared dimension as the spec writes it: 8, T, 4*H, 2*T + 1."""
    if not isinstance(d, list):
        return str(d)
    terms = sorted(d, key=lambda t: not t[1])  # the constant last
    return " + ".join("*".join(([str(c)] if c != 1 or not s else []) + s) for c, s in terms).replace("+ -", "- ")


def _bounds(s: str) -> tuple[int, int | None, str]:
    lo, hi = BOUNDS.get(s, (1, None))
    return lo, hi, f"outside [{lo}, {'inf' if hi is None else hi}]"


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The float dtypes of the model's parameters and buffers (one after .double() or .half())."""
    return {t.dtype for t in (*model.parameters(), *model.buffers()) if t.dtype.is_floating_point}


def check_inputs(model: nn.Module, *inputs: torch.Tensor) -> None:
    """ValueError, naming the input and dimension, unless the inputs have the ranks, dtypes (a float one:
    the declared dtype or that of the model's floats, e.g. float64 after .double(); any float dtype
    under autocast or when the model holds no floats) and static sizes INPUTS declares, and one size per
    symbolic dimension (read whole, or solved from a * S + b, a and b numbers or sizes read before)
    within BOUNDS. Reads shapes only, never values; skipped while torch.compile or torch.export trace
    the model."""
    if torch.compiler.is_compiling():
        return
    floats = None  # the model's float dtypes, read when a float input has another dtype than declared
    declared = []  # (name, declared shape, shape)
    sizes, where = {}, {}  # symbol -> its size, and where it was read
    for (name, (dtype, shape, _)), x in zip(INPUTS.items(), inputs):
        have = tuple(x.shape)
        if len(have) != len(shape):
            raise ValueError(f"input {name}: rank {len(have)}, expected {len(shape)}")
        want = getattr(torch, dtype)
        if x.dtype != want and not (want.is_floating_point and x.dtype.is_floating_point):
            raise ValueError(f"input {name}: dtype {x.dtype}, expected {want}")
        if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
            floats = _float_dtypes(model) if floats is None else floats
            if floats and x.dtype not in floats:
                have = ", ".join(sorted(str(f) for f in floats))
                raise ValueError(f"input {name}: dtype {x.dtype}, expected {want} (the model's floats are {have}; "
                                 f"convert the input, or the model with .to({x.dtype}))")
        declared.append((name, shape, have))
        for axis, d in enumerate(shape):
            if isinstance(d, str) and d not in sizes:
                sizes[d], where[d] = have[axis], f"input {name}: dimension {axis} ({d})"
    progress = True
    while progress:  # a * S + b, S given whole by no input: solved from the size once a and b are known
        progress = False
        for name, shape, have in declared:
            for axis, d in enumerate(shape):
                if not isinstance(d, list):
                    continue
                unknown = {s for _, ss in d for s in ss} - set(sizes)
                if len(unknown) != 1 or any(ss.count(s) > 1 for _, ss in d for s in unknown):
                    continue
                (s,), n = unknown, have[axis]  # a: the known factor of S's terms, b: the other terms' sizes
                a = _size([(c, [k for k in ss if k != s]) for c, ss in d if s in ss], sizes)
                b = _size([(c, ss) for c, ss in d if s not in ss], sizes)
                if a < 1 or (n - b) % a or (n - b) // a < 1:
                    known = sorted({k for _, ss in d for k in ss if k != s})
                    given = f" with {', '.join(f'{k}={sizes[k]}' for k in known)}" if known else ""
                    raise ValueError(f"input {name}: dimension {axis} is {n}, but must be {_show(d)} for a whole "
                                     f"{s} >= 1{given}")
                sizes[s], where[s] = (n - b) // a, f"input {name}: dimension {axis} ({_show(d)})"
                progress = True
    for name, shape, have in declared:
        for axis, (d, n) in enumerate(zip(shape, have)):
            if isinstance(d, int) and n != d:
                raise ValueError(f"input {name}: dimension {axis} is {n}, expected {d}")
            if isinstance(d, str) and n != sizes[d]:
                raise ValueError(f"input {name}: dimension {axis} is {n}, but {where[d]} gives {d}={sizes[d]}")
            if isinstance(d, list) and all(s in sizes for _, ss in d for s in ss) and n != _size(d, sizes):
                raise ValueError(f"input {name}: dimension {axis} is {n}, but must be {_show(d)} = {_size(d, sizes)} "
                                 f"with {', '.join(f'{k}={v}' for k, v in sorted(sizes.items()))}")
    for s, n in sizes.items():
        lo, hi, outside = _bounds(s)
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"{where[s]} gives {s}={n}, {outside}")


def example_inputs(seed: int = 0, **dims: int) -> tuple[torch.Tensor, ...]:
    """Random inputs that fit the declared inputs, at the example sizes (override with e.g. B=4). ValueError
    for a name that is no symbolic dimension, a size outside its bounds, or one that makes a dimension < 1."""
    for s, n in dims.items():
        if s not in DIMS:
            raise ValueError(f"example_inputs: {s} is not a symbolic dimension of this model (its dimensions: "
                             f"{', '.join(DIMS) or 'none'})")
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"example_inputs: {s}={n!r} is not a whole number")
        lo, hi, outside = _bounds(s)
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"example_inputs: {s}={n}, {outside}")
    sizes = {**DIMS, **dims}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, (dtype_name, shape, value_range) in INPUTS.items():
        for axis, d in enumerate(shape):
            if _size(d, sizes) < 1:
                raise ValueError(f"example_inputs: input {name}: dimension {axis} is {_show(d)} = {_size(d, sizes)} "
                                 f"with {', '.join(f'{k}={v}' for k, v in sorted(sizes.items()))}, but must be at least 1")
        shape = [_size(d, sizes) for d in shape]
        dtype = getattr(torch, dtype_name)
        if value_range is not None:
            out.append(torch.randint(value_range[0], value_range[1], shape, generator=gen, dtype=dtype))
        elif dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 8, shape, generator=gen, dtype=dtype))
    return tuple(out)
'''


def _py(v: Any) -> str:
    """Python source for plain JSON-like data (validated names and numbers only)."""
    return repr(v)


def header(graph: Graph, spec_name: str, spec_file: str, spec_sha: str, paper: str | None,
           description: str | None, ties: list[str], torch_compile: bool = False) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in graph.params.items())
    doc = [f"{spec_name}: generated by specc {VERSION} from {_doc_safe(Path(spec_file).name)} "
           f"(sha256 {spec_sha[:16]})."]
    if description:
        doc.append("")
        doc.append(_doc_safe(description))
    if paper:
        doc.append("")
        doc.append("Paper: " + _doc_safe(paper))
    doc.append("")
    doc.append("Edit the spec, not this file. Parameters: " + _doc_safe(params))
    inputs = {name: (DTYPES[graph.node(nid).type.dtype], tuple(dim_json(d) for d in graph.node(nid).type.shape),
                     graph.node(nid).type.value_range) for name, nid in graph.inputs}
    dims = {s: ex for s, (ex, _, _) in graph.dims.items()}
    bounds = {s: (lo, hi) for s, (_, lo, hi) in graph.dims.items()}
    lines = ['"""' + "\n".join(doc) + '\n"""', "",
             "from __future__ import annotations", "", "import json", "import math", "from pathlib import Path", "",
             "import torch", "import torch.nn.functional as F", "from torch import nn", "",
             "#: Inputs in the order Model.forward takes them: dtype, shape, value range of integer inputs.",
             f"INPUTS = {_py(inputs)}",
             "#: Example sizes of the symbolic dimensions.",
             f"DIMS = {_py(dims)}",
             "#: The sizes each symbolic dimension may take: (smallest, largest), None for no largest.",
             f"BOUNDS = {_py(bounds)}",
             "#: Parameters that share another's storage (not stored in the weights file).",
             f"TIED = {_py(tuple(ties))}",
             "#: Whether load() wraps the model in torch.compile by default (specc build --torch-compile).",
             f"TORCH_COMPILE = {bool(torch_compile)}"]
    return "\n".join(lines) + "\n"


def _doc_safe(text: str) -> str:
    """Free text placed in a docstring: no quotes or backslashes that could end or escape it, and no
    character that is not printable (bidi controls such as U+202E, zero-width and other format
    characters, control characters, line and paragraph separators: Trojan Source) but as its escape,
    `\\u202e`, which the docstring decodes back to the character. Here, where the text enters the code,
    and not in the schema: it also holds the spec file's name, and text may rightly hold such characters."""
    text = " ".join(text.replace("\\", "/").replace('"""', "'''").replace('"', "'").split())
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in text)


def _memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return None


def check_example_inputs(graph: Graph) -> None:
    """Refuse, as a user error located at the input, to make example inputs that cannot fit in this
    machine's memory (`--run` makes them at the example sizes, which a spec may set to anything)."""
    have = _memory()
    if have is None:
        return
    summary = summarize(graph)
    need = 0
    for info in summary.inputs:
        n = DTYPE_BYTES[info.type.dtype]
        for d in info.example_shape:
            n *= d
        need += n
        if need > have:
            dims = ", ".join(f"{k}={v}" for k, v in sorted(summary.bindings.items()))
            raise SpecError(Diagnostic(graph.node(dict(graph.inputs)[info.name]).span,
                                       f"the example inputs need {need / 2**30:.1f} GiB at the example sizes "
                                       f"({dims}), more than this machine's {have / 2**30:.1f} GiB of memory, so "
                                       f"the built model cannot be run on them"))


def check_memory(graph: Graph, spec_file: str, copies: float = 1.0) -> None:
    """Refuse, as a user error, to allocate weights that cannot fit in this machine's memory (`copies`:
    how many float32-sized copies of them the caller holds at once)."""
    need = int(summarize(graph).param_bytes * copies)
    have = _memory()
    if have is None:
        return
    if need > have:
        raise SpecError(Diagnostic(Span(spec_file, 0, 0),
                                   f"the weights need {need / 2**30:.1f} GiB, more than this machine's "
                                   f"{have / 2**30:.1f} GiB of memory; `specc check` works at any size"))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def artifacts(graph: Graph, spec_text: str, spec_file: str, paper: str | None = None,
              description: str | None = None, weights: dict[str, torch.Tensor] | None = None,
              ctx: PassContext | None = None, torch_compile: bool = False) -> dict[str, bytes]:
    """Everything a build writes, as bytes: deterministic for the same graph, spec, seed and passes.

    `graph` is the unoptimised graph and `weights` its parameters (initialised from the seed when
    None); the passes of `ctx` (default: -O1) run here, and the optimised graph's parameters are
    computed from `weights`.
    """
    ctx = ctx or PassContext()
    if weights is None:
        check_memory(graph, spec_file)
        weights = init_weights(graph)
    before = summarize(graph)
    optimised, records = optimize(graph, ctx)
    state = materialise(optimised, weights)
    sha = sha256(spec_text)
    ties = [".".join(n.path + (p.name,)) for _, n in optimised.nodes() for p in n.params if p.tied_to]
    source = generate_source(optimised, header(optimised, optimised.name, spec_file, sha, paper, description,
                                               ties, torch_compile), _FOOTER + EXAMPLE_INPUTS)
    # the opt level says whose names these are: -O0's are the spec's parameters (what --weights takes)
    blob = st_save({k: v.contiguous() for k, v in sorted(state.items())},
                   metadata={"specc_opt_level": str(ctx.opt_level)})
    summary = summarize(optimised)
    manifest = {
        "name": optimised.name,
        "spec": {"file": Path(spec_file).name, "sha256": sha},
        "params": optimised.params,
        "dims": {s: {"example": ex, "min": lo, "max": hi} for s, (ex, lo, hi) in optimised.dims.items()},
        "inputs": [{"name": i["name"], "type": i["type"], "example_shape": i["example_shape"]}
                   for i in summary.to_json()["inputs"]],
        "outputs": summary.to_json()["outputs"],
        "parameter_count": summary.params,
        "trainable_parameter_count": summary.trainable_params,
        "flops": summary.to_json()["flops"],
        "example_flops": summary.example_flops,
        "seed": optimised.seed,
        "target": "torch",
        "opt_level": ctx.opt_level,
        "torch_compile": torch_compile,
        "inference": ctx.inference,
        "deploy": ctx.deploy,
        "passes": [r.to_json() for r in records if r.modified],
        "graph": {"nodes": [before.nodes, summary.nodes], "parameters": [before.params, summary.params],
                  "example_flops": [before.example_flops, summary.example_flops]},
        "files": {"model.py": sha256(source)},
        "versions": {"specc": VERSION, "torch": torch.__version__.split("+")[0]},
    }
    return {
        "model.py": source.encode(),
        "weights.safetensors": blob,
        "manifest.json": (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(),
    }


def write_atomic(out: Path, files: dict[str, bytes], *, force: bool = False, protect=(),
                 force_hint: str = "--force") -> None:
    """Write files into `out` so that a failure leaves no partial directory: build in a sibling
    temporary directory, then swap it in. An `out` that holds anything but an earlier specc build is
    an error unless `force`; one holding a `protect` path or the current directory, always (see
    specc.backends.outdir)."""
    from specc.backends.outdir import replace_folder

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    try:
        replace_folder(out, fill, force=force, protect=protect, force_hint=force_hint)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise SpecError(Diagnostic(Span(str(out), 0, 0), f"cannot write the build: {e.strerror or e}{where}")) from None


def import_model_module(directory: Path):
    """Import a generated model.py under a unique module name."""
    name = f"specc_generated_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, Path(directory) / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_in_memory(files: dict[str, bytes]) -> torch.nn.Module:
    """Build the module from artifacts through the very code `specc build` writes."""
    with tempfile.TemporaryDirectory(prefix="specc-") as d:
        for fname, data in files.items():
            (Path(d) / fname).write_bytes(data)
        module = import_model_module(Path(d))
        model = module.load(d)
    model.example_inputs = module.example_inputs  # convenience for callers
    return model
