"""The user's own data: .npz and .csv files with declared fields, read and checked before training.

A field is declared with a tensor type whose first axis is the sample axis `N`, e.g.
`x: f32[N, 8]`, `label: i64[N] in range(10)`. Reading a file checks every declared field: present,
of a compatible dtype (floats for f32/f64, integers for integer types, booleans for bool), of the
declared shape, with values in the declared range, the same N for all fields, and N > 0. Each
problem is a located error (at the spec's field, or at the CSV's line and column); a .npz file is
read without pickle.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from specc.compiler.ir import FLOAT_DTYPES, INT_DTYPES
from specc.dsl import ast as A
from specc.dsl.diagnostics import Collector, Span
from specc.dsl.parser import parse
from specc.dsl.schema import DataFile, FieldDecl
from specc.dsl.yamlpos import Located, TextOrigin

from .data import FieldType
from .expr import ExprError, _eval

DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8, "i32": np.int32,
          "i64": np.int64, "u8": np.uint8, "bool": np.bool_}
MAX_FILE_BYTES = 2 << 30


def declared_fields(data: DataFile, doc: Located, params: dict[str, Any],
                    errors: Collector) -> tuple[dict[str, FieldType], dict[str, Span]]:
    """The declared fields' types (checked as types only; the file is not read here)."""
    fields: dict[str, FieldType] = {}
    spans: dict[str, Span] = {}
    suffix = Path(data.file).suffix.lower()
    if suffix not in (".npz", ".csv"):
        errors.error(doc.span(("train", "data", "file")), f"data: '{data.file}' is neither a .npz nor a .csv file")
    for name, decl in data.fields.items():
        text = decl.type if isinstance(decl, FieldDecl) else decl
        path = ("train", "data", "fields", name) + (("type",) if isinstance(decl, FieldDecl) else ())
        span = doc.span(path)
        spans[name] = span
        if isinstance(decl, FieldDecl) and decl.columns is not None and suffix != ".csv":
            errors.error(doc.key_span(path[:-1] + ("columns",)), "data: columns are for .csv files")
        origin = doc.origins.get(path) or TextOrigin(span.file, span.line, span.col, False, 0, span.col)
        t = parse(text, origin, "tensor_type", errors)
        if t is None:
            continue
        ty = _field_type(name, t, params, errors)
        if ty is not None:
            fields[name] = ty
            if suffix == ".csv":
                cols = decl.columns if isinstance(decl, FieldDecl) and decl.columns is not None else [name]
                width = int(np.prod(ty[1])) if ty[1] else 1
                if len(ty[1]) > 1 or width != len(cols):
                    errors.error(span, f"data: the CSV field '{name}' is {text}: it needs {width} column"
                                       f"{'s' if width != 1 else ''} (one per value of a sample, at most one axis "
                                       f"after N), and takes {len(cols)}")
    return fields, spans


def _field_type(name: str, t: A.TypeExpr, params: dict[str, Any], errors: Collector) -> FieldType | None:
    dtype = t.dtype.id
    if dtype not in DTYPES:
        errors.error(t.dtype.span, f"data: field '{name}': unknown dtype '{dtype}' ({', '.join(DTYPES)})")
        return None
    if not t.dims or not (isinstance(t.dims[0], A.Name) and t.dims[0].id == "N"):
        errors.error(t.span, f"data: field '{name}': the first axis must be the sample axis N, e.g. {dtype}[N, 8]")
        return None
    shape = []
    for d in t.dims[1:]:
        try:
            v = _eval(d, params, {})
        except ExprError as e:
            errors.error(e.span, f"data: field '{name}': {e.message} (axes after N are numbers or params)")
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            errors.error(d.span, f"data: field '{name}': an axis must be a positive integer, got {v!r}")
            return None
        shape.append(v)
    rng = None
    if t.range is not None:
        r = t.range
        try:
            bounds = [_eval(a, params, {}) for a in r.args] if isinstance(r, A.Call) and r.func_name == "range" \
                else None
        except ExprError as e:
            errors.error(e.span, f"data: field '{name}': {e.message}")
            return None
        if not bounds or len(bounds) > 2 or not all(isinstance(b, int) for b in bounds):
            errors.error(r.span, f"data: field '{name}': expected 'in range(hi)' or 'in range(lo, hi)'")
            return None
        rng = (0, bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1])
        if dtype not in INT_DTYPES:
            errors.error(r.span, f"data: field '{name}': only integer fields take a range")
    return dtype, tuple(shape), rng


def resolve(recipe) -> Path:
    """The data file's path: relative paths are taken from the spec file's folder."""
    path = Path(recipe.data_file.file)
    return path if path.is_absolute() else Path(recipe.file).resolve().parent / path


def load(recipe) -> dict[str, np.ndarray]:
    """Every declared field of the recipe's data file, checked; raises SpecError with each problem."""
    errors = Collector()
    path = resolve(recipe)
    where = recipe.file_origin or recipe.span
    arrays: dict[str, np.ndarray] = {}
    try:
        if path.exists() and not path.is_file():
            errors.error(where, f"data: '{recipe.data_file.file}' is not a regular file")
        elif path.stat().st_size > MAX_FILE_BYTES:
            errors.error(where, f"data: '{recipe.data_file.file}' is larger than {MAX_FILE_BYTES >> 30} GiB")
        elif path.suffix.lower() == ".npz":
            arrays = _read_npz(path, recipe, errors, where)
        else:
            arrays = _read_csv(path, recipe, errors, where)
    except OSError as e:
        errors.error(where, f"data: cannot read '{recipe.data_file.file}': {e.strerror or e}")
    errors.raise_if_any(recipe.sources)
    _check(arrays, recipe, errors)
    errors.raise_if_any(recipe.sources)
    return {k: arrays[k].astype(DTYPES[recipe.fields[k][0]]) for k in recipe.fields}


def _read_npz(path: Path, recipe, errors: Collector, where: Span) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            out = {}
            for name in recipe.fields:
                if name not in names:
                    errors.error(recipe.field_spans[name], f"data: '{recipe.data_file.file}' has no array '{name}'",
                                 f"arrays: {', '.join(names) or 'none'}")
                    continue
                out[name] = z[name]
            return out
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        errors.error(where, f"data: '{recipe.data_file.file}' is not a readable .npz file ({e})")
        return {}


def _read_csv(path: Path, recipe, errors: Collector, where: Span) -> dict[str, np.ndarray]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        errors.error(where, f"data: '{recipe.data_file.file}' is empty")
        return {}
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    out = {}
    for name, decl in recipe.data_file.fields.items():
        if name not in recipe.fields:
            continue
        cols = decl.columns if isinstance(decl, FieldDecl) and decl.columns is not None else [name]
        missing = [c for c in cols if c not in header]
        if missing:
            errors.error(recipe.field_spans[name], f"data: '{recipe.data_file.file}' has no column "
                                                   f"{', '.join(repr(m) for m in missing)}",
                         f"columns: {', '.join(header)}")
            continue
        dtype = recipe.fields[name][0]
        values = np.empty((len(body), len(cols)), dtype=np.float64)
        for i, row in enumerate(body):
            for j, c in enumerate(cols):
                k = header.index(c)
                cell = row[k].strip() if k < len(row) else ""
                try:
                    v = _cell(cell, dtype)
                except ValueError:
                    line = _line_of(text, rows, body[i])
                    col = sum(len(x) + 1 for x in row[:k]) + 1 if k < len(row) else 1
                    kind = "a number" if dtype in FLOAT_DTYPES else "true/false/0/1" if dtype == "bool" else \
                        "an integer"
                    errors.error(Span(str(path), line, col, line, col + max(1, len(cell))),
                                 f"data: column '{c}' (field '{name}', {dtype}): expected {kind}, got {cell!r}")
                    return {}
                values[i, j] = v
        shape = recipe.fields[name][1]
        out[name] = values.reshape((len(body),) + shape).astype(DTYPES[dtype])
    return out


def _cell(cell: str, dtype: str) -> float:
    if dtype == "bool":
        if cell.lower() in ("true", "1"):
            return 1.0
        if cell.lower() in ("false", "0"):
            return 0.0
        raise ValueError(cell)
    if dtype in FLOAT_DTYPES:
        return float(cell)
    v = float(cell)
    if not v.is_integer():
        raise ValueError(cell)
    return v


def _line_of(text: str, rows: list, row: list) -> int:
    """The 1-based line of a CSV row (rows hold no quoted new lines in the common case)."""
    target = ",".join(row)
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip() == target.strip():
            return i
    return rows.index(row) + 1


def _check(arrays: dict[str, np.ndarray], recipe, errors: Collector) -> None:
    counts = {}
    for name, a in arrays.items():
        dtype, shape, rng = recipe.fields[name]
        at = recipe.field_spans[name]
        kind = a.dtype.kind
        ok = kind == "f" if dtype in FLOAT_DTYPES else kind == "b" if dtype == "bool" else kind in "iu"
        if dtype in FLOAT_DTYPES and kind in "iu":
            ok = True  # integers read as floats exactly enough; floats are never read as integers
        if not ok:
            errors.error(at, f"data: the field '{name}' is declared {dtype} but '{recipe.data_file.file}' holds "
                             f"{a.dtype}")
            continue
        if tuple(a.shape[1:]) != shape or a.ndim == 0:
            errors.error(at, f"data: the field '{name}' is declared [N{''.join(f', {d}' for d in shape)}] but the "
                             f"array has shape {list(a.shape)}")
            continue
        if a.shape[0] == 0:
            errors.error(at, f"data: the field '{name}' is empty (no samples)")
            continue
        if dtype in FLOAT_DTYPES and not np.isfinite(a).all():
            errors.error(at, f"data: the field '{name}' holds NaN or infinite values")
        if rng is not None and (a.min() < rng[0] or a.max() >= rng[1]):
            errors.error(at, f"data: the field '{name}' has values in [{a.min()}, {a.max()}], outside range"
                             f"({rng[0]}, {rng[1]})")
        counts[name] = a.shape[0]
    if len(set(counts.values())) > 1:
        errors.error(recipe.file_origin or recipe.span, "data: the fields have different numbers of samples: "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()))
