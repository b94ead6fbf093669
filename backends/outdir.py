"""Output folders of `specc build` and `specc prune` (every target): written into a sibling temporary
folder, then swapped in, so that a failed build leaves no partial folder and an earlier build untouched.

Replacing a folder that already exists deletes what is in it, so it is allowed only when the folder is
empty or is an earlier specc build: it holds a manifest.json that specc wrote (a JSON object with
`versions.specc` and `spec.sha256`) and nothing but the files specc writes (and the `__pycache__` that
importing the built model.py leaves). Anything else is an error naming the folder and what it holds,
unless `force`. Never, even with `force`: a folder holding one of the `protect` paths (the spec being
built, its weights), or the current directory or one of its parents.

A symbolic link to a folder is followed: its target is the folder replaced (by the same rules) and the
link is left as it is. The new folder and its files get the modes the umask gives (755/644 under 022).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterable

from specc.compiler.diagnostics import Diagnostic, Span, SpecError

#: Every name a specc build folder holds, for any target (torch: the first three; TVM: all but
#: __pycache__, which importing model.py and loader.py from the folder writes).
BUILD_FILES = frozenset({"manifest.json", "model.py", "weights.safetensors", "model_lib.so", "loader.py",
                         "tvm_manifest.json", "__pycache__"})
#: A manifest larger than this is not specc's (they are a few kilobytes; a pruned one some more).
MAX_MANIFEST = 16 << 20


def _error(out: Path | str, message: str, *notes: str) -> SpecError:
    return SpecError(Diagnostic(Span(str(out), 0, 0), message, notes=tuple(notes)))


def _them(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"


def is_specc_manifest(path: Path) -> bool:
    """Whether `path` is a manifest.json that a specc build wrote."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MANIFEST:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("versions"), dict) and "specc" in data["versions"]
            and isinstance(data.get("spec"), dict) and "sha256" in data["spec"])


def _listing(names: list[str], folder: Path, limit: int = 6) -> str:
    shown = [n + ("/" if (folder / n).is_dir() and not (folder / n).is_symlink() else "") for n in names[:limit]]
    more = len(names) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve(out: str | Path) -> Path:
    """The folder `out` names, with symbolic links followed (a link to a folder: its target).
    Raises SpecError when it cannot be an output folder."""
    out = Path(out)
    if out.is_symlink():
        if not out.exists():
            raise _error(out, f"the output path is a symbolic link to {os.readlink(out)}, which does not exist",
                         "point -o at a folder (or at a link to an existing folder)")
    if out.exists() and not out.is_dir():
        raise _error(out, "the output path exists and is not a folder")
    return Path(os.path.realpath(out))


def check(out: str | Path, *, force: bool = False, protect: Iterable[str | Path | None] = (),
          force_hint: str = "--force") -> Path:
    """Raise SpecError unless the build may be written to `out` (see the module's text); return the
    folder it will be written to (symbolic links followed). Writes nothing."""
    given = Path(out)
    label = f"the output folder{' (-o)' if force_hint.startswith('--') else ''} {str(given)!r}"
    real = resolve(given)
    cwd = Path(os.path.realpath(os.getcwd()))
    if _inside(cwd, real):
        what = "the current directory" if real == cwd else "a parent of the current directory"
        raise _error(given, f"{label} is {what}: writing the build replaces the "
                            f"folder and everything in it, which is never done (not even with {force_hint})",
                     "write the build to a folder of its own, e.g. -o build")
    for p in protect:
        if p is None:
            continue
        kept = Path(os.path.realpath(p))
        if kept.exists() and _inside(kept, real):
            raise _error(given, f"{label} holds {p}, an input of this build: writing the "
                                f"build replaces the folder and everything in it, which would delete it (this is "
                                f"never done, not even with {force_hint})",
                         "write the build to a folder of its own, e.g. a new subfolder")
    if force or not real.is_dir():
        return real
    try:
        names = sorted(os.listdir(real))
    except OSError as e:
        raise _error(given, f"cannot read the output folder: {e.strerror or e}") from None
    if not names:
        return real
    if "manifest.json" in names and is_specc_manifest(real / "manifest.json"):
        foreign = [n for n in names if n not in BUILD_FILES]
        if not foreign:
            return real
        raise _error(given, f"{label} is an earlier specc build that also holds what specc did not write "
                            f"({_listing(foreign, real)}): writing the build replaces the folder and would "
                            f"delete {_them(foreign)}",
                     f"move {_them(foreign)} out, write the build to another folder, or pass {force_hint} to "
                     f"replace the folder and everything in it")
    raise _error(given, f"{label} is not empty and is not a specc build (it holds {_listing(names, real)}): "
                        f"writing the build replaces the folder and would delete {_them(names)}",
                 f"write the build to a new or empty folder (or an earlier specc build), or pass {force_hint} to "
                 f"replace the folder and everything in it")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(folder: Path) -> None:
    """The modes a file or folder made under the current umask gets (executables keep their x bits):
    a temporary folder is made 700, and some writers make their files 600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


def replace_folder(out: str | Path, fill: Callable[[Path], None], *, force: bool = False,
                   protect: Iterable[str | Path | None] = (), force_hint: str = "--force") -> Path:
    """Make the folder `out` anew with what `fill(folder)` writes into a fresh folder: atomically (a
    failure, in `fill` too, leaves `out` as it was and nothing beside it). `check`'s rules first.
    OSErrors of making and swapping the folders propagate (callers name them)."""
    protect = tuple(protect)
    real = check(out, force=force, protect=protect, force_hint=force_hint)
    parent = real.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _error(out, f"cannot make the output folder: {ancestor} is not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{real.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its folder is 700 whatever the umask
    try:
        fill(tmp)
        _normal_modes(tmp)
        if real.exists():
            old = parent / f".{real.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(real, old)
            try:
                os.replace(tmp, real)
            except BaseException:
                os.replace(old, real)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return real
