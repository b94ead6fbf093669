"""specc: a declarative model-spec compiler.

    import specc
    model = specc.load("specs/gpt.yaml", d_model=128)   # a torch.nn.Module
    summary = specc.check("specs/gpt.yaml")             # outputs, parameters, FLOPs
"""

from specc.dsl.diagnostics import Diagnostic, Span, SpecError

from .api import build, check, compile, load

__version__ = "0.1.0"
__all__ = ["load", "check", "compile", "build", "SpecError", "Diagnostic", "Span", "__version__"]
