"""Dataset readers: COCO annotations, Karpathy split files, the Flickr8k/30k layout, and plain CSV/JSONL.

Each reader yields the same `Record` (one image with all its reference captions), so training and
evaluation never care where the data came from. Splits are normalised to train / dev / test
(Karpathy's `val` is dev, `restval` joins train, as every published COCO result does).
"""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import CaptionerError

SPLITS = ("train", "dev", "test")
_ALIASES = {"train": "train", "restval": "train", "dev": "dev", "val": "dev", "valid": "dev",
            "validation": "dev", "test": "test"}
IMAGE_DIR_NAMES = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images")


def normalize_split(name: str | None) -> str | None:
    if name is None:
        return None
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise CaptionerError(f"unknown split {name!r}; use one of: train, dev (or val), test")
    return _ALIASES[key]


@dataclass
class Record:
    image: Path
    image_id: str | int
    captions: list[str]
    split: str = "train"
    source: int = 0  # which of several --data sources it came from (load_sources)


@dataclass
class Dataset:
    """Records of one split (or all), and what had to be skipped on the way."""

    kind: str
    source: Path
    records: list[Record]
    missing_images: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> list[Record]:
        name = normalize_split(name)
        return [r for r in self.records if r.split == name]

    def summary(self) -> str:
        counts = {s: sum(r.split == s for r in self.records) for s in SPLITS}
        parts = ", ".join(f"{s} {n}" for s, n in counts.items() if n)
        text = f"{self.kind} data at {self.source}: {len(self.records)} images ({parts or 'none'})"
        if self.missing_images:
            text += f"; {len(self.missing_images)} annotated images missing on disk were skipped"
        return text


def _existing(records: Iterable[Record], kind: str, source: Path) -> Dataset:
    kept, missing = [], []
    for r in records:
        (kept if r.image.is_file() else missing).append(r)
    return Dataset(kind, source, kept, [str(r.image) for r in missing])


def _find_image_root(base: Path, names: list[str], images: str | Path | None) -> Path:
    """Where the images are: --images when given, else the first candidate folder that holds the first image."""
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise CaptionerError(f"--images folder not found: {root}")
        return root
    candidates = [base / d for d in IMAGE_DIR_NAMES] + [base]
    for root in candidates:
        if any((root / n).is_file() for n in names[:50]):
            return root
    return next((c for c in candidates if c.is_dir() and c != base), base)


def read_flickr(folder: str | Path, images: str | Path | None = None) -> Dataset:
    """Flickr8k/30k as distributed: `*.token.txt` (`name.jpg#n<TAB>caption`) plus optional split lists."""
    folder = Path(folder)
    tokens = sorted(folder.glob("*.token.txt")) + sorted(folder.glob("results_*.token"))
    tokens = [t for t in tokens if "lemma" not in t.name]
    if not tokens:
        raise CaptionerError(f"no Flickr *.token.txt caption file in {folder}")
    captions: dict[str, list[str]] = OrderedDict()
    with open(tokens[0], encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            if not sep:
                raise CaptionerError(f"{tokens[0]}:{lineno}: expected 'image#n<TAB>caption'")
            captions.setdefault(key.split("#")[0].strip(), []).append(text.strip())
    split_of: dict[str, str] = {}
    for split, pattern in (("train", "*trainImages.txt"), ("dev", "*devImages.txt"), ("test", "*testImages.txt")):
        for lst in folder.glob(pattern):
            for name in lst.read_text(encoding="utf-8").split():
                split_of[name] = split
    names = list(captions)
    root = _find_image_root(folder, names, images)
    # With split files present, images not listed in any belong to no split (Flickr8k's token file
    # covers all 8091 images, but only the listed ones are train/dev/test).
    has_lists = bool(split_of)
    records = (Record(root / n, n, caps, split_of.get(n, "train"))
               for n, caps in captions.items() if not has_lists or n in split_of)
    return _existing(records, "flickr", folder)


def read_coco(annotations: str | Path, images: str | Path | None = None) -> Dataset:
    """Official COCO caption annotations (captions_*.json), read with pycocotools."""
    annotations = Path(annotations)
    from pycocotools.coco import COCO
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timing chatter
            coco = COCO(str(annotations))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionerError(f"{annotations} is not valid JSON: {e}") from None
    except (AssertionError, KeyError, TypeError) as e:
        raise CaptionerError(f"{annotations} is not a COCO caption annotation file ({e})") from None
    stem = annotations.stem.lower()
    # the official files name their split (captions_val2017.json); a file that names none is training data
    split = "test" if "test" in stem else "dev" if "val" in stem else "train"
    img_ids = sorted(coco.imgs)
    names = [coco.imgs[i]["file_name"] for i in img_ids]
    split_dir = stem.replace("captions_", "")  # e.g. val2017, as in the official layout
    base = annotations.parent
    if images is None:
        for cand in (base / split_dir, base.parent / split_dir, base / "images", base.parent / "images"):
            if cand.is_dir() and any((cand / n).is_file() for n in names[:2000]):
                images = cand
                break
    root = _find_image_root(base, names, images)
    records = []
    for i, name in zip(img_ids, names):
        caps = [a["caption"].strip() for a in coco.imgToAnns.get(i, [])]
        if caps:
            records.append(Record(root / name, i, caps, split))
    return _existing(records, "coco", annotations)


def read_karpathy(path: str | Path, images: str | Path | None = None) -> Dataset:
    """Karpathy split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)."""
    path = Path(path)
    data = _read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CaptionerError(f"{path} is not a Karpathy split file (no 'images' list)")
    names = [str(Path(e.get("filepath", "")) / e["filename"]) for e in entries]
    root = _find_image_root(path.parent, names, images)
    records = []
    for e, name in zip(entries, names):
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in e.get("sentences", [])]
        image_id = e.get("cocoid", e.get("imgid", e["filename"]))
        records.append(Record(root / name, image_id, caps, normalize_split(e.get("split", "train"))))
    return _existing(records, "karpathy", path)


def _rows_to_dataset(rows: list[dict], path: Path, images: str | Path | None, kind: str) -> Dataset:
    by_image: dict[str, Record] = OrderedDict()
    root = Path(images) if images is not None else path.parent
    if images is not None and not root.is_dir():
        raise CaptionerError(f"--images folder not found: {root}")
    for n, row in enumerate(rows, 1):
        image, caption = row.get("image"), row.get("caption")
        if not image or caption is None:
            raise CaptionerError(f"{path}: row {n} needs 'image' and 'caption' fields")
        split = normalize_split(row.get("split") or "train")
        rec = by_image.setdefault(str(image), Record(root / str(image), str(image), [], split))
        rec.captions.append(str(caption).strip())
    return _existing(by_image.values(), kind, path)


def read_csv(path: str | Path, images: str | Path | None = None) -> Dataset:
    """A CSV with a header row: image, caption[, split]; image paths relative to the CSV (or --images)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in fields or "caption" not in fields:
            raise CaptionerError(f"{path}: CSV header must name 'image' and 'caption' columns (got {fields})")
        rows = [{k.strip().lower(): v for k, v in r.items() if k} for r in reader]
    return _rows_to_dataset(rows, path, images, "csv")


def read_jsonl(path: str | Path, images: str | Path | None = None) -> Dataset:
    """One JSON object per line: {"image": ..., "caption": ..., "split": ...}."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CaptionerError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return _rows_to_dataset(rows, path, images, "jsonl")


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{path} is not a text JSON file") from None


def detect_kind(path: str | Path) -> str:
    """Which reader fits PATH: coco, karpathy, flickr, csv or jsonl."""
    p = Path(path)
    if not p.exists():
        raise CaptionerError(f"data path not found: {p}")
    if p.is_dir():
        if list(p.glob("*.token.txt")) or list(p.glob("results_*.token")):
            return "flickr"
        for pattern, kind in (("dataset_*.json", "karpathy"), ("captions_*.json", "coco"),
                              ("annotations/captions_*.json", "coco")):
            if list(p.glob(pattern)):
                return kind
        raise CaptionerError(f"{p} holds no known dataset: expected Flickr *.token.txt, a Karpathy "
                             f"dataset_*.json or COCO captions_*.json")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".jsonl":
        return "jsonl"
    if p.name.endswith((".token.txt", ".token")):
        return "flickr"
    if suffix == ".json":
        with open(p, "rb") as f:
            head = f.read(1 << 16).decode("utf-8", "replace")
        if '"annotations"' in head or "captions_" in p.name:
            return "coco"
        if '"sentences"' in head or p.name.startswith("dataset_"):
            return "karpathy"
        data = _read_json(p)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
    raise CaptionerError(f"cannot tell what dataset {p} is: give a COCO captions_*.json, a Karpathy "
                         f"dataset_*.json, a Flickr folder, or a .csv/.jsonl of image,caption rows")


def load_dataset(path: str | Path, split: str | None = None, images: str | Path | None = None) -> Dataset:
    """Read any supported dataset; `split` keeps one split (train, dev/val, test)."""
    kind = detect_kind(path)
    p = Path(path)
    if kind == "flickr":
        ds = read_flickr(p if p.is_dir() else p.parent, images)
    elif kind == "coco":
        if p.is_dir():
            files = sorted(p.glob("captions_*.json")) or sorted(p.glob("annotations/captions_*.json"))
            wanted = {"train": "train", "dev": "val", "test": "test"}.get(normalize_split(split) or "", "")
            p = next((f for f in files if wanted and wanted in f.name), files[0])
        ds = read_coco(p, images)
    elif kind == "karpathy":
        if p.is_dir():
            p = sorted(p.glob("dataset_*.json"))[0]
        ds = read_karpathy(p, images)
    else:
        ds = (read_csv if kind == "csv" else read_jsonl)(p, images)
    if split is not None:
        want = normalize_split(split)
        available = sorted({r.split for r in ds.records})
        ds.records = [r for r in ds.records if r.split == want]
        if not ds.records:
            raise CaptionerError(f"{path} has no images in split {want!r} (it has: {', '.join(available) or 'none'})")
    if not ds.records:
        hint = f" ({len(ds.missing_images)} annotated images were missing; pass --images DIR)" if ds.missing_images else ""
        raise CaptionerError(f"no usable images in {path}{hint}")
    return ds


def load_sources(paths: str | Path | Sequence[str | Path], split: str | None = None,
                 images: str | Path | None = None) -> Dataset:
    """Several datasets read as one (e.g. Flickr8k and COCO), each record tagged with its source's index,
    so that training can weigh the sources (train.py, source_weights)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise CaptionerError("no --data given")
    if len(paths) == 1:
        return load_dataset(paths[0], split, images)
    parts = []
    for i, p in enumerate(paths):
        ds = load_dataset(p, None, images)
        for r in ds.records:
            r.source = i
        parts.append(ds)
    records = [r for ds in parts for r in ds.records]
    if split is not None:
        want = normalize_split(split)
        records = [r for r in records if r.split == want]
        if not records:
            raise CaptionerError(f"no source in {', '.join(map(str, paths))} has images in split {want!r}")
    return Dataset("+".join(ds.kind for ds in parts), Path(paths[0]), records,
                   [m for ds in parts for m in ds.missing_images])
