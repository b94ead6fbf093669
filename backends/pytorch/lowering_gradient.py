"""PyTorch lowerings of the gradient-only operators (compiler/ops_gradient.py).

grad_reverse reads `GradReverse.apply(x, scale)` in generated code; the autograd Function is a helper
written into model.py, so the module stays standalone.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call


def _grad_reverse(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"GradReverse.apply({xs[0].text}, {xs[1].text})")


LOWERINGS: dict[str, Lowering] = {
    "grad_reverse": Lowering(_grad_reverse, helpers=("GradReverse",)),
}

HELPERS: dict[str, str] = {
    "GradReverse": '''
class GradReverse(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): the identity forward; backward, the incoming
    gradient times -scale. scale is a number or a 0-d tensor (e.g. the schedule's lambda_p); it gets
    no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale) -> torch.Tensor:
        ctx.scale = scale.detach() if isinstance(scale, torch.Tensor) else scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None
''',
}
