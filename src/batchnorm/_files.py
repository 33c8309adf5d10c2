"""Atomic file writes (private): a temporary file beside the target, then a rename, so readers and
interrupted runs never see half a file. The file's mode follows the umask (0644 under umask 022),
as a plain ``open(path, "wb")`` would give. Used by the CLI's model output and the lab's results,
figures and reports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary path beside ``path``, with its suffix (writers such as ``torch.save``
    check it), that replaces ``path`` when the block ends without an exception; removed otherwise."""
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    tmp.unlink(missing_ok=True)  # a stale one would keep its mode: the new file's is 0o666 & ~umask
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (its folder made if missing), synced to disk first."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))
