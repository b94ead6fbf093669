"""Operators that act on gradients only: the identity in the forward pass, something else backward.

grad_reverse is the gradient reversal layer of domain-adversarial training (Ganin & Lempitsky, 2015;
SEEDS.md row 10): features pass through unchanged, and the gradient flowing back is multiplied by
-lambda, so the feature extractor learns to confuse the domain classifier behind it. lambda is a
tensor (usually a scalar input of the spec, fed by the training schedule lambda_p = 2/(1+exp(-10p)) - 1)
or a number. Passes must keep it: it is not an identity to eliminate (no rule names it), and two reversals
of the same value with the same lambda may be computed once (cse), which leaves every gradient the same.
"""

from __future__ import annotations

from .ir import FLOAT_DTYPES, TensorType
from .ops import NUMBER_ARGS, need_float, shape_str
from .registry import Arg, OpCall, OpError, op

T = TensorType


@op("grad_reverse", Arg("x", "tensor"), Arg("scale", "tensor"), flops=lambda c, o: 0, category="layer")
def _grad_reverse(c: OpCall):
    """grad_reverse(x, scale): x unchanged forward; the gradient times -scale backward (DANN's gradient
    reversal layer). scale is a scalar tensor (e.g. an input `lambda_p: f32[]`) or a number."""
    x, scale = c.t("x"), c.t("scale")
    need_float(x, "grad_reverse")
    if scale.rank != 0 or scale.dtype not in FLOAT_DTYPES:
        raise OpError(f"grad_reverse: scale must be a float scalar (e.g. an input lambda_p: f32[] or a number), "
                      f"got {shape_str(scale)}", "scale")
    return T(x.dtype, x.shape)


NUMBER_ARGS["grad_reverse"] = ("scale",)  # grad_reverse(h, 0.5): the number becomes a scalar node
