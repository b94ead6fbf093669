"""Training recipes: the `train:` section of a spec, checked (`recipe.py`) and run (`loop.py`).

    import specc.train
    result = specc.train.train("specs/gpt.yaml", "runs/gpt", train={"steps": 100})
    result.metrics["exact"]

See the README's "Training" section for the recipe language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from specc.dsl.diagnostics import Span

from .recipe import OVERRIDES_FILE, Recipe, check_recipe

if TYPE_CHECKING:
    from .loop import Result


def __getattr__(name: str):  # the training loop (and torch) load when first used, not for checking
    if name in ("Dist", "Result", "run"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)


def prepare(path_or_text: str | Path, overrides: Mapping[str, Any] | None = None,
            override_spans: Mapping[str, tuple[str, Span]] | None = None,
            train: Mapping[str, Any] | None = None, train_spans: Mapping[str, tuple[str, Span]] | None = None,
            allow_imports: Iterable[str] = ()):
    """(spec source, graph, recipe) of a spec with a `train:` section; raises SpecError.

    train: overrides of the recipe by dotted key, e.g. {"steps": 20, "eval.every": 5}."""
    from specc.api import _front
    from specc.dsl.diagnostics import Diagnostic, SpecError

    src, graph = _front(path_or_text, dict(overrides or {}), dict(override_spans or {}) or None,
                        allow_imports=allow_imports)
    spans = dict(train_spans or {})
    for i, (key, value) in enumerate((train or {}).items(), start=1):
        text = value if isinstance(value, str) else json.dumps(value)
        spans[key] = (text, Span(OVERRIDES_FILE, i, len(key) + 2, i, len(key) + 2 + len(text)))
    recipe = check_recipe(src, graph, spans)
    if recipe is None:
        raise SpecError(Diagnostic(Span(src.file, 1, 1), f"{graph.name}: the spec has no train: section"),
                        {src.file: src.text})
    return src, graph, recipe


def train(path_or_text: str | Path, out: str | Path, *, train: Mapping[str, Any] | None = None,
          resume: str | Path | None = None, until: int | None = None, progress: bool = False,
          allow_imports: Iterable[str] = (), weights: Mapping[str, Any] | None = None, force: bool = False,
          overrides: Mapping[str, Any] | None = None, **more_overrides: Any) -> Result:
    """Run a spec's recipe into the folder `out` (metrics.jsonl, checkpoints/, model/, summary.json).

    Parameter overrides as keyword arguments; `train` overrides recipe keys; `resume` continues the
    newest checkpoint of a run folder; `until` stops after that step (resume it later); `weights`
    ({name: tensor}, names as `specc ir -O0` prints them) start training from given values, e.g.
    a trained model to fine-tune. `out` must be new, empty or the folder resumed; `force` lets a new
    run replace an earlier run there."""
    from specc.api import given_weights

    from .loop import run

    src, graph, recipe = prepare(path_or_text, {**(overrides or {}), **more_overrides}, train=train,
                                 allow_imports=allow_imports)
    start = given_weights(graph, weights) if weights is not None else None
    return run(src, graph, recipe, Path(out), Path(resume) if resume is not None else None, until, progress,
               weights=start, force=force)


__all__ = ["train", "prepare", "run", "check_recipe", "Recipe", "Result", "Dist"]
