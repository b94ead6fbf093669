"""PyTorch lowerings of the image geometry operators (compiler/ops_image.py)."""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call


def _rot90(c: Ctx, xs: list[Expr]) -> Expr:
    a, b = c.a("dims")
    return call(f"torch.rot90({xs[0].text}, {c.a('k') % 4}, ({a}, {b}))")


LOWERINGS: dict[str, Lowering] = {"rot90": Lowering(_rot90)}
