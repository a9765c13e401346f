"""Robust image loading: every odd file users have turns into an upright 8-bit RGB image or a clear error."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CaptionerError

# Larger images are refused before decoding (decompression bombs): 64 MP covers any real camera photo.
MAX_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(CaptionerError):
    """The file is not a usable image (missing, corrupt, truncated, too large...)."""


def _name(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "<uploaded image>" if isinstance(src, bytes) else "<PIL image>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit and float images are rescaled (PIL's convert would clip them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(src: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as upright RGB.

    `draft_size` lets the JPEG decoder downscale while decoding (much faster for large photos) as long
    as the result stays at least that big.
    """
    name = _name(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            if isinstance(src, (str, os.PathLike)):
                path = Path(src)
                if not path.exists():
                    raise ImageError(f"image not found: {name}")
                if path.is_dir():
                    raise ImageError(f"expected an image file, got a folder: {name}")
                if path.stat().st_size == 0:
                    raise ImageError(f"empty file (0 bytes): {name}")
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"image too large ({w}x{h} pixels, limit {MAX_PIXELS:,}): {name}")
        if w == 0 or h == 0:
            raise ImageError(f"image has no pixels: {name}")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated: caption the first frame
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (unrecognised format): {name}") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (decompression bomb guard): {name}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image ({e}): {name}") from None
