"""What the decoder looked at for each word of a caption, and how to see it.

A decoder trained on "regions" features (encoders.py) attends, before it scores each word, over a g x g grid
of region vectors of its image (row-major, g = 3 for the bundled model). Decoding can record the weights of
each step it ran and follow them along the returned caption's own beam (decoding.beam_search's
`attention`); `Captioner.caption_full(..., attention=True)` gives them per word as `WordAttention`. Here
they become heat maps over the photo: the g x g grid upsampled smoothly (bicubic) to the photo's size.

matplotlib is imported only to draw, so the CLI's parsing and the library's import stay light.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import CaptionerError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .images import ImageSource

PANEL_PIXELS = 384  # longest side of each panel's photo: a figure of 20 words stays a few MB at most
COLOURS = "inferno"  # dark where the decoder did not look, so the photo shows through where it did


@dataclass
class WordAttention:
    """One word of a caption and where the decoder looked when it chose that word."""

    word: str
    weights: torch.Tensor  # [R]: the decoders' mean softmax weights over the R regions (g x g, row-major); sum 1
    members: torch.Tensor  # [decoders, R]: each decoder's own weights, an ensemble's members in order
    global_share: float  # the decoders' mean share of the global vector, as `member_global_shares`
    # [decoders]: ||h|| / (||h|| + ||context||) in model.attention_record: the LSTM output h (which alone carries
    # the global vector, its first input) against what attention read from the regions; 1 = regions unused
    member_global_shares: torch.Tensor

    @property
    def grid(self) -> int:
        """g: the regions form a g x g grid."""
        return grid_size(self.weights.numel())


def grid_size(regions: int) -> int:
    """g for R = g * g regions; a clear error for a count that is not a square."""
    g = math.isqrt(regions)
    if regions < 1 or g * g != regions:
        raise CaptionerError(f"{regions} attention weights do not form a square grid of regions")
    return g


def word_attention(words: Sequence[str], attention: torch.Tensor) -> list[WordAttention]:
    """Per word, from a hypothesis's attention record [words, decoders, R + 1] (decoding.Hypothesis)."""
    if attention.shape[0] != len(words):
        raise ValueError(f"{len(words)} words but attention for {attention.shape[0]}")
    weights, shares = attention[..., :-1].float(), attention[..., -1].float()
    return [WordAttention(w, weights[i].mean(0), weights[i], float(shares[i].mean()), shares[i])
            for i, w in enumerate(words)]


def heatmap(weights: torch.Tensor | Sequence[float], size: tuple[int, int], vmax: float | None = None) -> np.ndarray:
    """The g x g weights upsampled bicubically to `size` (width, height) and scaled to 0..1 by `vmax` (the
    weights' own largest when None): [height, width] floats, each region's weight at its cell's centre."""
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    g = grid_size(w.size)
    top = float(vmax if vmax is not None else w.max())
    grid = w.reshape(g, g) / (top if top > 0 else 1.0)
    return np.clip(np.asarray(Image.fromarray(grid).resize(size, Image.BICUBIC)), 0.0, 1.0)


def overlay(photo: Image.Image, weights: torch.Tensor | Sequence[float], vmax: float | None = None,
            alpha: float = 0.55) -> Image.Image:
    """The photo with the weights' heat map blended over it (`heatmap`'s scale), for the CLI's figure and
    the demo alike."""
    from matplotlib import colormaps
    photo = photo.convert("RGB")
    heat = colormaps[COLOURS](heatmap(weights, photo.size, vmax))[..., :3]
    return Image.blend(photo, Image.fromarray((heat * 255).round().astype(np.uint8)), alpha)


def thumbnail(image: "ImageSource", pixels: int = PANEL_PIXELS) -> Image.Image:
    """The photo as the encoder saw it (upright RGB, images.load_image), at most `pixels` on its longest side."""
    from .images import load_image
    img = load_image(image).copy()
    img.thumbnail((pixels, pixels), Image.BICUBIC)
    return img


def plot(image: "ImageSource", words: Sequence[WordAttention], path: str | Path | None = None,
         columns: int = 5) -> "Figure":
    """One figure: the photo, then a panel per word with its heat map (one colour scale for the whole
    caption, so panels compare) under the word and its global share. Saved to `path` when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    if not words:
        raise CaptionerError("no words to plot")
    photo = thumbnail(image)
    vmax = max(float(w.weights.max()) for w in words)
    n = len(words) + 1
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    aspect = photo.height / photo.width
    fig = Figure(figsize=(2.6 * cols, (2.6 * aspect + 0.7) * rows), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [("photo", "", photo)] + [(w.word, f"global {w.global_share:.0%}", overlay(photo, w.weights, vmax))
                                       for w in words]
    for i, (title, note, img) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(img))
        ax.set_title(title, fontsize=13)
        ax.set_xlabel(note, fontsize=8, color="0.35")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(" ".join(w.word for w in words), fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
