"""YAML read with positions, safely.

Spec files are untrusted. The YAML is *composed* (never constructed) with PyYAML's safe composer,
then turned into plain Python data by hand, accepting only the core tags (str, int, float, bool,
null, seq, map). Anything else (`!!python/object`, custom tags, merge keys, aliases) is refused
with a located error, so no YAML feature can execute code or blow up memory.

Alongside the data, a `Located` document records the span of every value and key (by path), and
for string scalars an origin that maps a (line, column) inside the string to the spec file, also
for `|` block scalars, so errors inside graph bodies point at the real line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .diagnostics import Collector, Diagnostic, Span, SpecError

Path = tuple[Any, ...]

_T = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_T + "str", _T + "int", _T + "float", _T + "bool", _T + "null", _T + "timestamp"}
_MAX_NODES = 200_000


@dataclass(frozen=True)
class TextOrigin:
    """Where a string scalar's text lies in the file, to map positions inside it."""

    file: str
    line: int  # 1-based line of the first character of the content
    col: int  # 1-based column of the first character of the content
    block: bool  # literal block scalar: content line i is file line `line + i`, shifted by `col - 1`

    def span(self, line: int, col: int, end_line: int | None = None, end_col: int | None = None) -> Span:
        """Map a 1-based (line, col) inside the string to the file."""
        if self.block:
            shift = self.col - 1
            return Span(self.file, self.line + line - 1, col + shift,
                        None if end_line is None else self.line + end_line - 1,
                        None if end_col is None else end_col + shift)
        if line == 1:
            shift = self.col - 1
            return Span(self.file, self.line, col + shift, self.line if end_line == 1 else None,
                        None if end_col is None or end_line != 1 else end_col + shift)
        return Span(self.file, self.line, self.col)  # folded text: the best we know is its start


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
        # Content begins on the line after the indicator; find its indentation.
        header = m.line  # 0-based line of the '|'
        indent = None
        for raw in lines[header + 1:]:
            if raw.strip():
                indent = len(raw) - len(raw.lstrip(" "))
                break
        return TextOrigin(file, header + 2, (indent or 0) + 1, True)
    quote = 1 if node.style in ("'", '"') else 0
    return TextOrigin(file, m.line + 1, m.column + 1 + quote, False)


def load_yaml(text: str, file: str) -> Located:
    """Compose `text` safely into a `Located` document. Raises SpecError on any YAML problem."""
    sources = {file: text}
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(file, mark.line + 1, mark.column + 1) if mark else Span(file, 1, 1)
        problem = e.problem or e.context or "invalid YAML"
        raise SpecError(_diag(span, f"YAML syntax error: {problem}"), sources) from None
    except yaml.YAMLError as e:  # e.g. a reader error on bad characters
        raise SpecError(_diag(Span(file, 1, 1), f"YAML error: {e}"), sources) from None
    if root is None:
        raise SpecError(_diag(Span(file, 1, 1), "the spec file is empty"), sources)

    doc = Located(None, file, text)
    errors = Collector()
    lines = text.splitlines()
    seen: set[int] = set()
    constructor = SafeConstructor()

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
                return node.value
            if node.tag == _T + "null":
                return None
            try:
                return {
                    _T + "int": constructor.construct_yaml_int,
                    _T + "float": constructor.construct_yaml_float,
                    _T + "bool": constructor.construct_yaml_bool,
                }[node.tag](node)
            except (ValueError, yaml.YAMLError):
                errors.error(span, f"invalid {_short(node.tag)} value {node.value!r}")
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


def _diag(span: Span, message: str) -> Diagnostic:
    return Diagnostic(span, message)


def _short(tag: str) -> str:
    return "!!" + tag[len(_T):] if tag.startswith(_T) else tag
