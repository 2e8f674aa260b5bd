"""Atomic output files: write to a temp file beside the target, then rename, so no partial file is ever left."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from yoloq.errors import YoloqError


def check_writable(path: str | Path) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise YoloqError(f"output path is a directory: {path}")
    if not parent.is_dir():
        raise YoloqError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise YoloqError(f"output directory is not writable: {parent}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path to write; renames it onto `path` on success, removes it on any failure."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
