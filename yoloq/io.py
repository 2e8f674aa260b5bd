"""Atomic output files (write to a temp file beside the target, then rename, so no partial file is ever left), and
the content digests that name files: checkpoints by sha256, the images a model has seen by a short one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from yoloq.errors import YoloqError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SEEN_KEY = "yoloq_seen_images"  # ONNX metadata: the image digests of the checkpoint it was exported from


def image_digest(path: str | Path) -> str:
    """A short content digest of an image file: which images a model was calibrated or trained on, by content, so
    that copies and renamed files are recognised where `yoloq eval` meets them again."""
    return sha256_file(path)[:16]


def image_digests(paths) -> list[str]:
    return sorted({image_digest(p) for p in paths})


def check_writable(path: str | Path) -> Path:
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise YoloqError(f"output path is a directory: {path}")
    if not parent.is_dir():
        raise YoloqError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise YoloqError(f"output directory is not writable: {parent}")
    # access() says yes to root everywhere; only creating a file tells (read-only mounts, /proc, full disks)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise YoloqError(f"output directory is not writable: {parent} ({e.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path to write; renames it onto `path` on success, removes it on any failure."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise YoloqError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise YoloqError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_partial(path: Path, fmt: str, config: dict, fingerprint: dict, what: str) -> dict | None:
    """An interrupted run's saved state (`<out>.partial`), None when there is none. A state that is unreadable, of
    another kind, or written with other settings or inputs is an error: resuming from it would mix two runs."""
    import torch

    if not path.exists():
        return None
    try:
        p = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (any damage to the file means the same thing here)
        raise YoloqError(f"unreadable {what} state {path}; delete it to start over") from None
    if not isinstance(p, dict) or p.get("format") != fmt:
        raise YoloqError(f"{path} is not a yoloq {what} state; delete it to start over")
    if p.get("config") != config or p.get("fingerprint") != fingerprint:
        raise YoloqError(f"{path} was written by a run with other settings or inputs; "
                         "use the same command, or delete it to start over")
    return p


def write_partial(path: Path, payload: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
