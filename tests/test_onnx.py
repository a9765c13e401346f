"""ONNX export (`captioner export --format onnx`) and its torch-free runtime (captioner/onnx_runtime.py): the
files are valid ONNX, the runtime imports no torch, and it writes the torch path's captions on Flickr8k dev
photos, bar near-ties that float rounding may break either way.

The bundled model is exported once for the module (about 20 s of CPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from captioner import Captioner, Decoding
from captioner.cli import main
from captioner.data import load_dataset
from captioner.encoders import parts_of
from captioner.images import load_image
from captioner.onnx_runtime import OnnxCaptioner, to_array
from captioner.onnx_runtime import main as onnx_main
from conftest import ROOT, require_shared

EXAMPLE = ROOT / "captioner" / "assets" / "examples" / "pizza.jpg"
FILES = ["decoding.json", "encoder0.onnx", "encoder1.onnx", "init_state.onnx", "step.onnx", "vocab.json"]
BEAM_IMAGES, GREEDY_IMAGES = 100, 30
NEAR_TIE = 1e-3  # log-probability gap under which float32 rounding may pick either caption
MAX_TIES = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--format", "onnx", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def torch_cap() -> Captioner:
    """The torch path at float32 on one thread: on a busy machine a pool's threads wait for each other at
    every operation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Captioner.load(precision="float32")
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ort_cap(exported: Path) -> OnnxCaptioner:
    return OnnxCaptioner(exported, threads=1)


def test_export_writes_valid_onnx_and_settings(exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == FILES
    for name in FILES:
        if name.endswith(".onnx"):
            onnx.checker.check_model(str(exported / name), full_check=True)
    conf = json.loads((exported / "decoding.json").read_text())
    assert conf["decoding"] == asdict(Decoding()) and conf["suppress_unk"] is True
    pres = [(e["name"], e["preprocess"]["size"]) for e in conf["encoders"]]
    assert pres == [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)]
    assert json.loads((exported / "vocab.json").read_text())[:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_runtime_imports_no_torch(exported: Path, tmp_path: Path) -> None:
    """A real process captions a photo, reports a non-image in one line, and never loads torch."""
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    code = ("import sys\nfrom captioner.onnx_runtime import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(exported), str(EXAMPLE), str(bad), "--threads", "1"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stderr[-2000:]  # 1: one image failed
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{EXAMPLE}\t") and len(lines[0].split("\t")[1].split()) >= 3
    assert done.stderr.splitlines() == [f"captioner: error: not an image file (unrecognised format): {bad}"]


def test_bad_input_is_one_line(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in FILES:
        if name != "encoder1.onnx":
            (partial / name).symlink_to(exported / name)
    cases = [([str(tmp_path / "absent"), str(EXAMPLE)], "not a folder"),
             ([str(partial), str(EXAMPLE)], "missing " + str(partial / "encoder1.onnx")),
             ([str(exported / "vocab.json"), str(EXAMPLE)], "not a folder")]
    for argv, message in cases:
        assert onnx_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("captioner: error: ") and message in err, err
    assert main(["export", "--format", "onnx", str(tmp_path / "out"), "--model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err, err


def test_parser_imports_no_torch() -> None:
    code = ("import sys; from captioner.cli import build_parser; "
            "a = build_parser().parse_args(['export', '--format', 'onnx', 'out']); "
            "print(a.out_dir, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split() == ["out", "False"], done.stderr[-2000:]


def _compare(torch_caps: list, onnx_caps: list, names: list[str]) -> tuple[list[str], float]:
    """The images whose captions differ, in words, and the largest log-probability gap where they agree."""
    differ, gap = [], 0.0
    for name, a, b in zip(names, torch_caps, onnx_caps):
        if a.text != b.text:
            differ.append(f"{name}: torch {a.logprob:.5f} \"{a.text}\" vs onnx {b.logprob:.5f} \"{b.text}\"")
        else:
            gap = max(gap, abs(a.logprob - b.logprob))
    return differ, gap


def _near_ties_only(differ: list[str], torch_caps: list, onnx_caps: list) -> bool:
    gaps = [abs(a.logprob - b.logprob) for a, b in zip(torch_caps, onnx_caps) if a.text != b.text]
    return len(differ) <= MAX_TIES and all(g < NEAR_TIE for g in gaps)


def test_same_captions_as_torch(torch_cap: Captioner, ort_cap: OnnxCaptioner) -> None:
    data = require_shared("flickr8k")
    paths = [r.image for r in load_dataset(data, split="dev").records[:BEAM_IMAGES]]
    names = [Path(p).name for p in paths]
    cap = torch_cap
    assert ort_cap.decoding == Decoding()

    for enc, spec in zip(parts_of(cap.encoder), ort_cap.encoders):  # preprocessing: the very same numbers
        img = load_image(paths[0], draft_size=enc.preprocess.size)
        assert np.array_equal(enc.preprocess.to_tensor(img).numpy(), to_array(img, spec["preprocess"]))
    feats = cap.encode(paths)
    ort_feats = ort_cap.encode(paths)
    assert np.abs(feats.numpy() - ort_feats).max() < 1e-3 * max(1.0, float(feats.abs().max()))

    for what, n, settings in [("beam search as shipped", BEAM_IMAGES, {}), ("greedy", GREEDY_IMAGES, {"beam_size": 1})]:
        torch_caps = cap.decode(feats[:n], Decoding(), **settings)
        onnx_caps = ort_cap.decode(ort_feats[:n], Decoding(), **settings)
        differ, gap = _compare(torch_caps, onnx_caps, names)
        assert _near_ties_only(differ, torch_caps, onnx_caps), (
            f"{what}: {len(differ)} of {n} captions differ (allowed: {MAX_TIES} near-ties, log-probabilities "
            f"within {NEAR_TIE}):\n" + "\n".join(differ))
        assert gap < NEAR_TIE, f"{what}: the same captions' log-probabilities differ by up to {gap:.2e}"
        print(f"{what}: {n - len(differ)}/{n} captions identical; near-ties: {differ or 'none'}")


def test_views_match_torch(torch_cap: Captioner, ort_cap: OnnxCaptioner) -> None:
    """Mirrored and cropped views (--views 6) average to the torch path's features."""
    feats = torch_cap.encode([EXAMPLE], views=6).numpy()
    assert np.abs(feats - ort_cap.encode([EXAMPLE], views=6)).max() < 1e-3 * max(1.0, float(np.abs(feats).max()))
