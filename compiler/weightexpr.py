"""Weight expressions: how a pass says what a new parameter's value is, without touching values.

The compiler never holds weights (it never imports torch). A pass that fuses parameters (merging
two linear maps, concatenating Q/K/V, folding a lookup table) gives each new parameter a
`derive` expression over the parameters of the graph it started from; a backend evaluates the
expressions on the real tensors, in float64, when it materialises the weights of the optimised graph.

Expressions are nested tuples, so they are hashable and print readably:

    ("param", "h.0.fc.weight")            an existing parameter (full name)
    ("matmul", a, b)                      a @ b
    ("add", a, b), ("mul", a, b)          elementwise, with broadcasting
    ("scale", a, 0.5)                     a * constant
    ("t", a)                              transpose of a matrix
    ("concat", dim, a, b, ...)            torch.cat along dim
    ("reshape", a, (shape...))            a.reshape(shape)
    ("rows", a, (i...))                   the rows (of a vector: the elements) i of a, in that order
    ("cols", a, (i...))                   the columns i of a matrix (structured pruning)
    ("rsqrt_add", a, eps)                 1 / sqrt(a + eps)
    ("zeros", (shape...)), ("ones", (shape...))
    ("pad_kernel", w, (before...), (size...))  a conv kernel zero-padded to `size`, `before` zeros first
    ("identity_kernel", (out, in, k...))  1 at the centre tap of channel o's own input, else 0 (input
                                          o mod in: a grouped conv's in is its inputs per group)
    ("eye", n)                            the n x n identity (the table of one_hot)
    ("onehot_product", (n1, n2, ...))     one row per combination, concatenated one-hots, last fastest
    ("chain", table, steps)               per-token ops applied to the rows of `table` (a folded
                                          lookup; steps are (op, attrs, ((param, expr), ...)))
"""

from __future__ import annotations

from typing import Iterator

OPS = frozenset({"param", "matmul", "add", "sub", "mul", "scale", "t", "concat", "reshape", "rsqrt_add", "zeros",
                 "ones", "chain", "pad_kernel", "identity_kernel", "eye", "onehot_product", "rows", "cols"})


def param(name: str) -> tuple:
    return ("param", name)


def sources(expr: tuple) -> Iterator[str]:
    """The parameter names an expression reads."""
    if expr[0] == "param":
        yield expr[1]
        return
    for a in expr[1:]:
        if isinstance(a, tuple) and a and a[0] in OPS:
            yield from sources(a)


def substitute(expr: tuple, derived: dict[str, tuple]) -> tuple:
    """Replace ("param", n) by derived[n] where a parameter is itself derived (passes compose)."""
    if expr[0] == "param":
        return derived.get(expr[1], expr)
    return (expr[0],) + tuple(substitute(a, derived) if isinstance(a, tuple) and a and a[0] in OPS else a
                              for a in expr[1:])


def rows(expr: tuple, index) -> tuple:
    """The rows `index` of `expr` (elements, for a vector)."""
    return ("rows", expr, tuple(int(i) for i in index))


def cols(expr: tuple, index) -> tuple:
    """The columns `index` of the matrix `expr`."""
    return ("cols", expr, tuple(int(i) for i in index))
