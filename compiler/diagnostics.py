"""Located diagnostics, for the layers that may not import dsl/ directly (backends/)."""

from specc.dsl.diagnostics import Collector, Diagnostic, Span, SpecError, did_you_mean, render

__all__ = ["Collector", "Diagnostic", "Span", "SpecError", "did_you_mean", "render"]
