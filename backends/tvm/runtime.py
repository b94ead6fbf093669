"""Run a TVM-compiled specc model: the VM, its weights bound once, inputs and outputs by DLPack.

This file needs only `tvm` and `numpy` (torch when torch tensors are passed or wanted), so that
`export` can copy it beside the library (model_lib.so) as loader.py:

    from loader import load
    model = load("out/")                   # reads model_lib.so, weights.safetensors, tvm_manifest.json
    y = model(x)                           # x: torch tensor or numpy array; y: torch tensor(s)

The compiled function takes the data inputs, then the weights (in manifest order). When the build
lifted weight preprocessing out of the model (transposed matrices, summed biases), the function
`main_transform_params` turns the stored weights into what `main` takes; it runs once, at bind time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def physical_cores() -> int:
    """Physical CPU cores of this machine (psutil when installed, else Linux's topology files)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    try:
        cores = set()
        for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
            topo = cpu / "topology"
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


# TVM's runtime sizes its thread pool, when it starts, as half the logical CPUs on x86 (it assumes
# two hyper-threads per core): on a machine without SMT, such as this project's 2-core VM, every
# parallel kernel then ran on one thread. Unless the user chose (TVM_NUM_THREADS), use the physical
# cores. Takes effect if no TVM kernel has run in this process yet.
os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

MANIFEST = "tvm_manifest.json"

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays, with the standard library and numpy alone."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if dtype == "bfloat16":
            import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
        flat = np.frombuffer(data[base + start:base + end], dtype=np.dtype(dtype))
        out[name] = flat.reshape(info["shape"]).copy()
    return out


def device_of(kind: str) -> Any:
    return tvm.cuda(0) if kind in ("cuda", "gpu") else tvm.cpu(0)


def _to_tvm(x: Any, dev: Any) -> Any:
    """A TVM tensor on `dev` from a torch tensor (DLPack, no copy when already there) or an array."""
    if isinstance(x, tvm.runtime.Tensor):
        return x
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        import torch

        if isinstance(x, torch.Tensor):
            want = "cuda" if dev.dlpack_device_type() == 2 else "cpu"
            if x.device.type != want:
                x = x.to(want)
            x = x.contiguous()
            if x.data_ptr() % 64:  # e.g. sliced out of a file buffer: TVM's kernels assume 64-byte alignment
                x = x.clone()
            return tvm.runtime.from_dlpack(x)
        return tvm.runtime.from_dlpack(x)
    return tvm.runtime.tensor(np.ascontiguousarray(x), dev)


def _solvable(d: Any, dims: Mapping[str, int]) -> tuple[str, int, int] | None:
    """(S, a, b) for a manifest dimension [[coefficient, [symbols]], ...] that is a * S + b in the one
    symbol S it holds that `dims` lacks (S in no power), a and b at the sizes of `dims`; else None."""
    if not isinstance(d, list):
        return None
    unknown = _symbols_of(d) - set(dims)
    if len(unknown) != 1:
        return None
    (sym,) = unknown
    if any(symbols.count(sym) > 1 for _, symbols in d):
        return None
    a = _size([[c, [k for k in symbols if k != sym]] for c, symbols in d if sym in symbols], dims)
    b = _size([[c, symbols] for c, symbols in d if sym not in symbols], dims)
    return sym, a, b


def _size(d: Any, dims: Mapping[str, int]) -> int:
    """A manifest dimension (an int, a symbol, or [[coefficient, [symbols]], ...]) at the given sizes."""
    if isinstance(d, int):
        return d
    if isinstance(d, str):
        return dims[d]
    total = 0
    for coef, symbols in d:
        for sym in symbols:
            coef *= dims[sym]
        total += coef
    return total


def _symbols_of(d: Any) -> set[str]:
    return {d} if isinstance(d, str) else {s for _, syms in d for s in syms} if isinstance(d, list) else set()


def _show(d: Any) -> str:
    if not isinstance(d, list):
        return str(d)
    terms = sorted(d, key=lambda t: not t[1])  # the constant last: 2*T + 1
    return " + ".join("*".join(([str(c)] if c != 1 or not syms else []) + list(syms)) for c, syms in terms)


class Runner:
    """A compiled model: a Relax VM over the executable, with weights bound by name."""

    def __init__(self, executable: Any, manifest: Mapping[str, Any], device: Any | None = None):
        self.manifest = dict(manifest)
        self.device = device if device is not None else device_of(self.manifest["target_kind"])
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, self.device)
        self._main = self.vm[self.manifest["function"]]
        # static-shape copies of the function (tuned sizes): (dims, function), called on exact matches
        self._specialised = [(dict(s["dims"]), self.vm[s["function"]]) for s in self.manifest.get("specialised", [])]
        self.last_function = self.manifest["function"]
        self._weights: list[Any] | None = None
        self._keep: list[Any] = []  # the source tensors of DLPack views, kept alive

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["params"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def bind(self, weights: Mapping[str, Any]) -> "Runner":
        """Bind the weights (name -> torch tensor or numpy array), in the order the function takes them."""
        missing = [n for n in self.param_names if n not in weights]
        if missing:
            raise KeyError(f"weights missing for: {', '.join(missing)}")
        unexpected = sorted(set(weights) - set(self.param_names))
        if unexpected:
            raise KeyError(f"weights not in the model: {', '.join(unexpected)}")
        tensors, keep = [], []
        for p in self.manifest["params"]:
            w = weights[p["name"]]
            if tuple(w.shape) != tuple(p["shape"]):
                raise ValueError(f"weight {p['name']}: shape {tuple(w.shape)}, the model needs {tuple(p['shape'])}")
            keep.append(w)
            tensors.append(_to_tvm(w, self.device))
        if self.manifest.get("lifted"):
            out = self.vm[self.manifest.get("transform", self.manifest["function"] + "_transform_params")](tensors)
            tensors = [out[i] for i in range(len(out))]
        self._weights, self._keep = tensors, keep
        return self

    def _check(self, args: tuple) -> dict[str, int]:
        """Check the inputs against the manifest (ValueError, IndexError, TypeError); their symbolic sizes."""
        specs = self.manifest["inputs"]
        if len(args) != len(specs):
            raise TypeError(f"the model takes {len(specs)} input(s) ({', '.join(self.input_names)}), "
                            f"got {len(args)}")
        bounds = self.manifest.get("dims", {})
        for x, spec in zip(args, specs):
            if len(x.shape) != len(spec["shape"]):
                raise ValueError(f"input {spec['name']}: rank {len(x.shape)}, expected {len(spec['shape'])}")
        dims = self.dims_of(args)  # ValueError: an a * S + b axis whose size is not of that form
        first = {}  # a symbol that is a whole dimension: where its size was read (the first such input)
        for x, spec in zip(args, specs):
            for axis, d in enumerate(spec["shape"]):
                n = int(x.shape[axis])
                if isinstance(d, str):
                    first.setdefault(d, f"input {spec['name']}: dimension {axis} ({d})")
                    if n != dims[d]:  # one size per symbol across the inputs, as the torch module checks
                        raise ValueError(f"input {spec['name']}: dimension {axis} is {n}, but {first[d]} gives "
                                         f"{d}={dims[d]}")
                if isinstance(d, list) and _size(d, dims) != n:  # an expression of sizes the inputs give
                    raise ValueError(f"input {spec['name']}: dimension {axis} is {n}, but must be {_show(d)} = "
                                     f"{_size(d, dims)} with {', '.join(f'{k}={v}' for k, v in sorted(dims.items()))}")
                if isinstance(d, int) and n != d:
                    raise ValueError(f"input {spec['name']}: dimension {axis} is {n}, expected {d}")
        for sym, n in dims.items():
            # The symbolic sizes must respect the spec's bounds: memory may be planned for the maximum.
            if sym in bounds:
                lo, hi = bounds[sym]["min"], bounds[sym]["max"]
                if (lo is not None and n < lo) or (hi is not None and n > hi):
                    where = next(f"input {spec['name']}: dimension {axis} ({_show(d)})"
                                 for spec in specs for axis, d in enumerate(spec["shape"]) if sym in _symbols_of(d))
                    raise ValueError(f"{where} gives {sym}={n}, outside [{lo}, {'inf' if hi is None else hi}]")
        for x, spec in zip(args, specs):  # integer inputs in their declared range (ids index tables)
            vr, table = spec.get("value_range"), spec.get("index_range")
            if (vr is not None or table is not None) and _numel(x):
                lo, hi = int(x.min()), int(x.max())
                if vr is not None and (lo < vr[0] or hi >= vr[1]):
                    raise IndexError(f"input {spec['name']}: values must lie in range({vr[0]}, {vr[1]}), "
                                     f"got values from {lo} to {hi}")
                if vr is None and (lo < table[0] or hi >= table[1]):  # no declared range: the table's rows
                    raise IndexError(f"input {spec['name']}: values must lie in range({table[0]}, {table[1]}) "
                                     f"(it indexes {table[2]}), got values from {lo} to {hi}")
        return dims

    def dims_of(self, args: tuple) -> dict[str, int]:
        """The sizes of the symbolic dimensions, read from the inputs' shapes: a symbol that is a whole
        dimension somewhere is that dimension's size; one that appears only as a * S + b is solved for,
        a and b numbers or the sizes of symbols known so far (ValueError when the size is not of that
        form)."""
        dims: dict[str, int] = {}
        specs = self.manifest["inputs"]
        for x, spec in zip(args, specs):
            for axis, d in enumerate(spec["shape"]):
                if isinstance(d, str):
                    dims.setdefault(d, int(x.shape[axis]))
        progress = True
        while progress:  # a * S + b: solved once the other symbols' sizes are known
            progress = False
            for x, spec in zip(args, specs):
                for axis, d in enumerate(spec["shape"]):
                    form = _solvable(d, dims)
                    if form is None:
                        continue
                    sym, a, b = form
                    n = int(x.shape[axis])
                    if a < 1 or (n - b) % a or (n - b) // a < 1:
                        known = sorted(_symbols_of(d) - {sym})
                        given = f" with {', '.join(f'{k}={dims[k]}' for k in known)}" if known else ""
                        raise ValueError(f"input {spec['name']}: dimension {axis} is {n}, but must be {_show(d)} "
                                         f"for a whole {sym} >= 1{given}")
                    dims[sym] = (n - b) // a
                    progress = True
        return dims

    def run_tvm(self, *args: Any) -> Any:
        """Run on the inputs (in input order); the VM's outputs as TVM tensors (a tuple for several)."""
        if self._weights is None:
            raise RuntimeError("no weights bound: call bind(weights) first")
        dims = self._check(args)
        ins = [_to_tvm(x, self.device) for x in args]
        fn, self.last_function = self._main, self.manifest["function"]
        if self._specialised:
            for want, f in self._specialised:
                if want == dims:
                    fn, self.last_function = f, _spec_name(want)
                    break
        out = fn(*ins, *self._weights)
        if len(self.manifest["outputs"]) == 1:
            return out
        return tuple(out[i] for i in range(len(out)))

    def __call__(self, *args: Any) -> Any:
        """Run on torch tensors (or arrays); torch tensors out (one, or a tuple in output order)."""
        import torch

        out = self.run_tvm(*args)
        if isinstance(out, tuple):
            return tuple(torch.from_dlpack(o) for o in out)
        return torch.from_dlpack(out)


def _spec_name(dims: Mapping[str, int]) -> str:
    return "main__" + "_".join(f"{k}{int(v)}" for k, v in sorted(dims.items()))


def _numel(x: Any) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n


def load(directory: str | Path | None = None, device: Any | None = None) -> Runner:
    """The exported model in `directory` (by default, the folder of this file), weights bound."""
    directory = Path(__file__).resolve().parent if directory is None else Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    lib = tvm.runtime.load_module(str(directory / manifest["library"]))
    runner = Runner(lib, manifest, device)
    return runner.bind(read_safetensors(directory / manifest["weights"]))
