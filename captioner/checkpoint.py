"""Checkpoints: safetensors tensors + JSON metadata in one file, written atomically, never unpickled.

A model checkpoint holds everything needed to caption: decoder weights, decoder config, vocabulary,
encoder name and preprocessing (and the encoder's weights when it was fine-tuned).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file

from .errors import CaptionerError

FORMAT = "captioner-v1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
# How weights are stored: float32 as trained; float16 halves the file; int8 quarters the matrices
# (each row scaled by its own largest magnitude, the scales kept beside it as float32 under SCALE_SUFFIX).
STORAGES = ("float32", "float16", "int8")
SCALE_SUFFIX = ".int8_scale"
# int8 files store a fine-tuned stage's kernels as their difference from the package's pretrained weights in
# 4 bits (15 levels per output row, two a byte), which the checkpoint can rebuild (encoders.tuned_alone).
DELTA_SUFFIX, DELTA_SCALE_SUFFIX = ".delta4", ".delta4_scale"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """`atomic_write_bytes` for writers that take a file name: `write(tmp)` fills the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode a plain open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # e.g. a full disk: say which file it was
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def check_out_dir(path: str | Path) -> Path:
    """Fail early (before long work) when an output folder cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CaptionerError(f"--out {path} exists and is not a folder")
    return path


def prepare_out_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create an output folder, or say in one line why it cannot be."""
    path = check_out_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptionerError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def first_problem(e: Exception) -> str:
    """The informative line of load_state_dict's message (its first line only says that it failed)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    useful = [l for l in lines if l.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (useful or lines or [type(e).__name__])[0][:200]


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temporary files left by `atomic_write_bytes` in a process that was killed mid-write
    (`.NAME.XXXX.tmp`); call it only where no other process is writing into `folder`."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def pack_weights(tensors: dict[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """Weights as `storage` keeps them on disk; integer tensors and int8's vectors (biases) stay float16
    or as they are, since a row of one number gains nothing from its own scale."""
    if storage not in STORAGES:
        raise CaptionerError(f"unknown weight storage {storage!r} (choose one of: {', '.join(STORAGES)})")
    packed: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if not v.is_floating_point() or storage == "float32":
            packed[k] = v
        elif storage == "float16" or v.dim() < 2:
            packed[k] = v.half()
        else:  # a matrix, or a convolution's kernels: one scale per output row
            scale = v.float().abs().amax(tuple(range(1, v.dim())), keepdim=True).clamp_min(1e-12) / 127
            packed[k] = torch.round(v.float() / scale).to(torch.int8)
            packed[k + SCALE_SUFFIX] = scale
    return packed


def unpack_weights(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """float32 weights from any of STORAGES (int8 rows times their scales)."""
    out = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    for k, scale in tensors.items():
        if not k.endswith(SCALE_SUFFIX):
            continue
        name = k[: -len(SCALE_SUFFIX)]
        q = tensors.get(name)
        if q is None or q.dtype != torch.int8 or q.dim() < 2 or tuple(scale.shape) != (q.shape[0],) + (1,) * (q.dim() - 1):
            raise CaptionerError(f"{path}: int8 scale {k} has no matching int8 matrix {name}")
        out[name] = q.float() * scale.float()
    unscaled = [k for k, v in out.items() if v.dtype == torch.int8]
    if unscaled:
        raise CaptionerError(f"{path}: int8 weights {unscaled[0]} come without their scale ({unscaled[0]}{SCALE_SUFFIX})")
    return out


def pack_delta4(w: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w - base`, one float16 scale per output row and a level in -7..7 per weight, two levels a byte."""
    d = (w.float() - base.float()).reshape(w.shape[0], -1)
    scale = (d.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7).half()
    q = (torch.round(d / scale.float()).clamp(-7, 7) + 8).to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1), value=8)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def unpack_delta4(packed: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """`base` plus the 4-bit difference; None when the stored tensors do not fit `base`'s shape."""
    cols = base[0].numel() if base.dim() else 0
    if (packed.dtype != torch.uint8 or packed.dim() != 2 or base.dim() < 2 or packed.shape[0] != base.shape[0]
            or packed.shape[1] != (cols + 1) // 2 or tuple(scale.shape) != (base.shape[0], 1)):
        return None
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)[:, :cols]
    return base.float() + ((q.float() - 8) * scale.float()).view(base.shape)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors plus a JSON document (under the metadata key 'captioner')."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "captioner": json.dumps(meta)}
    def write(tmp: str) -> None:  # save_file writes straight from the tensors' memory: no copy of the state
        try:
            st_save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) arrive as text: "... (os error 28)"
            found = re.search(r"os error (\d+)", str(e))
            if not found:
                raise
            raise OSError(int(found.group(1)), os.strerror(int(found.group(1)))) from None
    try:
        atomic_write(path, write)
    except OSError as e:
        raise CaptionerError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`; anything else gets a one-line explanation."""
    path = Path(path)
    if not path.exists():
        raise CaptionerError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in ("best.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return load_tensors(path / name)
        raise CaptionerError(f"{path} is a folder with no best.safetensors or model.safetensors in it")
    data = path.read_bytes()
    # safetensors: 8 bytes of header length (any value: its low byte is 0x80 once in 256 files), then '{'.
    # A pickle starts with 0x80 + protocol byte, a torch.save zip with 'PK'.
    looks_safetensors = data[8:9] == b"{"
    if path.suffix.lower() in PICKLE_SUFFIXES or (not looks_safetensors and (data[:2] == b"PK" or data[:1] == b"\x80")):
        raise CaptionerError(f"refusing {path}: it looks like a pickle/PyTorch file, which can run code when "
                             f"loaded; captioner checkpoints are .safetensors files")
    try:
        import struct
        if len(data) < 8:
            raise SafetensorError("file too short")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > len(data) - 8:
            raise SafetensorError("header longer than file")
        header = json.loads(data[8:8 + header_len])
        if not isinstance(header, dict):
            raise SafetensorError("header is not a JSON object")
        meta_raw = header.get("__metadata__") or {}
        if not isinstance(meta_raw, dict):
            raise SafetensorError("__metadata__ is not a JSON object")
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, struct.error, OverflowError) as e:
        raise CaptionerError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {e}") from None
    if meta_raw.get("format") != FORMAT or "captioner" not in meta_raw:
        raise CaptionerError(f"{path} is a safetensors file but not a captioner checkpoint (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(meta_raw["captioner"])
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path}: checkpoint metadata is malformed JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise CaptionerError(f"{path}: checkpoint metadata is not a JSON object")
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under `prefix` ("decoder.", "model.", "encoder."), named as the module's own
    state_dict names them: one file holds several modules' weights side by side."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
