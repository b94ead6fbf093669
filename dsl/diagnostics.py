"""Source spans and located diagnostics.

Every error a user can cause is a `Diagnostic` with a `Span` pointing at the real line and column
of the spec file. `SpecError` carries one or more of them; `render` prints them as

    gpt.yaml:12:5: error: unknown operator 'lienar' (did you mean 'linear'?)
       12 |     h = lienar(x, 64)
          |         ^~~~~~

Nothing here knows about YAML, lark, torch or tvm.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Span:
    """A 1-based (line, column) range in a named source file. `end_*` are inclusive-exclusive."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line >= 1 else self.file

    def merge(self, other: "Span | None") -> "Span":
        """The smallest span covering both (used when passes fuse nodes)."""
        if other is None or other.file != self.file:
            return self
        a, b = sorted([self, other], key=lambda s: (s.line, s.col))
        ends = [(s.end_line or s.line, s.end_col or s.col + 1) for s in (self, other)]
        end = max(ends)
        return Span(self.file, a.line, a.col, end[0], end[1])


UNKNOWN = Span("<unknown>", 0, 0)


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    severity: str = "error"
    notes: tuple[str, ...] = ()

    def with_note(self, note: str) -> "Diagnostic":
        return Diagnostic(self.span, self.message, self.severity, self.notes + (note,))


class SpecError(Exception):
    """A user error in a spec (or its overrides): one or more located diagnostics."""

    def __init__(self, diagnostics: Diagnostic | Sequence[Diagnostic], sources: dict[str, str] | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        self.sources: dict[str, str] = dict(sources or {})
        super().__init__("\n".join(f"{d.span}: {d.severity}: {d.message}" for d in self.diagnostics))

    def render(self, color: bool = False) -> str:
        return render(self.diagnostics, self.sources, color=color)


@dataclass
class Collector:
    """Collects diagnostics so that every independent error is reported at once."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, span: Span, message: str, *notes: str) -> None:
        self.add(Diagnostic(span, message, "error", tuple(n for n in notes if n)))

    def add(self, d: Diagnostic) -> None:
        """Record `d` unless the same message at the same place is already recorded."""
        if all((e.span, e.message) != (d.span, d.message) for e in self.diagnostics):
            self.diagnostics.append(d)

    def extend(self, ds: Iterable[Diagnostic]) -> None:
        for d in ds:
            self.add(d)

    def __bool__(self) -> bool:
        return bool(self.diagnostics)

    def raise_if_any(self, sources: dict[str, str] | None = None) -> None:
        if self.diagnostics:
            raise SpecError(sorted(self.diagnostics, key=_order), sources)


def _order(d: Diagnostic):
    return (d.span.file, d.span.line, d.span.col)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A 'did you mean' suffix for an unknown name, or ''."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: Source lines longer than this are shown as a window around the caret.
MAX_SHOWN = 100


def render(diagnostics: Sequence[Diagnostic], sources: dict[str, str], color: bool = False) -> str:
    """Format diagnostics like a compiler: location, message, source line and a caret.

    Text from the spec (names in messages, the source line) is shown with control characters
    escaped, so a spec cannot send escape sequences to the terminal."""
    red, bold, reset, cyan = ("\x1b[31m", "\x1b[1m", "\x1b[0m", "\x1b[36m") if color else ("",) * 4
    out: list[str] = []
    for d in diagnostics:
        s = d.span
        out.append(f"{bold}{_printable(str(s))}: {red}{d.severity}:{reset}{bold} {_printable(d.message)}{reset}")
        text = sources.get(s.file)
        if text is not None and s.line >= 1:
            lines = text.splitlines()
            if s.line <= len(lines):
                src = "".join(c if c.isprintable() else " " if c == "\t" else "?" for c in lines[s.line - 1])
                col = max(1, s.col)
                width = 1
                if s.end_line == s.line and s.end_col and s.end_col > col:
                    width = s.end_col - col
                prefix = suffix = ""
                if len(src) > MAX_SHOWN:
                    start = max(0, min(col - 1 - MAX_SHOWN // 2, len(src) - MAX_SHOWN))
                    prefix, suffix = ("..." if start else ""), ("..." if start + MAX_SHOWN < len(src) else "")
                    src, col = src[start:start + MAX_SHOWN], col - start
                gutter = f"{s.line:>5} | "
                out.append(gutter + prefix + src + suffix)
                width = max(1, min(width, len(src) - col + 1))
                caret = "^" + "~" * (width - 1)
                out.append(" " * 6 + "| " + " " * (len(prefix) + col - 1) + f"{cyan}{caret}{reset}")
        for n in d.notes:
            out.append(f"      = note: {_printable(n)}")
    return "\n".join(out)


def _printable(text: str) -> str:
    """`text` with each unprintable character written as its escape, e.g. \\n or \\x1b."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
