"""The run folder of `specc train -o RUN`: may a run be written to it?

A run writes metrics.jsonl, summary.json, checkpoints/ and model/ into RUN (made when missing) while
and after it trains, so the folder is checked before anything is trained:

- a new or empty folder, or a link to one: the run is written there;
- the folder of `--resume` itself: the run goes on in it (its checkpoints and metrics are kept);
- an earlier run (it holds nothing but those names, checkpoints/ nothing but checkpoints, model/ a
  specc build): replaced only with `force` (`--force`); its files are deleted when the new run
  writes its first step, so a run that fails before that leaves the earlier one as it was;
- anything else: refused, even with `force`: a run writes into the folder (it is not made aside and
  swapped in), and specc never deletes or mixes with what it did not write.

Never, not even with `force`: a run whose writing would delete one of its inputs (the spec, the data
file, the starting weights, the run it resumes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from specc.backends.outdir import BUILD_FILES, _error, _inside, is_specc_manifest
from specc.backends.outdir import resolve as resolve_folder

CHECKPOINTS = "checkpoints"
MODEL = "model"
#: The files a run writes at the top of its folder (and the temporary file metrics.jsonl is rewritten through).
RUN_FILES = ("metrics.jsonl", "summary.json", ".metrics.jsonl.tmp")
RUN_NAMES = frozenset({*RUN_FILES, CHECKPOINTS, MODEL})


def _listing(names: list[str], limit: int = 6) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def is_checkpoint_name(name: str) -> bool:
    """A name that save_checkpoint writes under checkpoints/ (a checkpoint, or one being written)."""
    return (name.startswith("step-") and name[5:].isdigit()) or name.startswith(".tmp-step-")


def same_folder(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def run_inputs(src, recipe) -> tuple[str | Path, ...]:
    """The files a run reads that writing it must not delete: the spec and its data file."""
    from .files import resolve as data_path

    return (src.file,) + ((data_path(recipe),) if recipe.data_file else ())


def check_run(out: str | Path, *, resume: str | Path | None = None, force: bool = False,
              protect: Iterable[str | Path | None] = ()) -> Path:
    """Raise SpecError unless a run may be written to `out` (the module's rules); return the folder
    (links followed). Writes nothing."""
    given = Path(out)
    real = resolve_folder(given)  # a file or a dangling link is refused here
    label = f"the run folder (-o) {str(given)!r}"
    targets = [real / CHECKPOINTS, real / MODEL, *(real / n for n in RUN_FILES)]  # what a new run replaces
    for p in (*protect, resume, os.getcwd()):
        if p is None or same_folder(p, real):
            continue
        kept = Path(os.path.realpath(p))
        if any(_inside(kept, t) for t in targets):
            what = "the current directory" if p == os.getcwd() else f"{p}, an input of this run"
            raise _error(given, f"{label}: writing the run would delete {what} (this is never done, not even "
                                f"with --force)", "write the run to a folder of its own")
    if not real.is_dir():
        return real
    in_place = same_folder(resume, real)
    try:
        names = sorted(os.listdir(real))
        foreign = [n for n in names if n not in RUN_NAMES]
        if (real / CHECKPOINTS).is_dir() and not (real / CHECKPOINTS).is_symlink():
            foreign += [f"{CHECKPOINTS}/{n}" for n in sorted(os.listdir(real / CHECKPOINTS))
                        if not is_checkpoint_name(n)]
        elif CHECKPOINTS in names:
            foreign.append(CHECKPOINTS)
        model = real / MODEL
        if model.is_dir() and not model.is_symlink():
            inside = sorted(os.listdir(model))
            if inside and not is_specc_manifest(model / "manifest.json"):
                foreign.append(f"{MODEL}/ (not a specc build)")
            else:
                foreign += [f"{MODEL}/{n}" for n in inside if n not in BUILD_FILES]
        elif MODEL in names:
            foreign.append(MODEL)
    except OSError as e:
        raise _error(given, f"cannot read the run folder: {e.strerror or e}") from None
    if foreign:
        raise _error(given, f"{label} is not empty and is not a specc run (it holds {_listing(foreign)}, which "
                            f"specc train does not write){' even though it is the run resumed' if in_place else ''}",
                     "write the run to a new or empty folder (specc train never deletes or writes among files it "
                     "did not write, not even with --force)")
    if names and not in_place and not force:
        raise _error(given, f"{label} holds an earlier run ({_listing(names)}): a new run replaces it",
                     f"continue it with --resume {given}, write the new run to another folder, or pass --force to "
                     f"replace the earlier run")
    return real
