"""The Python API: load(), check(), compile(), build().

Each takes a spec as a path or as YAML text, plus parameter overrides as keyword arguments, and
raises `SpecError` (with every located diagnostic) on a user error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

from specc.compiler.frontend import compile_source
from specc.compiler.ir import Graph
from specc.compiler.passes import PassContext, optimize
from specc.compiler.summary import Summary, summarize
from specc.dsl.diagnostics import Diagnostic, Span, SpecError
from specc.dsl.schema import SpecSource


def read_source(path_or_text: str | Path) -> tuple[str, str]:
    """(text, file name) for a path or for spec text given directly."""
    if isinstance(path_or_text, Path) or ("\n" not in str(path_or_text) and
                                          str(path_or_text).endswith((".yaml", ".yml"))):
        path = Path(path_or_text)
        try:
            data = path.read_bytes()
        except OSError as e:
            reason = e.strerror or str(e)
            raise SpecError(Diagnostic(Span(str(path), 0, 0), f"cannot read spec file: {reason}")) from None
        try:
            return data.decode("utf-8"), str(path)
        except UnicodeDecodeError as e:
            before = data[:e.start]
            line = before.count(b"\n") + 1
            col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
            raise SpecError(Diagnostic(Span(str(path), line, col),
                                       f"the spec file is not UTF-8 text (byte 0x{data[e.start]:02x})")) from None
    return str(path_or_text), "<spec>"


def compile(path_or_text: str | Path, *, allow_imports: Iterable[str] = (),  # noqa: A001 - the public name
            overrides: dict[str, Any] | None = None, **more_overrides: Any) -> Graph:
    """The typed IR of a spec. allow_imports: the modules of the spec's `imports:` you allow it to
    import (they run as Python code and may declare custom operators)."""
    return _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)[1]


def check(path_or_text: str | Path, *, allow_imports: Iterable[str] = (), overrides: dict[str, Any] | None = None,
          **more_overrides: Any) -> Summary:
    """Parse, elaborate and infer every shape, and check the training recipe (the train: section) if
    there is one; the summary (outputs, parameters, FLOPs), with the deploy graph's in `.deploy` when
    the spec has training-only outputs."""
    src, graph = _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)
    if src.spec.train is not None:
        from specc.train.recipe import check_recipe

        check_recipe(src, graph)
    return summary_of(graph)


def summary_of(graph: Graph) -> Summary:
    summary = summarize(graph)
    if graph.training_outputs:
        deployed, _ = optimize(graph, PassContext(opt_level=0, deploy=True))
        summary = dataclasses.replace(summary, deploy=summarize(deployed))
    return summary


def load(path_or_text: str | Path, *, opt_level: int = 1, deploy: bool = False,
         weights: Mapping[str, Any] | None = None, allow_imports: Iterable[str] = (),
         overrides: dict[str, Any] | None = None, **more_overrides: Any):
    """The model as a torch.nn.Module (eval mode), built through the same code `specc build` writes.

    Parameter overrides come as keyword arguments (or as `overrides=`, for a param whose name
    clashes with an argument of this function). opt_level as in `specc build -O`.
    weights: {parameter name: tensor} for some parameters of the unoptimised (-O0) graph, as
    `specc ir -O0` names them; the rest keep their seeded initialisation.
    allow_imports: the modules of the spec's `imports:` you allow it to import.
    """
    from specc.backends.pytorch.build import artifacts, load_in_memory

    src, graph = _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)
    return load_in_memory(artifacts(graph, src.text, src.file, src.spec.paper, src.spec.description,
                                    weights=given_weights(graph, weights),
                                    ctx=PassContext(opt_level=opt_level, deploy=deploy)))


def build(path_or_text: str | Path, out: str | Path, *, opt_level: int = 1, disabled: tuple[str, ...] = (),
          deploy: bool = False, torch_compile: bool = False, weights: Mapping[str, Any] | None = None,
          allow_imports: Iterable[str] = (), overrides: dict[str, Any] | None = None, force: bool = False,
          **more_overrides: Any) -> Path:
    """Write model.py, weights.safetensors and manifest.json into `out` (atomically).
    weights and allow_imports as for `load`. An existing `out` must be empty or an earlier specc build
    (else a SpecError), unless `force`; never the current directory or a folder holding the spec."""
    from specc.backends.pytorch.build import artifacts, write_atomic

    src, graph = _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)
    ctx = PassContext(opt_level=opt_level, disabled=frozenset(disabled), deploy=deploy)
    write_atomic(Path(out), artifacts(graph, src.text, src.file, src.spec.paper, src.spec.description,
                                      weights=given_weights(graph, weights), ctx=ctx, torch_compile=torch_compile),
                 force=force, protect=(src.file,), force_hint="force=True")
    return Path(out)


def given_weights(graph: Graph, weights: Mapping[str, Any] | None, source: str = "<weights>"):
    """All parameters of the unoptimised `graph`: the given tensors, and the seeded initialisation
    for the rest (None when nothing is given). Raises SpecError on unknown names or wrong shapes."""
    if weights is None:
        return None
    from specc.backends.pytorch.weights import merge_given

    if not isinstance(weights, Mapping):
        raise SpecError(Diagnostic(Span(source, 0, 0), "weights must map parameter names to tensors"))
    return merge_given(graph, weights, source)


def _front(path_or_text: str | Path, overrides: dict[str, Any],
           override_text: dict[str, tuple[str, Span]] | None = None,
           allow_imports: Iterable[str] = ()) -> tuple[SpecSource, Graph]:
    text, file = read_source(path_or_text)
    allow = tuple(allow_imports)
    if isinstance(allow_imports, str):
        raise TypeError("allow_imports takes a list of module names, e.g. ['my_ops']")
    if not allow:
        return compile_source(text, file, overrides, override_text)
    from specc.compiler.elaborate import elaborate
    from specc.compiler.verify import verify
    from specc.dsl.schema import read_spec

    src = read_spec(text, file)  # compile_source, with the imports the caller allows
    graph = elaborate(src, overrides, override_text, allow_imports=allow)
    verify(graph)
    return src, graph
