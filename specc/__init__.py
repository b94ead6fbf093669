"""specc: a declarative model-spec compiler.

    import specc
    model = specc.load("specs/gpt.yaml", d_model=128)   # a torch.nn.Module
    summary = specc.check("specs/gpt.yaml")             # outputs, parameters, FLOPs

Custom operators: `@specc.custom_op(...)` in a module of yours (see specc.custom).
"""

from specc.dsl.diagnostics import Diagnostic, Span, SpecError

from .api import build, check, compile, load
from .pruning import prune
from .custom import Arg, Init, OpCall, OpError, TensorType, custom_op

__version__ = "0.1.0"
__all__ = ["load", "check", "compile", "build", "prune", "custom_op", "Arg", "OpCall", "OpError", "TensorType", "Init",
           "SpecError", "Diagnostic", "Span", "__version__"]
