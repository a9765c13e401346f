"""ONNX export: the model as files that onnxruntime runs without torch (captioner/onnx_runtime.py decodes them).

One file per CNN (image tensor in, pooled features out), the decoder's init-state function and its one-step
function (for an ensemble, the whole ensemble's step: the members' probabilities averaged inside the graph),
`vocab.json`, and `decoding.json`: the shipped decoding settings and each CNN's preprocessing, which the
runtime repeats exactly as encoders.Preprocess does it. Everything is float32, the torch path's
`precision="float32"`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .config import Decoding
from .encoders import CROP_SCALE, GRIDS, Encoder, SharedTrunk, parts_of
from .errors import CaptionerError
from .model import Decoder, Ensemble

FORMAT = "captioner-onnx-1"
OPSET = 17
INIT_FILE, STEP_FILE, VOCAB_FILE, DECODING_FILE = "init_state.onnx", "step.onnx", "vocab.json", "decoding.json"


def _pool(fmap: torch.Tensor, pool: str) -> torch.Tensor:
    """Encoder.pool_map with the region grid's cells as explicit slices: the exporter refuses adaptive
    pooling whose bins do not divide the map, and the map's size is fixed by the encoder's input size."""
    pooled = [fmap.mean((2, 3))]
    g = GRIDS[pool]
    height, width = int(fmap.shape[2]), int(fmap.shape[3])
    for i in range(g):  # adaptive pooling's bins: floor(i * n / g) to ceil((i + 1) * n / g), row-major
        for j in range(g):
            rows = slice(i * height // g, -(-(i + 1) * height // g))
            cols = slice(j * width // g, -(-(j + 1) * width // g))
            pooled.append(fmap[:, :, rows, cols].mean((2, 3)))
    return torch.cat(pooled, 1)


class EncoderGraph(nn.Module):
    """One CNN's image batch [N, 3, S, S] (preprocessed) -> its pooled features [N, D], as `encoder(x)`."""

    def __init__(self, encoder: Encoder | SharedTrunk):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if isinstance(enc, SharedTrunk):  # the trunk once, then each member's own tuned stages
            h = enc.trunk(image, enc.tuned)
            maps = []
            for m in enc.members:
                x = h
                for step in m.steps[m._cut(enc.tuned):]:
                    x = step(x)
                maps.append(x)
        else:
            maps = [enc.feature_map(image)]
        return torch.cat([_pool(m, enc.pool) for m in maps], 1)


class InitGraph(nn.Module):
    """features [N, D] -> the decoder's state after reading the image: h, c [layers, N, H] (an ensemble's
    members stacked on the layer axis) and, with attention, the region memory [R, N, 2H per member]."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.decoder.init_state(features))


class StepGraph(nn.Module):
    """(tokens [rows], h, c, memory) -> (next-word log-probabilities [rows, V], h, c): `decoder.step`; an
    ensemble's averages its members' probabilities. The memory holds one row per image, the state any
    number of rows per image (a beam's), images in order."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                *memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp, state = self.decoder.step(tokens, (h, c, *memory))
        return logp, state[0], state[1]


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    # the TorchScript exporter: it needs no onnxscript, and these graphs are plain tensor code
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shapes read as constants (fixed image sizes)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def preprocessing(encoder: Encoder) -> dict:
    """How encoders.Preprocess.to_tensor turns a loaded image into this CNN's input, as data."""
    pre = encoder.preprocess
    return {"size": pre.size, "mean": list(pre.mean), "std": list(pre.std), "crop_scale": CROP_SCALE,
            "load": f"images.load_image(path, draft_size={pre.size}): upright 8-bit RGB; a JPEG may be decoded "
                    f"at a reduced scale that stays at least {pre.size} px on each side",
            "resize": f"PIL resize to {pre.size}x{pre.size} (aspect ratio not kept), Image.BICUBIC",
            "normalise": "float32 RGB pixels / 255, minus mean, divided by std, per channel; laid out [3, H, W]",
            "views": {"2": "the image and its mirror image (PIL FLIP_LEFT_RIGHT after the resize)",
                      "6": f"and its four corner crops, round(w * {CROP_SCALE}) x round(h * {CROP_SCALE}), "
                           "taken before the resize",
                      "average": "mean of the views' features; a mirrored view's region grid mirrored back first"}}


def export_onnx(model: str | Path | None, out_dir: str | Path) -> list[Path]:
    """Write the model `model` (a checkpoint or run folder; the bundled model when None) to `out_dir` as ONNX
    files plus vocab.json and decoding.json. Returns the files written."""
    from .inference import BUNDLED_MODEL, load_model
    try:
        import onnx  # noqa: F401  (the exporter writes its protobuf)
    except ImportError:
        raise CaptionerError('ONNX export needs the onnx package: pip install "captioner[onnx]"') from None
    if model is None:
        if not BUNDLED_MODEL.is_file():
            raise CaptionerError(f"bundled model missing at {BUNDLED_MODEL}; pass --model CKPT")
        model = BUNDLED_MODEL
    decoder, vocab, encoder, _ = load_model(model)
    decoder, encoder = decoder.float().eval(), encoder.float().eval()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CaptionerError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    encoders = []
    for i, enc in enumerate(parts_of(encoder)):
        size = enc.preprocess.size
        path = out / f"encoder{i}.onnx"
        dummy = torch.zeros(2, 3, size, size)
        graph = EncoderGraph(enc).eval()
        with torch.no_grad():
            if not torch.allclose(graph(dummy), enc(dummy.contiguous(memory_format=torch.channels_last)),
                                  rtol=1e-4, atol=1e-5):
                raise CaptionerError(f"{enc.name}: the exportable pooling does not match the encoder's")
        _export(graph, (dummy,), path, ["image"], ["features"], {"image": {0: "images"}, "features": {0: "images"}})
        written.append(path)
        encoders.append({"file": path.name, "name": enc.name, "dim": enc.dim, "pool": enc.pool,
                         "grid": GRIDS[enc.pool], "parts": enc.parts, "preprocess": preprocessing(enc)})

    regions = decoder.cfg.regions
    feats = torch.randn(2, encoder.dim)
    state = decoder.init_state(feats)
    names = ["h", "c", "memory"][:len(state)]
    _export(InitGraph(decoder).eval(), (feats,), out / INIT_FILE, ["features"], names,
            {"features": {0: "images"}, **{n: {1: "images"} for n in names}})
    written.append(out / INIT_FILE)

    rows = 3  # rows per image in the example step, unlike the image count, so no shape is taken for another
    h, c = (s.repeat_interleave(rows, dim=1) for s in state[:2])
    tokens = torch.full((h.shape[1],), vocab.start_id, dtype=torch.long)
    step_inputs = ["tokens", "h", "c", *(["memory"] if regions else [])]
    _export(StepGraph(decoder).eval(), (tokens, h, c, *state[2:]), out / STEP_FILE, step_inputs,
            ["logp", "h_out", "c_out"],
            {"tokens": {0: "rows"}, "h": {1: "rows"}, "c": {1: "rows"}, "logp": {0: "rows"},
             "h_out": {1: "rows"}, "c_out": {1: "rows"}, **({"memory": {1: "images"}} if regions else {})})
    written.append(out / STEP_FILE)

    (out / VOCAB_FILE).write_text(json.dumps(vocab.to_list(), ensure_ascii=False), encoding="utf-8")
    members = list(decoder.members) if isinstance(decoder, Ensemble) else [decoder]
    settings = {
        "format": FORMAT,
        "decoding": asdict(Decoding()),
        "suppress_unk": True,  # as Captioner.decode: <unk> is never written
        "special_ids": {"pad": vocab.pad_id, "start": vocab.start_id, "end": vocab.end_id, "unk": vocab.unk_id},
        "encoders": encoders,
        "feature_dim": encoder.dim,
        "decoder": {"init_state": INIT_FILE, "step": STEP_FILE, "members": len(members),
                    "layers": sum(m.cfg.num_layers for m in members), "hidden": decoder.cfg.hidden_dim,
                    "regions": regions, "vocab_size": len(vocab),
                    "step_inputs": step_inputs, "step_outputs": ["logp", "h_out", "c_out"]},
        "precision": "float32",
        "model": Path(model).name,
    }
    (out / DECODING_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    written += [out / VOCAB_FILE, out / DECODING_FILE]
    return written
