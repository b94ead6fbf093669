"""Tied parameters by name: one tensor under several names (`tie=`, `share=`, the later steps of
`repeat(..., share=true)`, the steps of `repeat(..., share=g)`), and what a name pattern of `freeze:` (the
spec's, or a recipe's) or of a recipe's `groups:` selects among them."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping

from specc.compiler.ir import Graph


def tied_names(graph: Graph) -> dict[str, tuple[str, ...]]:
    """Stored parameter -> the names of the parameters tied to it, in graph order: `tie=`, `share=`, the
    later steps of `repeat(..., share=true)` and the steps of `repeat(..., share=g)`. The IR's `tied_to`,
    which names the owner itself (never a tied parameter), as `specc check --params` prints it."""
    out: dict[str, list[str]] = {}
    for _, n in graph.nodes():
        for p in n.params:
            if p.tied_to is not None:
                out.setdefault(p.tied_to, []).append(".".join(n.path + (p.name,)))
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class Selection:
    """What one `freeze:` or `groups:` pattern selects among the stored parameters (`select`)."""

    hits: list[str]  # stored names: matched themselves, or through every name tied to them
    partial: list[tuple[str, list[str]]]  # stored name, the names tied to it the pattern matches (not all)


def select(pattern: str, names: Iterable[str], tied: Mapping[str, tuple[str, ...]]) -> Selection:
    """The stored parameters (`names`) a pattern selects. A tied parameter is its owner's tensor, so a
    pattern naming it selects the owner, but only when it names every name tied to it (or the owner's
    own): a pattern naming step 2 of a shared repeat's steps 1 to 3 makes a choice of steps that one
    tensor cannot follow (`partial`, an error of the caller's)."""
    hits, partial = [], []
    for s in names:
        if fnmatch.fnmatchcase(s, pattern):
            hits.append(s)
            continue
        aliases = tied.get(s, ())
        matched = [a for a in aliases if fnmatch.fnmatchcase(a, pattern)]
        if matched and len(matched) == len(aliases):
            hits.append(s)
        elif matched:
            partial.append((s, matched))
    return Selection(hits, partial)


def _listed(names, limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def partial_tie_message(key: str, pattern: str, partial: list[tuple[str, list[str]]],
                        tied: Mapping[str, tuple[str, ...]]) -> tuple[str, str]:
    """The error (and hint) for a `freeze:` or `groups:` pattern that names some, not all, of the names of
    one tied tensor: it cannot be frozen, or given optimizer arguments, for those names alone."""
    stored, matched = partial[0]
    others = [a for a in tied[stored] if a not in matched]
    what = "freezing it freezes" if key == "freeze" else "the group's arguments apply to"
    more = f" ({len(partial) - 1} more tied parameter{'s' if len(partial) > 2 else ''} alike)" if len(partial) > 1 \
        else ""
    message = (f"{key}: '{pattern}' matches {_listed(matched)}, tied to {stored}: the same tensor as "
               f"{_listed(others)}, so {what} every one of them, not only the "
               f"name{'s' if len(matched) > 1 else ''} the pattern matches{more}")
    verb = "freeze it" if key == "freeze" else "put it in this group"
    hint = (f"to {verb}, name {stored} (the stored name, which selects every name tied to it) or a pattern "
            f"that matches all its names; a tied parameter has no per-step or per-layer copy")
    return message, hint


__all__ = ["Selection", "partial_tie_message", "select", "tied_names"]
