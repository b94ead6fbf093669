"""PyTorch lowering of detach (compiler/ops_detach.py): `x.detach()` in generated code."""

from __future__ import annotations

from .lowering import ATOM, Ctx, Expr, Lowering, call


def _detach(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"{xs[0].at(ATOM)}.detach()")


LOWERINGS: dict[str, Lowering] = {"detach": Lowering(_detach)}
