"""DATA for every command: an Ultralytics dataset YAML, or a directory of images with optional labels
(YOLO-format ``labels/`` beside ``images/``, or a COCO instances json next to or above the images).

>>> ds = resolve_data("path/to/coco-mini/train2017")  # doctest: +SKIP
>>> ds.images[:1], ds.has_labels, ds.names  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from yoloq.errors import YoloqError

IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    images: list[Path]
    # per image: (n, 5) float array [cls, x1, y1, x2, y2] in original pixels; None where the data has no labels
    labels: list[np.ndarray] | None = None
    names: dict[int, str] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def take(self, n: int | None) -> "Dataset":
        """The first n images (sorted by name, so runs are repeatable)."""
        if n is not None and n < 1:
            raise YoloqError(f"number of images must be at least 1, got {n}")
        if n is None or n >= len(self.images):
            return self
        return Dataset(self.images[:n], self.labels[:n] if self.labels else None, self.names, self.source, self.notes)


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTS)


def _yolo_labels(images: list[Path]) -> list[np.ndarray] | None:
    from ultralytics.data.utils import img2label_paths

    paths = [Path(p) for p in img2label_paths([str(i) for i in images])]
    if not any(p.exists() for p in paths):
        return None
    out = []
    for img, lp in zip(images, paths):
        rows = np.zeros((0, 5), np.float32)
        if lp.exists() and lp.stat().st_size:
            rows = _read_label_rows(lp)
            h, w = _image_hw(img)
            xc, yc, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
            rows = np.stack([rows[:, 0], xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1)
        out.append(rows)
    return out


def _read_label_rows(path: Path) -> np.ndarray:
    """YOLO label rows as (n, 5) [cls, xc, yc, w, h]; segment rows (cls x1 y1 x2 y2 ...) become their bounding box."""
    rows = []
    for line in path.read_text().splitlines():
        v = line.split()
        if not v:
            continue
        try:
            nums = [float(t) for t in v]
        except ValueError:
            raise YoloqError(f"malformed label row in {path}: {line[:60]!r}") from None
        if len(nums) == 5:
            rows.append(nums)
        elif len(nums) >= 7 and len(nums) % 2 == 1:
            xs, ys = nums[1::2], nums[2::2]
            rows.append([nums[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)])
        else:
            raise YoloqError(f"malformed label row in {path}: {line[:60]!r}")
    return np.array(rows, np.float32).reshape(-1, 5)


def _image_hw(p: Path) -> tuple[int, int]:
    """Height and width after EXIF orientation, as cv2.imread (which feeds inference) sees the image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            return im.height, im.width
    except (OSError, UnidentifiedImageError):
        raise YoloqError(f"unreadable image: {p}") from None


def _coco_json(d: Path) -> Path | None:
    for c in (d, d / "annotations", d.parent / "annotations", d.parent):
        if c.is_dir():
            hits = sorted(c.glob(f"instances_{d.name}.json")) or sorted(c.glob("instances_*.json"))
            if hits:
                return hits[0]
    return None


def _coco_labels(images: list[Path], js: Path) -> tuple[list[np.ndarray], dict[int, str]]:
    data = json.loads(js.read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_name = {im["file_name"]: im["id"] for im in data["images"]}
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        anns.setdefault(a["image_id"], []).append([cat_index[a["category_id"]], x, y, x + w, y + h])
    labels = [np.array(anns.get(by_name.get(p.name, -1), []), np.float32).reshape(-1, 5) for p in images]
    return labels, {i: c["name"] for i, c in enumerate(cats)}


def _from_dir(d: Path) -> Dataset:
    images = _list_images(d)
    if not images:
        # a dataset root: images/, or a single split folder such as val2017/ or train2017/
        subs = [s for s in sorted(d.iterdir()) if s.is_dir() and _list_images(s)]
        subs = [s for s in subs if s.name == "images"] or [s for s in subs if s.name.startswith("val")] or subs
        if subs:
            d = subs[0]
            images = _list_images(d)
    if not images:
        raise YoloqError(f"no images found in dataset directory: {d}")
    labels = _yolo_labels(images)
    if labels is not None:
        names = None
        for c in (d.parent / "classes.txt", d.parent.parent / "classes.txt"):
            if c.exists():
                names = dict(enumerate(n.strip() for n in c.read_text().splitlines() if n.strip()))
                break
        return Dataset(images, labels, names, str(d))
    js = _coco_json(d)
    if js is not None:
        try:
            labels, names = _coco_labels(images, js)
        except (KeyError, ValueError, TypeError) as e:
            raise YoloqError(f"unreadable COCO annotations {js}: {e}") from None
        if any(len(x) for x in labels):
            return Dataset(images, labels, names, str(d), [f"labels from {js.name}"])
    return Dataset(images, None, None, str(d))


def _from_yaml(p: Path) -> Dataset:
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise YoloqError(f"unreadable dataset YAML {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not any(k in cfg for k in ("val", "train", "test")):
        raise YoloqError(f"dataset YAML {p} has no 'val' or 'train' entry")
    root = Path(cfg["path"]) if cfg.get("path") else p.parent
    if not root.is_absolute() and cfg.get("path"):
        root = p.parent / root  # Ultralytics resolves a relative `path` against the YAML's folder
    split = cfg.get("val") or cfg.get("test") or cfg.get("train")
    if isinstance(split, list):
        split = split[0]
    if not isinstance(split, str):
        raise YoloqError(f"dataset YAML {p}: 'val'/'train' must be a folder path, got {split!r}")
    d = root / split
    if not d.is_dir():
        raise YoloqError(f"dataset directory from {p.name} does not exist: {d}")
    ds = _from_dir(d)
    names = cfg.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if names is not None and not isinstance(names, dict):
        raise YoloqError(f"dataset YAML {p}: 'names' must be a list or a mapping")
    ds.names = {int(k): str(v) for k, v in names.items()} if names else ds.names
    return ds


def resolve_data(data: str | Path) -> Dataset:
    p = Path(data)
    if not p.exists():
        raise YoloqError(f"dataset not found: {data}")
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return _from_yaml(p)
    if p.is_dir():
        return _from_dir(p)
    raise YoloqError(f"dataset must be a dataset YAML or a directory of images: {data}")


def load_image(path: Path) -> np.ndarray:
    im = cv2.imread(str(path))
    if im is None:
        raise YoloqError(f"unreadable image: {path}")
    return im


def preprocess(image: np.ndarray, imgsz: int) -> torch.Tensor:
    """BGR uint8 HxWx3 -> letterboxed RGB float (1, 3, imgsz, imgsz) in [0, 1], as Ultralytics' validator does."""
    from yoloq.model.yolo import letterbox

    lb = letterbox(image, imgsz)
    x = np.ascontiguousarray(lb[..., ::-1].transpose(2, 0, 1))
    return torch.from_numpy(x).float().div_(255.0)[None]


def iter_batches(ds: Dataset, imgsz: int):
    """(index, original image shape, input tensor) per image."""
    for i, p in enumerate(ds.images):
        im = load_image(p)
        yield i, im.shape[:2], preprocess(im, imgsz)


def write_yolo(images: list[Path], labels: list[np.ndarray], root: Path) -> Path:
    """A YOLO-format copy of a labelled set for Ultralytics' training pipeline: `root/images/` (links to the
    images) and `root/labels/*.txt` (class, normalised centre and size). Returns the images folder."""
    img_dir, lab_dir = root / "images", root / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(exist_ok=True)
    for i, (p, g) in enumerate(zip(images, labels)):
        link = img_dir / f"{i:06d}{p.suffix.lower()}"  # numbered: images from several folders may share a name
        if not link.exists():
            link.symlink_to(Path(p).resolve())
        h, w = _image_hw(p)
        rows = []
        for c, x1, y1, x2, y2 in np.asarray(g, np.float64).reshape(-1, 5):
            (x1, x2), (y1, y2) = np.clip([x1, x2], 0, w), np.clip([y1, y2], 0, h)
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                rows.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        (lab_dir / f"{link.stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    return img_dir
