"""Shared fixtures. Tests on ../shared/data fail (not skip) under CI, where the data is always present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAPTIONER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def require_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared test data missing under CI: {path}")
        pytest.skip(f"shared data not present: {path}")
    return path


@pytest.fixture
def flickr8k() -> Path:
    return require_shared("flickr8k")


@pytest.fixture
def coco_mini() -> Path:
    return require_shared("coco-val2017-mini")


@pytest.fixture
def photos() -> Path:
    return require_shared("photos")


def make_images(folder: Path, n: int, size: int = 64) -> list[Path]:
    """Distinct synthetic JPEGs (solid colour + a stripe), enough for readers and tiny training runs."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
        ImageDraw.Draw(img).rectangle([0, (i * 7) % size, size, (i * 7) % size + 8], fill=(255 - 20 * i % 256, 0, 0))
        p = folder / f"img{i}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


TINY_WORDS = ["red", "green", "blue", "dark", "bright", "striped", "square", "photo"]


def make_tiny_dataset(root: Path, extra_rows: tuple[str, ...] = ()) -> Path:
    """10 synthetic images (8 train, 2 dev) with 3 captions each, as caps.csv: enough to train tiny models."""
    make_images(root, 10)
    rows = ["image,caption,split"]
    for i in range(10):
        for j in range(3):
            rows.append(f"img{i}.jpg,a {TINY_WORDS[i % 8]} {TINY_WORDS[(i + j) % 8]} photo,"
                        f"{'dev' if i >= 8 else 'train'}")
    rows += list(extra_rows)
    (root / "caps.csv").write_text("\n".join(rows) + "\n")
    return root
