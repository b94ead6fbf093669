"""The AST of graph bodies, block signatures, tensor types and expressions.

Frozen dataclasses; every node carries the `Span` of its text in the spec file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .diagnostics import Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Const:
    """A literal: int, float, str, bool or None."""

    value: int | float | str | bool | None
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % ** @ == != < <= > >= and or
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Unary:
    op: str  # - + not
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class IfExp:
    cond: "Expr"
    then: "Expr"
    other: "Expr"
    span: Span


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: "Expr"
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]
    span: Span

    @property
    def func_name(self) -> str | None:
        return self.func.id if isinstance(self.func, Name) else None


@dataclass(frozen=True)
class Slice:
    """start:stop or start:stop:step; a part left out is None."""

    start: "Expr | None"
    stop: "Expr | None"
    span: Span
    step: "Expr | None" = None


@dataclass(frozen=True)
class Ellipsis_:
    """`...` among indices: as many whole dimensions as the other indices leave (x[..., 0])."""

    span: Span


@dataclass(frozen=True)
class Index:
    value: "Expr"
    items: tuple["Expr | Slice", ...]
    span: Span


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    span: Span
    tuple_: bool = False


Expr = Union[Name, Const, BinOp, Unary, IfExp, Call, Index, ListExpr]


@dataclass(frozen=True)
class Assign:
    targets: tuple[Name, ...]
    value: Expr
    span: Span


@dataclass(frozen=True)
class Return:
    values: tuple[Expr, ...]
    span: Span


Stmt = Union[Assign, Return]


@dataclass(frozen=True)
class Body:
    """Statements of a graph or block body. After syntax errors, the statements that parsed:
    `broken` names what the broken lines assign (to treat as unknown, not as undefined), and
    `names_known` is False when a broken line's targets could not be read."""

    stmts: tuple[Stmt, ...]
    span: Span
    broken: tuple[str, ...] = ()
    complete: bool = True
    names_known: bool = True


@dataclass(frozen=True)
class Param:
    name: Name
    default: Expr | None


@dataclass(frozen=True)
class Signature:
    name: Name
    params: tuple[Param, ...]
    span: Span


@dataclass(frozen=True)
class TypeExpr:
    """`f32[B, T, 4 * d]` optionally followed by `in range(lo, hi)` for integer inputs."""

    dtype: Name
    dims: tuple[Expr, ...]
    range: Expr | None
    span: Span
