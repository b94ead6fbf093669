"""Symbolic dimensions: integer polynomials over named symbols (B, T, ...).

A dimension is a plain `int` when it is known, else a `Sym`: a sum of integer-coefficient
monomials such as `2*B*T + 4`. Enough algebra for shapes: +, -, *, exact division, equality,
evaluation under a binding. Sums and products normalise, so `B*T == T*B`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence, Union

Monomial = tuple[str, ...]  # sorted symbol names, with repetition for powers


@dataclass(frozen=True)
class Sym:
    terms: tuple[tuple[Monomial, int], ...]  # sorted, no zero coefficients, at least one non-constant

    @staticmethod
    def of(name: str) -> "Sym":
        return Sym(((((name,)), 1),))

    # -- construction helpers ---------------------------------------------------------------
    @staticmethod
    def _norm(terms: dict[Monomial, int]) -> "Dim":
        items = tuple(sorted((m, c) for m, c in terms.items() if c != 0))
        if not items:
            return 0
        if len(items) == 1 and items[0][0] == ():
            return items[0][1]
        return Sym(items)

    def _dict(self) -> dict[Monomial, int]:
        return dict(self.terms)

    # -- arithmetic ------------------------------------------------------------------------
    def __add__(self, other: "Dim") -> "Dim":
        d = self._dict()
        for m, c in _terms(other).items():
            d[m] = d.get(m, 0) + c
        return Sym._norm(d)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return Sym._norm({m: -c for m, c in self.terms})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other if isinstance(other, Sym) else -other)

    def __rsub__(self, other: "Dim") -> "Dim":
        return (-self) + other

    def __mul__(self, other: "Dim") -> "Dim":
        d: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in _terms(other).items():
                m = tuple(sorted(m1 + m2))
                d[m] = d.get(m, 0) + c1 * c2
        return Sym._norm(d)

    __rmul__ = __mul__

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms, key=lambda t: (-len(t[0]), t[0])):
            body = "*".join(m)
            if not m:
                parts.append(str(c))
            elif c == 1:
                parts.append(body)
            elif c == -1:
                parts.append("-" + body)
            else:
                parts.append(f"{c}*{body}")
        return " + ".join(parts).replace("+ -", "- ")

    __repr__ = __str__

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s for m, _ in self.terms for s in m)


Dim = Union[int, Sym]


def _terms(d: Dim) -> dict[Monomial, int]:
    if isinstance(d, Sym):
        return d._dict()
    return {(): int(d)} if d else {}


def is_dim(x: object) -> bool:
    return isinstance(x, Sym) or (isinstance(x, int) and not isinstance(x, bool))


def div_exact(a: Dim, b: Dim) -> Dim | None:
    """a / b when it divides exactly (as polynomials), else None."""
    if isinstance(b, int):
        if b == 0:
            return None
        if isinstance(a, int):
            return a // b if a % b == 0 else None
        if all(c % b == 0 for _, c in a.terms):
            return Sym._norm({m: c // b for m, c in a.terms})
        return None
    if len(b.terms) != 1:
        return 1 if a == b else None
    (bm, bc), = b.terms
    out: dict[Monomial, int] = {}
    for m, c in _terms(a).items():
        rest = list(m)
        for s in bm:
            if s not in rest:
                return None
            rest.remove(s)
        if c % bc:
            return None
        out[tuple(rest)] = c // bc
    return Sym._norm(out)


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    """The integer value of a dimension under a binding of its symbols. KeyError if one is unbound."""
    if isinstance(d, int):
        return d
    total = 0
    for m, c in d.terms:
        v = c
        for s in m:
            v *= bindings[s]
        total += v
    return total


def symbols(d: Dim) -> frozenset[str]:
    return d.symbols if isinstance(d, Sym) else frozenset()


def fmt(d: Dim) -> str:
    s = str(d)
    return f"({s})" if isinstance(d, Sym) and len(d.terms) > 1 else s


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


def symbol_name(d: object) -> str | None:
    """The name of a dimension that is a single symbol (T), else None (an int, or an expression 2*T)."""
    if isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
        return d.terms[0][0][0]
    return None


def solve_for(d: Dim, known: Collection[str]) -> tuple[str, Dim, Dim] | None:
    """(S, a, rest) when d is a * S + rest: S the one symbol of d not in `known`, a degree-one factor
    of the terms it is in (a number >= 1, or a polynomial of known symbols: T * S), `rest` the other
    terms (a number, or a polynomial of known symbols), so that a size n of d gives S = (n - rest) // a.
    None when d has no unknown symbol or several, or S is in a power (S * S)."""
    if not isinstance(d, Sym):
        return None
    unknown = d.symbols - set(known)
    if len(unknown) != 1:
        return None
    (s,) = unknown
    factor: dict[Monomial, int] = {}
    rest: dict[Monomial, int] = {}
    for m, c in d.terms:
        if m.count(s) > 1:
            return None
        if s in m:
            i = m.index(s)
            factor[m[:i] + m[i + 1:]] = c
        else:
            rest[m] = c
    a = Sym._norm(factor)
    if isinstance(a, int) and a < 1:
        return None
    return s, a, Sym._norm(rest)


def solve_all(dims: Sequence[Dim], known: Iterable[str]) -> list[tuple[int, str, Dim, Dim]]:
    """(index, S, a, rest) for each symbol solve_for reads from `dims` beyond the `known` ones, in the
    order they can be read: sweeping `dims` in order, each solved symbol known from then on, until a
    sweep finds none; a symbol comes from the first dimension that gives it."""
    known = set(known)
    out: list[tuple[int, str, Dim, Dim]] = []
    progress = True
    while progress:
        progress = False
        for i, d in enumerate(dims):
            solved = solve_for(d, known)
            if solved is not None:
                known.add(solved[0])
                out.append((i, *solved))
                progress = True
    return out


def readable_symbols(dims: Iterable[Dim]) -> set[str]:
    """The symbols whose sizes input dimensions `dims` give: those that are a whole dimension, then
    those solve_all reads with them."""
    dims = list(dims)
    known = {n for n in map(symbol_name, dims) if n}
    return known | {s for _, s, _, _ in solve_all(dims, known)}


def to_json(d: Dim) -> int | str | list:
    """A dimension as plain data (manifests, generated files): an int, a symbol's name, or a polynomial
    as [[coefficient, [symbols]], ...]."""
    if isinstance(d, Sym):
        return symbol_name(d) or [[c, list(m)] for m, c in d.terms]
    return d
