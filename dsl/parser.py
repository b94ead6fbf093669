"""Text -> AST for graph bodies, block signatures, tensor types and expressions (lark, LALR).

Positions come from lark's `meta` and are mapped to the spec file through a `TextOrigin`, so an
error inside a `|` block scalar points at the real line. A body with several syntax errors reports
all of them: after an error, the offending logical line is blanked and the parse is retried; the
statements that parse are still returned (see `Body.broken`), so errors elsewhere are reported too.
Expressions nested deeper than `MAX_DEPTH` and numbers Python cannot hold are refused where they
stand, so that nothing downstream recurses without bound.
"""

from __future__ import annotations

import ast as pyast
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterator

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .diagnostics import Collector, Span
from .yamlpos import TextOrigin

_OPEN, _CLOSE = {"LPAR", "LSQB"}, {"RPAR", "RSQB"}
_MAX_ERRORS = 20
#: Deepest nesting of the syntax tree (statement, operators, calls) a body may have.
MAX_DEPTH = 100
MAX_INT_BITS = 1024  # the largest integer literal, as in the YAML layer
_TARGETS = re.compile(r"\s*([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=(?!=)")
#: A target anywhere on a line (not the tail of a longer name or of an attribute).
_TARGETS_ANYWHERE = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=(?!=)")

_PRETTY = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "a new line", "$END": "the end",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='",
    "COLON": "':'", "SEMICOLON": "';'", "ADD_OP": "'+' or '-'", "MUL_OP": "an operator",
    "UNARY_OP": "'-'", "COMP_OP": "a comparison", "POW_OP": "'**'",
}


class _BracketNewlines:
    """Post-lexer: newlines inside (...) or [...] are not statement separators."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        for tok in stream:
            if tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", start=["body", "signature", "tensor_type", "expression"],
                propagate_positions=True, postlex=_BracketNewlines(), maybe_placeholders=True)


class _ToAst(Transformer):
    def __init__(self, span_of: Callable[[object], Span], errors: Collector):
        super().__init__()
        self._span = span_of
        self._errors = errors

    def _s(self, meta) -> Span:
        return self._span(meta)

    # atoms
    @v_args(meta=True)
    def name(self, meta, children):
        return A.Name(str(children[0]), self._s(meta))

    @v_args(meta=True)
    def number(self, meta, children):
        text = str(children[0])
        value = float(text) if any(c in text for c in ".eE") else int(text)
        return A.Const(value, self._s(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return A.Const(pyast.literal_eval(str(children[0])), self._s(meta))  # a plain quoted literal only

    @v_args(meta=True)
    def true(self, meta, _):
        return A.Const(True, self._s(meta))

    @v_args(meta=True)
    def false(self, meta, _):
        return A.Const(False, self._s(meta))

    @v_args(meta=True)
    def none(self, meta, _):
        return A.Const(None, self._s(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return A.ListExpr(tuple(c for c in children if c is not None), self._s(meta))

    @v_args(meta=True)
    def tuple(self, meta, children):
        return A.ListExpr(tuple(c for c in children if c is not None), self._s(meta), tuple_=True)

    # operators
    @v_args(meta=True)
    def binop(self, meta, children):
        left, op, right = children
        return A.BinOp(str(op), left, right, self._s(meta))

    compare = binop

    @v_args(meta=True)
    def or_(self, meta, children):
        return A.BinOp("or", children[0], children[1], self._s(meta))

    @v_args(meta=True)
    def and_(self, meta, children):
        return A.BinOp("and", children[0], children[1], self._s(meta))

    @v_args(meta=True)
    def not_(self, meta, children):
        return A.Unary("not", children[0], self._s(meta))

    @v_args(meta=True)
    def unary(self, meta, children):
        op, operand = children
        return A.Unary(str(op), operand, self._s(meta))

    @v_args(meta=True)
    def ifexp(self, meta, children):
        then, cond, other = children
        return A.IfExp(cond, then, other, self._s(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, *rest = children
        args, kwargs = [], []
        for c in rest:
            if c is None:
                continue
            if kwargs and not isinstance(c, A.Keyword):  # as Python: f(k=1, x) would bind x by position
                self._errors.error(c.span, f"a positional argument after the keyword argument "
                                           f"'{kwargs[-1].name}=': give the keyword arguments last")
            (kwargs if isinstance(c, A.Keyword) else args).append(c)
        return A.Call(func, tuple(args), tuple(kwargs), self._s(meta))

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return A.Keyword(str(name), value, self._s(meta))

    @v_args(meta=True)
    def index(self, meta, children):
        value, *items = children
        return A.Index(value, tuple(i for i in items if i is not None), self._s(meta))

    @v_args(meta=True)
    def slice(self, meta, children):
        start, stop, step = (*children, None) if len(children) == 2 else children
        return A.Slice(start, stop, self._s(meta), step)

    @v_args(meta=True)
    def ellipsis(self, meta, children):
        return A.Ellipsis_(self._s(meta))

    # statements
    @v_args(meta=True)
    def targets(self, meta, children):
        return tuple(A.Name(str(t), self._span_tok(t)) for t in children)

    def _span_tok(self, tok: Token) -> Span:
        return self._span(tok)

    @v_args(meta=True)
    def assign(self, meta, children):
        targets, value = children
        return A.Assign(targets, value, self._s(meta))

    @v_args(meta=True)
    def return_stmt(self, meta, children):
        return A.Return(tuple(children), self._s(meta))

    @v_args(meta=True)
    def body(self, meta, children):
        return A.Body(tuple(c for c in children if c is not None), self._s(meta))

    @v_args(meta=True)
    def param(self, meta, children):
        name, default = children
        return A.Param(A.Name(str(name), self._span(name)), default)

    @v_args(meta=True)
    def signature(self, meta, children):
        name, *params = children
        return A.Signature(A.Name(str(name), self._span(name)),
                           tuple(p for p in params if p is not None), self._s(meta))

    @v_args(meta=True)
    def tensor_type(self, meta, children):
        dtype, *rest = children
        rng = rest[-1] if rest else None
        dims = tuple(d for d in rest[:-1] if d is not None)
        return A.TypeExpr(A.Name(str(dtype), self._span(dtype)), dims, rng, self._s(meta))

    def expression(self, children):
        return children[0]


def _span_fn(origin: TextOrigin):
    def span_of(meta) -> Span:
        line = getattr(meta, "line", None)
        if line is None:
            return origin.span(1, 1)
        return origin.span(line, meta.column, getattr(meta, "end_line", None), getattr(meta, "end_column", None))

    return span_of


def _describe(e: UnexpectedInput, parser: Lark) -> str:
    if isinstance(e, UnexpectedCharacters):
        return f"unexpected character {e.char!r}"
    if isinstance(e, UnexpectedEOF):
        return "unexpected end of text; an expression or a closing bracket is missing"
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    got = "the end" if tok.type == "$END" else ("a new line" if tok.type == "_NL" else repr(str(tok)))
    expected = sorted({_PRETTY.get(t, _literal(parser, t)) for t in e.expected if not t.startswith("__")})
    msg = f"syntax error: unexpected {got}"
    if tok.type == "_NL" or tok.type == "$END":
        msg = "syntax error: the statement ends too early"
    if expected and len(expected) <= 6:
        msg += f"; expected {', '.join(expected)}"
    return msg


def _literal(parser: Lark, term: str) -> str:
    try:
        pattern = parser.get_terminal(term).pattern
        return repr(pattern.value) if pattern.type == "str" else term
    except KeyError:
        return term


def _blank_line(text: str, line: int) -> tuple[str, int, int]:
    """Blank the logical line containing 1-based `line` (following open brackets), keeping newlines.
    Returns the new text and the first and last blanked lines."""
    lines = text.split("\n")
    i = max(0, min(line - 1, len(lines) - 1))
    depth = 0
    j = i
    while j < len(lines):
        code = lines[j].split("#", 1)[0]
        depth += sum(code.count(c) for c in "([") - sum(code.count(c) for c in ")]")
        lines[j] = " " * len(lines[j])
        if depth <= 0:
            break
        j += 1
    return "\n".join(lines), i + 1, min(j, len(lines) - 1) + 1


def _assigned(text: str) -> list[str] | None:
    """The names a broken statement line assigns, or None when they cannot be read from it: every
    `NAME =` and `A, B =` outside brackets, so that a line holding several statements (`;`, or a
    folded body's joined lines) gives them all."""
    names: list[str] = []
    code = text.split("#", 1)[0]
    for part in code.split(";"):
        if not part.strip() or part.strip().startswith("return"):
            continue
        if _TARGETS.match(part) is None:
            return None
    depth = 0
    pos = 0
    for m in _TARGETS_ANYWHERE.finditer(code):
        depth += sum(code.count(c, pos, m.start()) for c in "([{") - sum(code.count(c, pos, m.start()) for c in ")]}")
        pos = m.start()
        if depth <= 0:
            names.extend(n.strip() for n in m.group(1).split(","))
    return names


def _tree_problem(tree: Tree) -> tuple[int, int, str] | None:
    """The first place (line, column, message) where a parse tree nests too deep or holds a number
    Python cannot represent; None if there is none. Iterative, so any depth is safe to inspect."""
    stack: list[tuple[object, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Token):
            if node.type == "NUMBER":
                problem = _number_problem(str(node))
                if problem:
                    return node.line or 1, node.column or 1, problem
            continue
        if not isinstance(node, Tree):
            continue
        if depth > MAX_DEPTH:
            meta = node.meta
            return (getattr(meta, "line", 1), getattr(meta, "column", 1),
                    f"this expression is nested too deeply (more than {MAX_DEPTH} levels; each operator of "
                    f"a chain such as a + b + c is a level: split it into named steps)")
        stack.extend((c, depth + 1) for c in reversed(node.children))
    return None


def _number_problem(text: str) -> str | None:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:  # more digits than Python converts
        return f"the number {text[:20]}... has too many digits"
    if (isinstance(value, float) and not math.isfinite(value)) or \
            (isinstance(value, int) and value.bit_length() > MAX_INT_BITS):
        return f"the number {text if len(text) <= 20 else text[:20] + '...'} is too large"
    return None


def _brackets(text: str) -> Iterator[tuple[int, int, str]]:
    """(line, column, char) of every bracket outside strings and comments, 1-based."""
    for ln, raw in enumerate(text.split("\n"), start=1):
        quote = None
        for cn, ch in enumerate(raw, start=1):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "([)]":
                yield ln, cn, ch


def _open_at(text: str, line: int, col: int) -> list[tuple[int, int, str]]:
    """The brackets still open just before (line, col), outermost first."""
    stack: list[tuple[int, int, str]] = []
    for ln, cn, ch in _brackets(text):
        if (ln, cn) >= (line, col):
            break
        if ch in "([":
            stack.append((ln, cn, ch))
        elif stack:
            stack.pop()
    return stack


def _closing_line(text: str, opened: tuple[int, int, str]) -> int | None:
    """The line on which the bracket at `opened` is closed, or None if it never is."""
    depth = 0
    for ln, cn, ch in _brackets(text):
        if (ln, cn) < opened[:2]:
            continue
        depth += 1 if ch in "([" else -1
        if depth == 0:
            return ln
    return None


def _first_on_line(text: str, line: int, col: int) -> bool:
    lines = text.split("\n")
    return line <= len(lines) and not lines[line - 1][:col - 1].strip()


def parse(text: str, origin: TextOrigin, start: str, errors: Collector):
    """Parse `text` as `start` ('body', 'signature', 'tensor_type' or 'expression').

    Syntax errors go to `errors` (all of them, for bodies); returns the AST or None. A body with
    syntax errors still yields the statements that parse, marked incomplete (`Body.complete`).
    """
    parser = _parser()
    span_of = _span_fn(origin)
    attempt = text
    found = 0
    broken: list[str] = []
    names_known = True
    # A folded scalar (>) joins a body's lines into one: its syntax errors say so.
    hint = ("the body is a folded scalar (>), which joins its lines; write bodies as literal blocks (|)"
            if start == "body" and origin.source is not None and origin.source[3] == ">" else "")
    while True:
        try:
            tree = parser.parse(attempt + ("\n" if start == "body" else ""), start=start)
            problem = _tree_problem(tree)
            if problem is None:
                break
            line, col, message = problem
            errors.error(origin.span(line, col), message)
            opened = _open_at(attempt, line, col)
            blanked, first, last = _blank_line(attempt, opened[0][0] if opened else line)
        except UnexpectedInput as e:
            line, col = max(1, e.line or 1), max(1, e.column or 1)
            if isinstance(e, UnexpectedToken) and e.token.type == "$END":
                lines = text.rstrip("\n").split("\n")
                line, col = len(lines), len(lines[-1]) + 1 if lines else 1
            opened = _open_at(attempt, line, col)
            at_end = isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END")
            if opened and at_end:
                errors.error(origin.span(opened[-1][0], opened[-1][1]), f"'{opened[-1][2]}' is never closed")
                blanked, first, last = _blank_line(attempt, opened[0][0])
            elif opened and opened[0][0] < line:  # inside a statement that began on an earlier line
                close = _closing_line(attempt, opened[0])
                if close is None:
                    errors.error(origin.span(opened[-1][0], opened[-1][1]), f"'{opened[-1][2]}' is never closed")
                    # the error line most likely starts the next statement; keep it unless it does not
                    last = line - 1 if _first_on_line(attempt, line, col) else line
                else:
                    errors.error(origin.span(line, col), _describe(e, parser), hint)
                    last = close
                first = opened[0][0]
                lines = attempt.split("\n")
                for i in range(first - 1, min(last, len(lines))):
                    lines[i] = " " * len(lines[i])
                blanked = "\n".join(lines)
            else:
                errors.error(origin.span(line, col), _describe(e, parser), hint)
                blanked, first, last = _blank_line(attempt, line)
        found += 1
        if start != "body" or found >= _MAX_ERRORS or blanked == attempt:
            return None
        names = _assigned(attempt.split("\n")[first - 1])
        if names is None:
            names_known = False
        else:
            broken.extend(names)
        attempt = blanked
    try:
        result = _ToAst(span_of, errors).transform(tree)
    except VisitError as e:  # pragma: no cover - literals are checked before the transform
        errors.error(origin.span(1, 1), f"invalid literal: {e.orig_exc}")
        return None
    if found and isinstance(result, A.Body):
        result = A.Body(result.stmts, result.span, tuple(dict.fromkeys(broken)), False, names_known)
    return result


def walk(expr) -> Iterator:
    """All sub-expressions of an expression, depth first."""
    yield expr
    if isinstance(expr, A.BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, A.Unary):
        yield from walk(expr.operand)
    elif isinstance(expr, A.IfExp):
        for e in (expr.cond, expr.then, expr.other):
            yield from walk(e)
    elif isinstance(expr, A.Call):
        yield from walk(expr.func)
        for a in expr.args:
            yield from walk(a)
        for k in expr.kwargs:
            yield from walk(k.value)
    elif isinstance(expr, A.Index):
        yield from walk(expr.value)
        for i in expr.items:
            if isinstance(i, A.Slice):
                for e in (i.start, i.stop, i.step):
                    if e is not None:
                        yield from walk(e)
            elif not isinstance(i, A.Ellipsis_):
                yield from walk(i)
    elif isinstance(expr, A.ListExpr):
        for i in expr.items:
            yield from walk(i)


__all__ = ["parse", "walk", "Tree"]
