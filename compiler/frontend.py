"""The front end in one call: spec text -> validated YAML layer -> typed, verified Graph."""

from __future__ import annotations

from typing import Any, Mapping

from specc.dsl.diagnostics import Span
from specc.dsl.schema import SpecSource, read_spec

from .elaborate import elaborate
from .ir import Graph
from .verify import verify


def compile_source(text: str, file: str, overrides: Mapping[str, Any] | None = None,
                   override_text: Mapping[str, tuple[str, Span]] | None = None) -> tuple[SpecSource, Graph]:
    """Parse, validate and elaborate a spec. Raises SpecError (every problem, located)."""
    src = read_spec(text, file)
    graph = elaborate(src, overrides, override_text)
    verify(graph)
    return src, graph
