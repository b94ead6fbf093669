"""PyTorch lowerings of the selection and indexing operators (compiler/ops_select.py)."""

from __future__ import annotations

from .lowering import ATOM, Ctx, Expr, Lowering, call


def _extreme(name: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        dim, keep = c.a("dim"), c.a("keepdim")
        if dim is None and not keep:
            return call(f"{xs[0].at(ATOM)}.{name}()")
        if dim is None:
            dim = tuple(range(c.x.rank))  # keepdim: the result has x's rank
        text = str(tuple(dim)) if isinstance(dim, (list, tuple)) else str(dim)
        return call(f"{xs[0].at(ATOM)}.{name}(dim={text}" + (", keepdim=True)" if keep else ")"))

    return lower


def _argmax(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"{xs[0].at(ATOM)}.argmax(dim={c.a('dim')}" + (", keepdim=True)" if c.a("keepdim") else ")"))


LOWERINGS: dict[str, Lowering] = {
    "amax": Lowering(_extreme("amax")),
    "amin": Lowering(_extreme("amin")),
    "argmax": Lowering(_argmax),
    "gather": Lowering(lambda c, xs: call(f"torch.gather({xs[0].text}, {c.a('dim')}, {c.as_index(1, xs[1])})")),
    "unsqueeze": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.unsqueeze({c.a('dim')})")),
}
