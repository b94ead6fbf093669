"""YAML read with positions, safely.

Spec files are untrusted. The YAML is *composed* (never constructed) with PyYAML's safe composer,
then turned into plain Python data by hand, accepting only the core tags (str, int, float, bool,
null, seq, map). Anything else (`!!python/object`, custom tags, merge keys, anchors and aliases,
control characters made by escapes) is refused with a located error, so no YAML feature can
execute code or blow up memory; files that are too large or nest too deep are refused too.

Alongside the data, a `Located` document records the span of every value and key (by path), and
for string scalars an origin that maps a (line, column) inside the string to the spec file, also
for `|` block scalars, so errors inside graph bodies point at the real line.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .diagnostics import Collector, Diagnostic, Span, SpecError

Path = tuple[Any, ...]

_T = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_T + "str", _T + "int", _T + "float", _T + "bool", _T + "null", _T + "timestamp"}
_MAX_NODES = 200_000
#: The YAML 1.2 core schema's plain scalars, by which a spec file is read. (PyYAML resolves by
#: YAML 1.1, where `no`, `on` and `y` are booleans, `010` is 8, `1_000` and `1:30` are integers
#: and `1e-5` is text.) A plain scalar matching none of these is a string.
_YAML12 = (
    (_T + "null", re.compile(r"~|null|Null|NULL|")),
    (_T + "bool", re.compile(r"true|True|TRUE|false|False|FALSE")),
    (_T + "int", re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")),
    (_T + "float", re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                              r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")),
)
_YAML12_TAG = dict(_YAML12)
_MAX_DEPTH = 64  # nesting of mappings and lists; real specs use four or five levels
_MAX_CHARS = 1_000_000


@dataclass(frozen=True)
class TextOrigin:
    """Where a string scalar's text lies in the file, to map positions inside it."""

    file: str
    line: int  # 1-based line of the first character of the content
    col: int  # 1-based column of the first character of the content
    block: bool  # literal block scalar: content line i is file line `line + i`, shifted by `col - 1`
    #: For other scalars: how many leading characters of the text stand unchanged in the file from
    #: (line, col) on; beyond them (escapes, folded lines) `source` maps them, or the best we know
    #: is the scalar's start.
    exact: int | None = None
    start_col: int | None = None  # column of the scalar itself (its opening quote, if quoted)
    #: (file lines, 0-based line and column of the content's start, scalar style, text): read, when
    #: a position beyond `exact` is asked for, to align the text with the file (`_align`).
    source: tuple[list[str], int, int, str | None, str] | None = field(default=None, compare=False, repr=False)

    def span(self, line: int, col: int, end_line: int | None = None, end_col: int | None = None) -> Span:
        """Map a 1-based (line, col) inside the string to the file."""
        if self.block:
            shift = self.col - 1
            return Span(self.file, self.line + line - 1, col + shift,
                        None if end_line is None else self.line + end_line - 1,
                        None if end_col is None else end_col + shift)
        exact = self.exact
        if line == 1 and (exact is None or col <= exact + 1):
            shift = self.col - 1
            keep_end = end_line == 1 and end_col is not None and (exact is None or end_col <= exact + 1)
            if keep_end or end_line is None or self.source is None:
                return Span(self.file, self.line, col + shift, self.line if keep_end else None,
                            end_col + shift if keep_end else None)
        if self.source is not None:
            table, starts = self._aligned
            at = _lookup(table, starts, line, col)
            if at is not None:
                last = None if end_line is None or end_col is None else _lookup(table, starts, end_line, end_col - 1)
                if last is not None and last >= at:
                    return Span(self.file, at[0] + 1, at[1] + 1, last[0] + 1, last[1] + 2)
                return Span(self.file, at[0] + 1, at[1] + 1)
        return Span(self.file, self.line, self.start_col or self.col)  # the best we know is its start

    @cached_property
    def _aligned(self) -> tuple[list[tuple[int, int] | None], list[int]]:
        lines, line0, col0, style, text = self.source
        starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                starts.append(i + 1)
        return _align(text, lines, line0, col0, style), starts


def _lookup(table: list, starts: list[int], line: int, col: int) -> tuple[int, int] | None:
    """The file position of the character at 1-based (line, col) of a text, from its `_align` table."""
    if not 1 <= line <= len(starts) or col < 1:
        return None
    i = starts[line - 1] + col - 1
    if i < len(table):
        return table[i]
    if i == len(table) and table and table[-1] is not None:  # just past the end
        return table[-1][0], table[-1][1] + 1
    return None


_ESCAPE_CHARS = {"x": 4, "u": 6, "U": 10}  # a double-quoted escape's length in the file, by its letter


def _align(text: str, lines: list[str], line: int, col: int, style: str | None) -> list[tuple[int, int] | None]:
    """The file's 0-based (line, column) of each character of a flow or folded scalar's `text`, whose
    content starts at (line, col). Folding and escapes change only where text stands, so the text is
    walked beside the file: a character that is not blank is found after the blanks, line breaks and
    escaped line breaks that folding removed; a blank that is not in the file (a folded line break)
    stands where the file's line ends; an escape (a double-quoted `\\n`, a single-quoted '') is the
    character it makes. Should the two ever part, the rest of the text is unmapped (None)."""
    out: list[tuple[int, int] | None] = []

    def here() -> str:
        return "" if line >= len(lines) else lines[line][col] if col < len(lines[line]) else "\n"

    def step(n: int = 1) -> None:
        nonlocal line, col
        if col < len(lines[line]):
            col += n
        else:
            line, col = line + 1, 0

    for ch in text:
        if ch in " \t\n" and here() not in ("", "\\"):
            out.append((line, col))
            if here() == ch:
                step()
            continue  # else a folded line break: it stands at the line's end
        while here() in (" ", "\t", "\n") or (style == '"' and here() == "\\" and col + 1 == len(lines[line])):
            step(2 if here() == "\\" else 1)
        got = here()
        if style == '"' and got == "\\":
            out.append((line, col))
            step(_ESCAPE_CHARS.get(lines[line][col + 1], 2))
        elif style == "'" and ch == "'" and lines[line][col:col + 2] == "''":
            out.append((line, col))
            step(2)
        elif got == ch:
            out.append((line, col))
            step()
        else:
            break
    return out + [None] * (len(text) - len(out))


@dataclass
class Located:
    """Plain data plus the spans of its parts, addressed by path tuples such as ('params', 'd')."""

    data: Any
    file: str
    text: str
    spans: dict[Path, Span] = field(default_factory=dict)
    key_spans: dict[Path, Span] = field(default_factory=dict)
    origins: dict[Path, TextOrigin] = field(default_factory=dict)

    def span(self, path: Path) -> Span:
        """Span of the value at `path`, or of its nearest located ancestor."""
        path = tuple(path)
        while path:
            if path in self.spans:
                return self.spans[path]
            path = path[:-1]
        return self.spans.get((), Span(self.file, 1, 1))

    def key_span(self, path: Path) -> Span:
        return self.key_spans.get(tuple(path)) or self.span(path)


def _mark_span(file: str, node: Node) -> Span:
    s, e = node.start_mark, node.end_mark
    return Span(file, s.line + 1, s.column + 1, e.line + 1, e.column + 1)


def _origin(file: str, node: ScalarNode, lines: list[str]) -> TextOrigin:
    m = node.start_mark
    if node.style == "|":
        # Content begins on the line after the indicator. Its indentation is what the file line
        # has in front of the content line (this also holds for an explicit indicator such as |2).
        header = m.line  # 0-based line of the '|'
        indent = 0
        for i, content in enumerate(node.value.split("\n")):
            raw = lines[header + 1 + i] if header + 1 + i < len(lines) else ""
            if content.strip() and raw.endswith(content):
                indent = len(raw) - len(content)
                break
        return TextOrigin(file, header + 2, indent + 1, True)
    if node.style == ">":  # folded: content begins on the line after the indicator
        return TextOrigin(file, m.line + 2, 1, False, 0, m.column + 1,
                          (lines, m.line + 1, 0, ">", node.value))
    quote = 1 if node.style in ("'", '"') else 0
    first = lines[m.line][m.column + quote:] if m.line < len(lines) else ""
    exact = 0
    for a, b in zip(node.value, first):
        if a != b or (quote and a in "\\'\""):
            break
        exact += 1
    source = None if exact == len(node.value) else (lines, m.line, m.column + quote, node.style, node.value)
    return TextOrigin(file, m.line + 1, m.column + 1 + quote, False, exact, m.column + 1, source)


def _scalar(tag: str, value: str) -> bool | int | float:
    """A YAML 1.2 core bool, int or float (`value` matches its form in `_YAML12`)."""
    if tag == _T + "bool":
        return value.lower() == "true"
    if tag == _T + "int":
        sign, digits = (-1, value[1:]) if value[0] == "-" else (1, value.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)
    low = value.lower().lstrip("+")
    if low.endswith((".inf", ".nan")):
        return float(low.replace(".", ""))
    return float(value)


class _TooDeep(Exception):
    def __init__(self, mark):
        super().__init__()
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer, refusing anchors and aliases where they stand (located, all of
    them) and nesting deeper than `_MAX_DEPTH` (the composer recurses once per level)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.depth = 0
        self.refused: list[tuple[int, int, int, str]] = []  # (0-based line, column, length, message)

    def resolve(self, kind, value, implicit):
        if kind is ScalarNode and implicit[0]:  # a plain scalar: the YAML 1.2 core schema
            if value == "<<":
                return _T + "merge"  # refused where it stands
            return next((tag for tag, form in _YAML12 if form.fullmatch(value)), _T + "str")
        return super().resolve(kind, value, implicit)

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.get_event()
            m = event.start_mark
            self.refused.append((m.line, m.column, 1 + len(event.anchor),
                                 "YAML aliases (*name) are not allowed in spec files"))
            return ScalarNode(_T + "null", "", m, event.end_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            m = event.start_mark
            self.refused.append((m.line, m.column, 1 + len(event.anchor),
                                 "YAML anchors (&name) are not allowed in spec files"))
            event.anchor = None  # not recorded, so a repeated anchor name is no second error
        self.depth += 1
        try:
            if self.depth > _MAX_DEPTH:
                raise _TooDeep(event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, file: str) -> Located:
    """Compose `text` safely into a `Located` document. Raises SpecError on any YAML problem."""
    sources = {file: text}
    if len(text) > _MAX_CHARS:
        raise SpecError(_diag(Span(file, 1, 1), f"the spec file is too large ({len(text)} characters; "
                                                f"at most {_MAX_CHARS})"), sources)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except _TooDeep as e:
        raise SpecError(_diag(Span(file, e.mark.line + 1, e.mark.column + 1),
                              f"the spec nests mappings or lists more than {_MAX_DEPTH} levels deep"),
                        sources) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(file, mark.line + 1, mark.column + 1) if mark else Span(file, 1, 1)
        problem = e.problem or e.context or "invalid YAML"
        raise SpecError(_diag(span, f"YAML syntax error: {problem}"), sources) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. a control character
        raise SpecError(_diag(_position_span(file, text, e.position),
                              f"YAML error: character {_char_name(e.character)} is not allowed in a spec file"),
                        sources) from None
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error above is marked or a reader error
        raise SpecError(_diag(Span(file, 1, 1), f"YAML error: {e}"), sources) from None
    if root is None:
        raise SpecError(_diag(Span(file, 1, 1), "the spec file is empty"), sources)

    doc = Located(None, file, text)
    errors = Collector()
    for line, col, length, message in loader.refused:
        errors.error(Span(file, line + 1, col + 1, line + 1, col + 1 + length), message)
    lines = text.splitlines()
    seen: set[int] = set()

    def convert(node: Node, path: Path) -> Any:
        if id(node) in seen:
            errors.error(_mark_span(file, node), "YAML aliases (*name) are not allowed in spec files")
            return None
        seen.add(id(node))
        if len(seen) > _MAX_NODES:
            raise SpecError(_diag(_mark_span(file, node), "the spec file is too large"), sources)
        span = _mark_span(file, node)
        doc.spans[path] = span
        if isinstance(node, ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                errors.error(span, f"YAML tag '{_short(node.tag)}' is not allowed in spec files")
                return None
            if node.tag == _T + "str" or node.tag == _T + "timestamp":
                doc.origins[path] = _origin(file, node, lines)
                bad = _unsafe_char(node.value)
                if bad:
                    errors.error(span, f"the text contains the character {_char_name(bad)} (from an escape); "
                                       f"control characters are not allowed in spec files")
                    return None
                return node.value
            if node.tag == _T + "null":
                return None
            if _YAML12_TAG[node.tag].fullmatch(node.value) and node.value:  # also for explicit tags
                try:
                    return _scalar(node.tag, node.value)
                except ValueError:  # more digits than Python reads
                    pass
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            errors.error(span, f"invalid {_short(node.tag)} value {shown!r}")
            return None
        if isinstance(node, SequenceNode):
            if node.tag != _T + "seq":
                errors.error(span, f"YAML tag '{_short(node.tag)}' is not allowed in spec files")
                return None
            return [convert(item, path + (i,)) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != _T + "map":
                errors.error(span, f"YAML tag '{_short(node.tag)}' is not allowed in spec files")
                return None
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                kspan = _mark_span(file, knode)
                if not isinstance(knode, ScalarNode) or knode.tag not in (_T + "str", _T + "int", _T + "bool", _T + "float"):
                    what = "merge keys (<<)" if knode.tag == _T + "merge" else "complex or tagged keys"
                    errors.error(kspan, f"YAML {what} are not allowed in spec files")
                    continue
                key = knode.value
                bad = _unsafe_char(key)
                if bad:
                    errors.error(kspan, f"the key contains the character {_char_name(bad)} (from an escape); "
                                        f"control characters are not allowed in spec files")
                    continue
                if key in out:
                    errors.error(kspan, f"duplicate key '{key}'",
                                 f"first defined at {doc.key_spans[path + (key,)]}")
                    continue
                doc.key_spans[path + (key,)] = kspan
                doc.origins[path + (key, "<key>")] = _origin(file, knode, lines)
                out[key] = convert(vnode, path + (key,))
            return out
        errors.error(span, "unsupported YAML node")  # pragma: no cover - composer yields only the above
        return None

    doc.data = convert(root, ())
    errors.raise_if_any(sources)
    return doc


def _unsafe_char(text: str) -> str | None:
    """The first control character (other than tab and line breaks) or lone surrogate in `text`:
    the reader refuses them in the file, but double-quoted escapes such as \\0 can still make them."""
    for c in text:
        if c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cs"):
            return c
    return None


def _position_span(file: str, text: str, position: int) -> Span:
    """The span of the character at 0-based `position` in `text`."""
    before = text[:position]
    line = before.count("\n") + 1
    col = position - (before.rfind("\n") + 1) + 1
    return Span(file, line, col, line, col + 1)


def _char_name(ch: Any) -> str:
    code = ord(ch) if isinstance(ch, str) and len(ch) == 1 else ch
    return f"U+{code:04X}" if isinstance(code, int) else repr(ch)


def _diag(span: Span, message: str) -> Diagnostic:
    return Diagnostic(span, message)


def _short(tag: str) -> str:
    return "!!" + tag[len(_T):] if tag.startswith(_T) else tag
