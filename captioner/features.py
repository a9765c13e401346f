"""Encoder features computed once and cached on disk.

With a frozen encoder every epoch would recompute identical CNN outputs; instead each image's pooled
feature vector is stored once in a memory-mapped .npy under a key made of the image list (paths and
a digest of each file's bytes), the encoder and its preprocessing, so any change rebuilds it and nothing
else does (a remount, a fresh copy in place or `touch` keeps the cache). Extraction is resumable:
progress is recorded every few seconds. Unreadable images are skipped and reported, not fatal.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import atomic_write_text
from .encoders import Encoder, Preprocess, Trunk, TunedTop
from .errors import CaptionerError
from .images import ImageError

CACHE_VERSION = 2
# Progress goes to disk at most this often: a flush and an fsynced index after every small batch cost more
# than the encoder itself on a GPU (eval/RESULTS.md, "Speed").
SAVE_SECONDS = 2.0


def default_cache_dir() -> Path:
    base = os.environ.get("CAPTIONER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "captioner")
    return Path(base) / "features"


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers; failures come back as messages."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, offset: int = 0):
        self.paths, self.preprocess, self.offset = list(paths), preprocess, offset

    def __len__(self) -> int:
        return len(self.paths) - self.offset

    def __getitem__(self, i: int):
        i += self.offset
        try:
            return i, self.preprocess(self.paths[i]), ""
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # one bad file must never stop extraction
            return i, None, f"{type(e).__name__}: {e}"


def collate_images(batch):
    idx = [i for i, _, _ in batch]
    ok = [(i, x) for i, x, _ in batch if x is not None]
    errors = {i: e for i, x, e in batch if x is None}
    tensor = torch.stack([x for _, x in ok]) if ok else None
    return idx, [i for i, _ in ok], tensor, errors


@dataclass
class FeatureSet:
    """Row i holds image paths[i]'s features; `bad` maps unreadable paths to the reason."""

    paths: list[str]
    features: np.ndarray  # [N, D] float16, memory-mapped (in memory from model_features' tuned stages)
    bad: dict[str, str]

    def valid_mask(self) -> np.ndarray:
        bad = set(self.bad)
        return np.array([p not in bad for p in self.paths], dtype=bool)


@functools.lru_cache(maxsize=200_000)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-1 of a file's bytes, memoised while its size and time stay: reading the images again costs far
    less than recomputing their features after a remount or a copy."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_key(paths: Sequence[Path], encoder: Encoder, weights_tag: str = "", preprocess: Preprocess | None = None) -> str:
    h = hashlib.sha256()
    pre = preprocess or encoder.preprocess
    h.update(json.dumps({"v": CACHE_VERSION, "encoder": encoder.name, "pre": pre.to_dict(),
                         "weights": weights_tag, "dim": encoder.dim}).encode())
    for p in map(os.path.abspath, paths):
        try:
            st = os.stat(p)
            digest = _file_digest(p, st.st_size, st.st_mtime_ns)
        except OSError:
            digest = "missing"
        h.update(f"{p}|{digest}\n".encode())
    return h.hexdigest()[:24]


def _reserve(npy: Path, cache_dir: Path) -> None:
    """Allocate the memory-mapped file's blocks now: the new file is sparse, and writing through a map
    onto a full disk kills the process with SIGBUS instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        fd = os.open(npy, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            n = npy.stat().st_size
            size = f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
            raise CaptionerError(f"no space left for the feature cache in {cache_dir} (needs {size}); "
                                 f"free some or pass --cache-dir DIR") from None
        # other errors (e.g. a filesystem without fallocate): carry on as before


def extract_features(encoder: Encoder, paths: Sequence[Path], cache_dir: str | Path | None = None,
                     batch_size: int | None = None, workers: int = 2, progress: bool = True, weights_tag: str = "",
                     device: str = "cpu", preprocess: Preprocess | None = None) -> FeatureSet:
    """Pooled encoder features for `paths`, from the cache when it is complete, else computed (resuming).

    `preprocess` picks another view of the images than the encoder's own (a mirrored or cropped one).
    Small batches are fastest on CPU (cache-resident activations): batch 4 gave 170 img/s, 32 gave 42; a GPU
    gets 64 unless told.
    """
    batch_size = batch_size or (4 if device == "cpu" else 64)
    preprocess = preprocess or encoder.preprocess
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptionerError(f"cannot create feature cache folder {cache_dir}: {e.strerror or e}") from None
    key = cache_key(paths, encoder, weights_tag, preprocess)
    npy, index = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    paths = [str(p) for p in paths]
    state = {"paths": paths, "done": 0, "bad": {}, "complete": False, "encoder": encoder.name}
    if index.exists() and npy.exists():
        try:
            saved = json.loads(index.read_text())
            if saved.get("paths") == paths:
                state = saved
        except (json.JSONDecodeError, OSError):
            pass
    if state["complete"]:
        return FeatureSet(paths, np.load(npy, mmap_mode="r"), state["bad"])
    if state["done"] == 0 or not npy.exists():
        state["done"], state["bad"] = 0, {}
        feats = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(len(paths), encoder.dim))
    else:
        feats = np.load(npy, mmap_mode="r+")
    _reserve(npy, cache_dir)
    encoder = encoder.to(device).eval()
    if device == "cpu":  # leave two cores to the encoder's threads: on a 2-core CPU, decoding workers fighting
        workers = min(workers, max(0, (os.cpu_count() or 1) - 2))  # them were far slower than inline
    data = ImageFiles([Path(p) for p in paths], preprocess, offset=state["done"])
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
                        persistent_workers=False, pin_memory=device != "cpu")
    bar = tqdm(total=len(paths), initial=state["done"], desc=f"features ({encoder.name})", unit="img",
               disable=not progress, dynamic_ncols=True)
    saved_at, saved_done = time.monotonic(), state["done"]

    def save_progress() -> None:  # features first, then the index that vouches for them
        nonlocal saved_at, saved_done
        feats.flush()
        atomic_write_text(index, json.dumps(state))
        saved_at, saved_done = time.monotonic(), state["done"]
    try:
        for idx, ok_idx, x, errors in loader:
            if x is not None:
                with torch.inference_mode():
                    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    out = encoder(x).float().cpu().numpy()
                feats[ok_idx] = out.astype(np.float16)
            for i, msg in errors.items():
                state["bad"][paths[i]] = msg
                feats[i] = 0
            state["done"] = max(idx) + 1
            if time.monotonic() - saved_at >= SAVE_SECONDS:
                save_progress()
            bar.update(len(idx))
    finally:
        bar.close()
        if state["done"] > saved_done:  # interrupted: keep what was computed (best effort)
            try:
                save_progress()
            except OSError:
                pass
    state["complete"] = True
    feats.flush()
    atomic_write_text(index, json.dumps(state))
    del feats
    return FeatureSet(paths, np.load(npy, mmap_mode="r"), state["bad"])


def model_features(encoder: Encoder, paths: Sequence[Path], cache_dir: str | Path | None = None, workers: int = 2,
                   progress: bool = True, device: str = "cpu", preprocess: Preprocess | None = None) -> FeatureSet:
    """A checkpoint's encoder's pooled features for `paths` (evaluation, SCST). An encoder whose last stages
    were fine-tuned runs them on the cached maps below them (encoders.Trunk: the same cache training filled,
    shared by every checkpoint tuned from the same trunk), which costs a small part of a pass over the images."""
    if not encoder.tuned_alone:
        return extract_features(encoder, paths, cache_dir, workers=workers, progress=progress, device=device,
                                weights_tag=encoder.weights_tag(), preprocess=preprocess)
    trunk = Trunk(encoder.to(device).eval(), encoder.tuned_alone)
    maps = extract_features(trunk, paths, cache_dir, workers=workers, progress=progress, device=device,
                            preprocess=preprocess)
    top = TunedTop(trunk)
    out = np.zeros((len(maps.paths), encoder.dim), dtype=np.float16)
    with torch.inference_mode():
        for i in range(0, len(out), 64):
            rows = torch.from_numpy(np.asarray(maps.features[i:i + 64], dtype=np.float32)).to(device)
            out[i:i + 64] = top(rows).float().cpu().numpy()
    out[~maps.valid_mask()] = 0  # unreadable images stay zero rows, as extract_features leaves them
    return FeatureSet(maps.paths, out, maps.bad)


class FeatureRows:
    """The rows of several cached feature files (one per view, view k's rows after view k-1's), read on
    demand with pread. Training on the CPU indexes this instead of a table in its own memory: the files stay
    in the OS page cache, shared by the runs the recipe trains side by side, and a run's peak memory does
    not grow with the features."""

    def __init__(self, sets: Sequence[FeatureSet]):
        self.files, self.n, self.dim = [], len(sets[0].paths), sets[0].features.shape[1]
        fmt = np.lib.format
        for s in sets:
            f = open(s.features.filename, "rb")
            header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = header(f)
            if fortran or shape != (self.n, self.dim) or dtype != np.float16:
                raise CaptionerError(f"feature cache {s.features.filename} is not a float16 table of {self.n} rows")
            self.files.append((f, f.tell()))

    def __len__(self) -> int:
        return self.n * len(self.files)

    def __getitem__(self, rows) -> torch.Tensor:
        size = self.dim * 2
        out = bytearray(len(rows) * size)
        for j, r in enumerate(rows):
            f, start = self.files[r // self.n]
            out[j * size:(j + 1) * size] = os.pread(f.fileno(), size, start + (r % self.n) * size)
        return torch.frombuffer(out, dtype=torch.float16).view(len(rows), self.dim)

    def close(self) -> None:
        for f, _ in self.files:
            f.close()
