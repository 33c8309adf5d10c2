"""Shared bits of the command line (private): the one-line user error, and the checks every
command runs on its paths and optional dependencies BEFORE any work starts."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CliError",
    "LAB_INSTALL",
    "check_input_file",
    "check_new_file",
    "check_output_dir",
    "missing_dependency_message",
    "probe_write",
    "require",
]

LAB_INSTALL = "pip install '.[lab]' (in a clone of batchnorm)"
"""The install command that brings all of the lab's optional dependencies. The package is not on
a package index, so ``pip install 'batchnorm[lab]'`` would fail: the extra is installed from a clone."""

# import name -> (distribution name, extra that brings it) of the optional dependencies
_OPTIONAL = {
    "matplotlib": ("matplotlib", "lab"),
    "sklearn": ("scikit-learn", "lab"),
    "mnist1d": ("mnist1d", "lab"),
    "tqdm": ("tqdm", "lab"),
    "numba": ("numba", ""),
}


def _install_hint(dists: Sequence[str], extra: str) -> str:
    """The commands that install ``dists``: the extra from a clone, or the distributions by name."""
    by_name = f"pip install {' '.join(dists)}"
    return f"{LAB_INSTALL} or {by_name}" if extra == "lab" else by_name


class CliError(Exception):
    """A user error on the command line: printed as one line, exit status 2."""


def require(modules: Sequence[str], purpose: str) -> None:
    """CliError naming the install command when any of ``modules`` (import names) is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        dists = [_OPTIONAL.get(m, (m, "lab"))[0] for m in missing]
        extra = _OPTIONAL.get(missing[0], ("", "lab"))[1]
        verb = "is" if len(missing) == 1 else "are"
        raise CliError(f"{purpose} needs {', '.join(dists)}, which {verb} not installed: {_install_hint(dists, extra)}")


def missing_dependency_message(err: ModuleNotFoundError) -> str | None:
    """One line for a missing optional dependency (None when ``err`` is about another module)."""
    top = (err.name or "").split(".")[0]
    if top not in _OPTIONAL:
        return None
    dist, extra = _OPTIONAL[top]
    return f"this command needs {dist}, which is not installed: {_install_hint([dist], extra)}"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a path under a regular file stops at the file)."""
    current = path
    while not current.exists() and current != current.parent:
        if current.parent.exists() and not current.parent.is_dir():
            return current.parent
        current = current.parent
    return current


def check_input_file(path: str, what: str = "") -> Path:
    """The existing, readable regular file ``path``; CliError otherwise (directories named as such)."""
    p = Path(path)
    label = f"{what} {path}".strip()
    if p.is_dir():
        raise CliError(f"{label}: is a directory, expected a file")
    if not p.exists():
        raise CliError(f"{label}: no such file")
    if not p.is_file():
        raise CliError(f"{label}: not a regular file")
    if not os.access(p, os.R_OK):
        raise CliError(f"{label}: not readable (permission denied)")
    return p


def check_new_file(path: str, option: str, *, not_same_as: str | None = None, probe: bool = True) -> Path:
    """``path`` can be written as a file: not a directory, in an existing writable directory, and
    not the same file as ``not_same_as`` (the input: never overwritten silently). CliError otherwise.

    ``probe=False`` skips the one check that touches the disk (creating and removing a file in the
    folder); a caller that has more checks to make runs ``probe_write`` itself after them.
    """
    p = Path(path)
    label = f"{option} {path}"
    if p.is_dir():
        raise CliError(f"{label}: is a directory; give a file name")
    if not_same_as is not None:
        src = Path(not_same_as)
        same = p.exists() and src.exists() and os.path.samefile(p, src)
        if same or p.resolve() == src.resolve():
            raise CliError(f"{label}: is the input file; write to another name (the input is never overwritten)")
    parent = p.parent
    if not parent.exists():
        raise CliError(f"{label}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise CliError(f"{label}: {str(parent)!r} is a file, not a folder")
    if p.exists() and not p.is_file():
        raise CliError(f"{label}: exists and is not a regular file")
    if probe:
        probe_write(parent, f"{label}: folder {str(parent)!r} is not writable")
    return p


def probe_write(folder: Path, label: str) -> None:
    """Create and remove an empty file in ``folder``; CliError ``label (reason)`` when that fails.

    Permission bits alone do not tell (root passes ``os.access`` everywhere, yet cannot create a
    file in ``/proc`` or on a read-only mount), so the folder is tried for real.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".batchnorm-write-test-", dir=folder)
    except OSError as err:
        raise CliError(f"{label} ({err.strerror or type(err).__name__})") from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: Path, option: str) -> Path:
    """Create the output folder ``path`` (with its parents) and prove a file can be written there.

    Done before any work, so a bad ``--out`` fails in a second rather than after training.
    CliError (one line) when ``path`` is a file, lies under a file, or cannot be created or written.
    """
    p = Path(path)
    label = f"{option} {str(p)!r}"
    base = _nearest_existing(p)
    if base.exists() and not base.is_dir():
        where = "is a file" if base == p else f"lies under {str(base)!r}, which is a file"
        raise CliError(f"{label} {where}, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"{label}: cannot write there ({err.strerror or type(err).__name__})") from None
    probe_write(p, f"{label}: cannot write there")
    return p
