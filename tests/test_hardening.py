"""Hardening: training survives SIGKILL, untrusted files run no code, bad data does not stop training,
every user error on the CLI is one clear line.

Most CLI cases call `captioner.cli.main` in this process (a subprocess per case would cost seconds of
imports each); `test_cli_errors_in_a_real_process` checks a few in real processes, and the SIGKILL test
runs `python -m captioner train` for real.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import load_tensors, save_tensors
from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.train import TrainConfig, train
from conftest import ROOT, make_images, make_tiny_dataset

TINY = ["--embed-dim", "16", "--hidden-dim", "16", "--min-count", "1", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is much faster than a pool (and the subprocesses get one too, so the
    reference run and the killed runs compute alike)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """10 synthetic images (8 train, 2 dev), 3 captions each, and a feature cache shared by the module."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_dataset(root)


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory) -> Path:
    """A finished one-epoch run folder: best.safetensors, state.safetensors, vocab.json, config.json."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(data=str(tiny / "caps.csv"), out=str(out), cache_dir=str(tiny / "cache"), embed_dim=16,
                      hidden_dim=16, min_count=1, batch_size=4, epochs=1, workers=0), progress=False)
    return out


def cli(capfd, *args) -> tuple[int, str]:
    """Exit status and stderr of `captioner ARGS`, run in this process."""
    capfd.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    _, err = capfd.readouterr()
    return rc, err


def assert_one_line(rc, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert rc not in (0, None) and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("captioner: error: "), err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


def assert_usage_error(rc, err: str, *needles: str) -> None:
    """argparse's own errors: the usage (possibly wrapped over lines), then one `error:` line."""
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[0].startswith("usage: captioner") and ": error: " in lines[-1], err
    assert sum(": error: " in l for l in lines) == 1, err
    for n in needles:
        assert n in lines[-1], err


# --- 1. training never loses work ---------------------------------------------------------------------

SITE_HOOK = '''\
"""Test-only process hooks (tests/test_hardening.py), off unless their variables are set."""
import os, time
_delay = float(os.environ.get("HARDENING_SLOW_FSYNC") or 0)
if _delay:  # a slow disk: every fsync takes a while, so a kill can land while a save is in progress
    _fsync = os.fsync
    def _slow_fsync(fd):
        time.sleep(_delay)
        _fsync(fd)
    os.fsync = _slow_fsync
if os.environ.get("HARDENING_NAIVE_WRITES"):  # what atomic writes replace: overwriting the file in place
    import captioner.checkpoint as _c
    def _naive(path, write):
        import tempfile
        fd, tmp = tempfile.mkstemp()
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            data = f.read()
        os.unlink(tmp)
        with open(path, "wb") as f:
            for i in range(0, len(data), 32768):
                f.write(data[i:i + 32768])
                f.flush()
                os.fsync(f.fileno())
    _c.atomic_write = _naive
'''


class Trainer:
    """`python -m captioner train` in a subprocess, with optional slow-disk / naive-write hooks."""

    def __init__(self, tiny: Path, out: Path, hooks: Path):
        self.tiny, self.out, self.hooks, self.n = tiny, out, hooks, 0
        hooks.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(SITE_HOOK)

    def start(self, slow_fsync: float = 0.0, naive: bool = False) -> subprocess.Popen:
        if (self.out / "state.safetensors").exists():
            args = ["--resume", str(self.out), "--quiet"]
        else:  # killed before the first save: start again (no --overwrite needed, there is no state yet)
            args = ["--data", str(self.tiny / "caps.csv"), "--out", str(self.out), "--cache-dir",
                    str(self.tiny / "cache"), *TINY, "--epochs", "2", "--save-every", "1", "--quiet"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.hooks), str(ROOT)]),
               "HARDENING_SLOW_FSYNC": str(slow_fsync), "HARDENING_NAIVE_WRITES": "1" if naive else "",
               "OMP_NUM_THREADS": "1"}
        self.n += 1
        log = open(self.out.parent / f"train{self.n}.log", "wb")
        return subprocess.Popen([sys.executable, "-m", "captioner", "train", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def temp_files(self) -> set[str]:
        return {p.name for p in self.out.glob(".state.safetensors.*.tmp")} if self.out.is_dir() else set()

    def state_id(self) -> tuple:
        """Changes whenever state.safetensors is replaced."""
        try:
            st = (self.out / "state.safetensors").stat()
            return st.st_ino, st.st_mtime_ns, st.st_size
        except FileNotFoundError:
            return ()

    def saved_step_changed(self) -> int:
        """saved_step(), reading the file only when it was replaced since the last call (cheap to poll)."""
        now = self.state_id()
        if now != getattr(self, "_seen", (None, -1))[0]:
            self._seen = (now, self.saved_step())
        return self._seen[1]

    def saved_step(self) -> int:
        """Step recorded in state.safetensors (-1 before the first save); it must always be loadable."""
        path = self.out / "state.safetensors"
        if not path.exists():
            return -1
        _, meta = load_tensors(path)
        return meta["progress"]["step"]


def _wait(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll `pred` every 2 ms until it holds (True) or the process ends (False)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("training made no progress in time")


def _reference(tiny: Path, out: Path) -> None:
    train(TrainConfig(data=str(tiny / "caps.csv"), out=str(out), cache_dir=str(tiny / "cache"), embed_dim=16,
                      hidden_dim=16, min_count=1, batch_size=4, epochs=2, workers=0, save_every=1), progress=False)


def test_sigkill_at_random_moments_and_mid_save_loses_nothing(tiny, tmp_path):
    """Killed 4 times (twice in the middle of writing state.safetensors, twice at random moments), the run
    folder always holds a loadable state and best model, and resuming ends in exactly the weights, optimizer
    state and dev losses of an uninterrupted run: no batch repeated or skipped."""
    _reference(tiny, tmp_path / "ref")
    t = Trainer(tiny, tmp_path / "killed", tmp_path / "hooks")
    t.out.mkdir()
    rng = random.Random(1234)
    last_step, mid_save_kills, steps = -1, 0, []
    for plan, target in [("save", 0), ("random", rng.randint(1, 3)), ("save", 0), ("random", rng.randint(7, 9))]:
        before = t.temp_files()
        proc = t.start(slow_fsync=0.3 if plan == "save" else 0.0)
        if plan == "save":  # kill while a new temporary state file is being written
            hit = _wait(lambda: bool(t.temp_files() - before), proc)
        else:  # kill at a random moment once the run got to step `target` (7-9: in epoch 2, after a dev evaluation)
            hit = _wait(lambda: t.saved_step_changed() >= target, proc)
            if hit:
                time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        proc.wait(timeout=30)
        if proc.returncode == 0:
            break  # finished before the kill: nothing more to interrupt
        assert proc.returncode == -signal.SIGKILL and hit, (t.out.parent / f"train{t.n}.log").read_text()
        mid_save_kills += plan == "save" and bool(t.temp_files() - before)  # its temp file outlived it
        step = t.saved_step()  # loadable after every kill ...
        assert step >= last_step  # ... and never older than what was saved before
        last_step = step
        steps.append(step)
        if (t.out / "best.safetensors").exists():
            _, meta = load_tensors(t.out / "best.safetensors")
            assert meta["decoder"]["vocab_size"] == len(meta["vocab"])
    assert len(steps) == 4 and mid_save_kills >= 1 and (t.out / "best.safetensors").exists()
    assert len({s for s in steps if s >= 0}) >= 2  # resumed from at least two different saved positions
    proc = t.start()
    assert proc.wait(timeout=300) == 0, (t.out.parent / f"train{t.n}.log").read_text()
    assert not list(t.out.glob(".*.tmp"))  # temp files of killed saves were cleaned up

    ref, _ = load_tensors(tmp_path / "ref" / "state.safetensors")
    got, meta = load_tensors(t.out / "state.safetensors")
    assert meta["progress"]["step"] == 12
    weights = [k for k in ref if k.startswith(("model.", "optim."))]
    assert weights and set(weights) == {k for k in got if k.startswith(("model.", "optim."))}
    for k in weights:
        assert torch.equal(ref[k], got[k]), k
    best_ref, _ = load_tensors(tmp_path / "ref" / "best.safetensors")
    best_got, _ = load_tensors(t.out / "best.safetensors")
    assert all(torch.equal(best_ref[k], best_got[k]) for k in best_ref)
    dev = [[json.loads(l)["dev_loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
           for d in (tmp_path / "ref", t.out)]
    assert dev[0] == dev[1] and len(dev[0]) == 2


def test_kill_harness_detects_a_non_atomic_writer(tiny, tmp_path):
    """The check above is not vacuous: with saves that overwrite the file in place (what
    atomic_write replaced), one SIGKILL mid-save leaves an unloadable state.safetensors."""
    t = Trainer(tiny, tmp_path / "naive", tmp_path / "hooks")
    t.out.mkdir()
    state = t.out / "state.safetensors"
    size = lambda: state.stat().st_size if state.exists() else 0  # noqa: E731
    proc = t.start(slow_fsync=0.05, naive=True)
    try:
        assert _wait(lambda: size() > 200_000, proc)  # a first complete save...
        assert _wait(lambda: 0 <= size() < 100_000, proc)  # ...then the next one, half way through
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with pytest.raises(CaptionerError, match="truncated or corrupt"):
        load_tensors(state)


# --- 2. untrusted files run no code -------------------------------------------------------------------

class RunsCode:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


EVIL_KINDS = ["pickle.pt", "torch-zip.pth", "pickle.pkl", "pickle-renamed.safetensors"]


def make_evil(kind: str, folder: Path) -> tuple[Path, Path]:
    marker = folder / f"PWNED-{kind}"
    path = folder / f"evil-{kind}"
    payload = {"state_dict": {"w": RunsCode(str(marker))}}
    if kind.startswith("torch-zip"):
        torch.save(payload, path)
        torch.load(path, weights_only=False)  # the payload really runs code when loaded unsafely...
    else:
        path.write_bytes(pickle.dumps(payload))
        pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()  # ...and the tests below check that captioner never does
    return path, marker


EVIL_USES = {
    "caption --model": lambda evil, tiny, tmp: ["caption", tiny / "img0.jpg", "--model", evil],
    "evaluate --model": lambda evil, tiny, tmp: ["evaluate", "--model", evil, "--data", tiny / "caps.csv", "--split",
                                                 "dev", "--cache-dir", tiny / "cache", "--workers", "0", "--quiet"],
    "train --scst --init": lambda evil, tiny, tmp: ["train", "--scst", "--init", evil, "--data", tiny / "caps.csv",
                                                    "--out", tmp / "scst", "--workers", "0", "--quiet"],
    "train --encoder-weights": lambda evil, tiny, tmp: ["train", "--data", tiny / "caps.csv", "--out", tmp / "run",
                                                        "--encoder-weights", evil, "--cache-dir", tiny / "cache",
                                                        *TINY, "--quiet"],
}


@pytest.mark.parametrize("kind", EVIL_KINDS)
@pytest.mark.parametrize("use", list(EVIL_USES))
def test_pickles_are_refused_without_running_code(capfd, tiny, tmp_path, use, kind):
    evil, marker = make_evil(kind, tmp_path)
    rc, err = cli(capfd, *EVIL_USES[use](evil, tiny, tmp_path))
    line = assert_one_line(rc, err, evil.name)
    assert any(w in line for w in ("refusing", "not a readable safetensors", "cannot read encoder weights")), line
    assert not marker.exists(), "unpickling ran code"


def test_malformed_config_json(capfd, tiny, tmp_path):
    base = ["train", "--data", tiny / "caps.csv", "--out", tmp_path / "run", "--cache-dir", tiny / "cache", "--quiet"]
    for text, needle in [("{bad json", "malformed JSON"), ("[1, 2]", "must hold a JSON object"),
                         ('{"batch_size": "abc"}', "batch_size must be a whole number"),
                         ('{"dropout": null}', "dropout must be a number"), ('{"epochs": 2.5}', "epochs must be"),
                         ('{"fancy": 1}', "unknown training option(s): fancy"), ('{"encoder": "vgg"}', "unknown encoder"),
                         ('{"amp": "yes"}', "amp must be true or false")]:
        if "amp" in text and "amp" not in {f for f in TrainConfig.__dataclass_fields__}:
            continue
        (tmp_path / "c.json").write_text(text)
        rc, err = cli(capfd, *base, "--config", tmp_path / "c.json")
        assert_one_line(rc, err, needle)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line(*cli(capfd, *base, "--config", tmp_path / "bin.json"), "--config")


@pytest.mark.parametrize("vocab, needle", [
    ("{not json", "malformed JSON"),
    ('{"a": 1}', "must hold a JSON list of words"),
    ('["a", "b"]', "malformed vocabulary"),
    ("EXTRA", "does not fit this run's vocab.json"),  # one word more than the saved weights have
    (None, "vocabulary file not found"),
])
def test_malformed_vocab_on_resume(capfd, tiny_run, tmp_path, vocab, needle):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    if vocab is None:
        (run / "vocab.json").unlink()
    elif vocab == "EXTRA":
        words = json.loads((run / "vocab.json").read_text())
        (run / "vocab.json").write_text(json.dumps(words + ["zebra"]))
    else:
        (run / "vocab.json").write_text(vocab)
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 2  # something left to do
    (run / "config.json").write_text(json.dumps(config))
    assert_one_line(*cli(capfd, "train", "--resume", run, "--quiet"), needle)


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    tensors, meta = load_tensors(src)
    edit(tensors, meta)
    save_tensors(dst, tensors, meta)
    return dst


@pytest.mark.parametrize("case, needle", [
    ("other encoder", "decoder expects 1280-d features but encoder resnet50 gives 2048-d"),
    ("other feature size", "decoder expects 2048-d features but encoder efficientnet_lite0 gives 1280-d"),
    ("unknown encoder", "unknown encoder 'vgg16'"),
    ("vocab larger than weights", "weights do not match the config (size mismatch for word_embed.weight"),
    ("vocab size differs from config", "decoder expects 13 words but the vocabulary has 14"),
    ("no vocabulary", "checkpoint metadata is incomplete or malformed"),
    ("negative regions", "checkpoint metadata is incomplete or malformed (ValueError: bad attention settings"),
    ("regions that do not divide the features", "1280-d features do not split into 7 equal vectors"),
    ("int8 weights without their scales", "int8 weights decoder.out.weight come without their scale"),
    ("int8 scales without their weights", "int8 scale decoder.out.weight.int8_scale has no matching int8 matrix"),
])
def test_inconsistent_checkpoint_metadata(capfd, tiny, tiny_run, tmp_path, monkeypatch, case, needle):
    def edit(t, m):
        if case == "other encoder":
            m["encoder"].update(name="resnet50", dim=1280)
        elif case == "other feature size":
            m["encoder"]["dim"] = m["decoder"]["feature_dim"] = 2048
        elif case == "unknown encoder":
            m["encoder"]["name"] = "vgg16"
        elif case == "vocab larger than weights":
            m["vocab"].append("zebra")
            m["decoder"]["vocab_size"] += 1
        elif case == "negative regions":
            m["decoder"]["regions"] = -1
        elif case == "regions that do not divide the features":
            m["decoder"]["regions"] = 6
        elif case == "vocab size differs from config":
            m["vocab"].append("zebra")
        elif case == "int8 weights without their scales":
            t["decoder.out.weight"] = t["decoder.out.weight"].to(torch.int8)
        elif case == "int8 scales without their weights":
            t["decoder.out.weight.int8_scale"] = torch.ones(t["decoder.out.weight"].shape[0], 1)
        else:
            del m["vocab"]
    ckpt = _edit_checkpoint(tiny_run / "best.safetensors", tmp_path / "edited.safetensors", edit)
    import captioner.encoders as enc  # none of these may get as far as building (or downloading) an encoder
    monkeypatch.setattr(enc, "create_encoder", lambda *a, **k: pytest.fail("built an encoder"))
    monkeypatch.setattr("captioner.inference.create_encoder", enc.create_encoder)
    assert_one_line(*cli(capfd, "caption", tiny / "img0.jpg", "--model", ckpt), needle)


def test_truncated_safetensors_everywhere(capfd, tiny, tiny_run, tmp_path):
    from safetensors.torch import save_file
    best = (tiny_run / "best.safetensors").read_bytes()
    for cut in (0, 3, 8, 9, 200, len(best) // 2, len(best) - 1):
        (tmp_path / "cut.safetensors").write_bytes(best[:cut])
        assert_one_line(*cli(capfd, "caption", tiny / "img0.jpg", "--model", tmp_path / "cut.safetensors"),
                        "not a readable safetensors checkpoint (truncated or corrupt?)")
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "enc.safetensors"))
    data = (tmp_path / "enc.safetensors").read_bytes()
    (tmp_path / "enc.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line(*cli(capfd, "train", "--data", tiny / "caps.csv", "--out", tmp_path / "r", "--encoder-weights",
                         tmp_path / "enc.safetensors", "--cache-dir", tiny / "cache", "--quiet"),
                    "cannot read encoder weights")
    import shutil
    shutil.copytree(tiny_run, tmp_path / "run")
    state = (tmp_path / "run" / "state.safetensors")
    state.write_bytes(state.read_bytes()[:5000])
    assert_one_line(*cli(capfd, "train", "--resume", tmp_path / "run", "--quiet"), "truncated or corrupt")


# --- 3. bad data does not stop training ---------------------------------------------------------------

def test_bad_images_and_odd_captions_do_not_stop_training(capfd, tmp_path):
    root = tmp_path / "data"
    good = [p.name for p in make_images(root, 8)]
    rng = np.random.default_rng(0)
    noise = lambda mode: Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).convert(mode)  # noqa
    noise("CMYK").save(root / "cmyk.jpg", quality=90)
    noise("L").save(root / "gray.png")
    Image.fromarray(np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)).save(root / "deep16.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    (root / "truncated.jpg").write_bytes((root / "img0.jpg").read_bytes()[:400])
    (root / "zero.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not a picture\n")
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 MP in a few KB
    assert (root / "bomb.png").stat().st_size < 100_000
    odd = ["cmyk.jpg", "gray.png", "deep16.png"]
    unreadable = ["corrupt.jpg", "truncated.jpg", "zero.png", "notes.jpg", "bomb.png"]
    rows = ["image,caption,split"]
    for i, name in enumerate(good[:6] + odd + unreadable):
        rows += [f"{name},a red photo of thing {i},train", f"{name},a blue square,train"]
    rows += ["img0.jpg,,train", "img1.jpg," + " ".join(["word"] * 500) + ",train",
             "img2.jpg,un chien très heureux à côté du café,train", "img3.jpg,🐶🐕 a dog 🎉,train",
             "img4.jpg,🐶🐕🎉,train", "cmyk.jpg,\u200b \t ,train",
             "img6.jpg,a green photo,dev", "img6.jpg,,dev", "img7.jpg,ein grünes foto 🌲,dev", "img7.jpg,🌲,dev"]
    (root / "caps.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    rc, err = cli(capfd, "train", "--data", root / "caps.csv", "--out", out, "--cache-dir", tmp_path / "cache",
                  *TINY, "--epochs", "2", "--quiet")
    assert rc == 0 and "Traceback" not in err, err
    lines = (out / "bad_images.txt").read_text().splitlines()
    assert lines[0] == "5 images could not be read and were skipped:"
    assert sorted(Path(l.split("\t")[0]).name for l in lines[1:]) == sorted(unreadable)
    assert all(l.split("\t")[1] for l in lines[1:])  # each with its reason
    # the odd but readable images were used: real (non-zero) features in the cache, not listed as bad
    (index_file,) = (tmp_path / "cache").glob("*.json")
    index, feats = json.loads(index_file.read_text()), np.load(index_file.with_suffix(".npy"))
    for name in odd:
        row = index["paths"].index(str(root / name))
        assert str(root / name) not in index["bad"] and np.abs(feats[row]).sum() > 0, name
    vocab = json.loads((out / "vocab.json").read_text())
    assert {"très", "café", "word", "dog"} <= set(vocab)  # non-ASCII words kept, emoji dropped
    assert not any(ch in w for w in vocab for ch in "🐶🐕🎉🌲")
    assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["dev_example"].split()) <= 20


# --- 4. every user error on the CLI is one clear line ---------------------------------------------------

def _files(tmp: Path, tiny: Path) -> dict:
    (tmp / "file").write_text("x")
    (tmp / "notes.txt").write_text("hello\n")
    (tmp / "nohdr.csv").write_text("path,text\na.jpg,a dog\n")
    (tmp / "bad.jsonl").write_text('{"image": "img0.jpg", "caption": "a"}\n{oops\n')
    (tmp / "bad.json").write_text('{"images": [')
    (tmp / "missing_imgs.csv").write_text("image,caption\nnope.jpg,a dog\n")
    return {"tmp": tmp, "tiny": tiny}


def _train(f, *extra, out=None, cache=None):
    return ["train", "--data", f["tiny"] / "caps.csv", "--out", out or f["tmp"] / "run", "--cache-dir",
            cache or f["tiny"] / "cache", *TINY, "--epochs", "1", "--quiet", *extra]


ONE_LINE_CASES = {
    # missing paths
    "train --data missing": (lambda f: ["train", "--data", f["tmp"] / "nope", "--quiet"], "data path not found"),
    "caption missing image": (lambda f: ["caption", f["tmp"] / "nope.jpg", "--model", f["model"]], "image not found"),
    "caption --model missing": (lambda f: ["caption", f["tiny"] / "img0.jpg", "--model", f["tmp"] / "m.safetensors"],
                                "checkpoint not found"),
    "evaluate --data missing": (lambda f: ["evaluate", "--model", f["model"], "--data", f["tmp"] / "nope", "--quiet"],
                                "data path not found"),
    "train --config missing": (lambda f: _train(f, "--config", f["tmp"] / "nope.json"), "cannot read --config"),
    "train --resume missing": (lambda f: ["train", "--resume", f["tmp"] / "nope", "--quiet"],
                               "is not a resumable run folder"),
    "train --encoder-weights missing": (lambda f: _train(f, "--encoder-weights", f["tmp"] / "nope.pth"),
                                        "encoder weights not found"),
    "train --images missing": (lambda f: _train(f, "--images", f["tmp"] / "nope"), "--images folder not found"),
    "caption a folder": (lambda f: ["caption", f["tmp"], "--model", f["model"]], "expected an image file, got a folder"),
    # wrong data formats
    "train --data not a dataset": (lambda f: ["train", "--data", f["tmp"] / "notes.txt", "--quiet"], "cannot tell"),
    "train --data csv without header": (lambda f: ["train", "--data", f["tmp"] / "nohdr.csv", "--quiet"],
                                        "CSV header must name 'image' and 'caption'"),
    "train --data broken jsonl": (lambda f: ["train", "--data", f["tmp"] / "bad.jsonl", "--quiet"], "invalid JSON"),
    "train --data broken json": (lambda f: ["train", "--data", f["tmp"] / "bad.json", "--quiet"], "not valid JSON"),
    "train --data no images on disk": (lambda f: ["train", "--data", f["tmp"] / "missing_imgs.csv", "--quiet"],
                                       "no usable images"),
    "caption a text file": (lambda f: ["caption", f["tmp"] / "notes.txt", "--model", f["model"]], "not an image file"),
    "evaluate --split unknown": (lambda f: ["evaluate", "--model", f["model"], "--data", f["tiny"] / "caps.csv",
                                            "--split", "holdout", "--quiet"], "unknown split 'holdout'"),
    "train --min-count too high": (lambda f: _train(f, "--min-count", "1000"), "no word occurs 1000 times"),
    # bad values that argparse lets through
    "train --lr 0": (lambda f: _train(f, "--lr", "0"), "learning rate must be > 0"),
    "train --dropout 1.5": (lambda f: _train(f, "--dropout", "1.5"), "dropout must be in [0, 1)"),
    "train --weight-decay -1": (lambda f: _train(f, "--weight-decay", "-1"), "weight decay must be >= 0"),
    "train --max-len 1": (lambda f: _train(f, "--max-len", "1"), "max length must be >= 2"),
    "train --fine-tune-blocks 99": (lambda f: _train(f, "--fine-tune-blocks", "99"), "efficientnet_lite0 has 18 stages"),
    "train --device gpu": (lambda f: _train(f, "--device", "gpu"), "unknown device 'gpu'"),
    "train --device cuda (no CUDA)": (lambda f: _train(f, "--device", "cuda"), "no CUDA GPU is available"),
    "train --scst --device cuda (no CUDA)": (lambda f: ["train", "--scst", "--init", f["model"], "--data",
                                                        f["tiny"] / "caps.csv", "--device", "cuda:1", "--quiet"],
                                             "no CUDA GPU is available"),
    "train --scst without --init": (lambda f: ["train", "--scst", "--data", f["tiny"] / "caps.csv", "--quiet"],
                                    "--scst needs --init"),
    "demo --port 70000": (lambda f: ["demo", "--port", "70000"], "--port must be between 1 and 65535"),
    # outputs that cannot be written
    "train --out is a file": (lambda f: _train(f, out=f["tmp"] / "file"), "exists and is not a folder"),
    "train --out under a file": (lambda f: _train(f, out=f["tmp"] / "file" / "run"), "cannot create run folder"),
    "train --cache-dir is a file": (lambda f: _train(f, cache=f["tmp"] / "file"), "cannot create feature cache folder"),
    "evaluate --out is a file": (lambda f: ["evaluate", "--model", f["model"], "--data", f["tiny"] / "caps.csv",
                                            "--split", "dev", "--out", f["tmp"] / "file", "--quiet"],
                                 "exists and is not a folder"),
    "train --scst --out is a file": (lambda f: ["train", "--scst", "--init", f["model"], "--data",
                                                f["tiny"] / "caps.csv", "--out", f["tmp"] / "file", "--quiet"],
                                     "exists and is not a folder"),
    "train into a finished run without --overwrite": (lambda f: ["train", "--data", f["tiny"] / "caps.csv", "--out",
                                                                 f["model"].parent, "--quiet"], "--overwrite"),
}


@pytest.mark.parametrize("case", list(ONE_LINE_CASES))
def test_user_error_is_one_line(capfd, tiny, tiny_run, tmp_path, case):
    f = {**_files(tmp_path, tiny), "model": tiny_run / "best.safetensors"}
    args, needle = ONE_LINE_CASES[case]
    assert_one_line(*cli(capfd, *args(f)), needle)


USAGE_CASES = {
    "train --batch-size 0": (["train", "--batch-size", "0"], "argument --batch-size: expected a number >= 1, got 0"),
    "train --lr abc": (["train", "--lr", "abc"], "argument --lr: expected a number, got 'abc'"),
    "train --lr nan": (["train", "--lr", "nan"], "argument --lr: expected a finite number, got nan"),
    "train --lr inf": (["train", "--lr", "inf"], "argument --lr: expected a finite number, got inf"),
    "train --encoder unknown": (["train", "--encoder", "vgg"], "argument --encoder: invalid choice: 'vgg'"),
    "train --workers -1": (["train", "--workers", "-1"], "argument --workers: expected a number >= 0, got -1"),
    "train --save-every -2": (["train", "--save-every", "-2"], "expected a number >= 0"),
    "train --dev-images -1": (["train", "--dev-images", "-1"], "expected a number >= 0"),
    "caption --beam-size 0": (["caption", "x.jpg", "--beam-size", "0"], "argument --beam-size"),
    # beyond the limits (config.MAX_BEAM, MAX_LEN): --n-best 1000000 once asked the OOM killer for 24 GB
    "caption --n-best 1000000": (["caption", "x.jpg", "--n-best", "1000000"],
                                 "argument --n-best: expected a number >= 1 and <= 100, got 1000000"),
    "caption --beam-size 101": (["caption", "x.jpg", "--beam-size", "101"], "argument --beam-size: expected a number >= 1 and <= 100"),
    "caption --rerank 101": (["caption", "x.jpg", "--rerank", "101"], "argument --rerank: expected a number >= 0 and <= 100"),
    "caption --rerank-fmean 2": (["caption", "x.jpg", "--rerank-fmean", "2"],
                                 "argument --rerank-fmean: expected a number from 0 to 1, got 2"),
    "evaluate --rerank-fmean -1": (["evaluate", "--data", "x", "--rerank-fmean", "-1"], "argument --rerank-fmean: expected a number from 0 to 1, got -1"),
    "caption --max-len 101": (["caption", "x.jpg", "--max-len", "101"], "argument --max-len: expected a number >= 1 and <= 100"),
    "caption --length-penalty nan": (["caption", "x.jpg", "--length-penalty", "nan"],
                                     "argument --length-penalty: expected a finite number, got nan"),
    "evaluate --beam-size 1000": (["evaluate", "--data", "x", "--beam-size", "1000"], "argument --beam-size"),
    "evaluate --length-penalty inf": (["evaluate", "--data", "x", "--length-penalty", "inf"], "expected a finite number"),
    "train --eval-beam 500": (["train", "--eval-beam", "500"], "argument --eval-beam: expected a number >= 1 and <= 100"),
    "train --samples 10000": (["train", "--scst", "--samples", "10000"], "argument --samples"),
    "evaluate --limit -1": (["evaluate", "--data", "x", "--limit", "-1"], "argument --limit: expected a number >= 0"),
    "evaluate --workers -1": (["evaluate", "--data", "x", "--workers", "-1"], "argument --workers"),
    "evaluate without --data": (["evaluate"], "the following arguments are required: --data"),
    "unknown command": (["paint"], "invalid choice: 'paint'"),
    "unknown flag": (["caption", "x.jpg", "--frobnicate", "3"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_flag_errors_are_usage_plus_one_line(capfd, case):
    args, needle = USAGE_CASES[case]
    assert_usage_error(*cli(capfd, *args), needle)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real tiny filesystem (tmpfs) when we may mount one; else None (the caller simulates ENOSPC)."""
    path.mkdir(parents=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_in_the_run_folder(capfd, tiny, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", "64k") as real:
        if not real:  # state.safetensors (~290 KB) does not fit 64 KB; simulate that
            monkeypatch.setattr("captioner.checkpoint.os.fsync", _no_space)
        rc, err = cli(capfd, *_train({"tiny": tiny, "tmp": tmp_path / "disk"}, "--save-every", "1"))
        assert_one_line(rc, err, "No space left on device", str(tmp_path / "disk" / "run"))


def test_full_disk_in_the_feature_cache(capfd, tiny, tmp_path, monkeypatch):
    """A 20 KB disk holds the cache's index but not its 25 KB feature file: before the space was
    reserved up front, writing through the memory map killed the process with SIGBUS, no message."""
    with small_disk(tmp_path / "disk", "20k") as real:
        if not real:
            monkeypatch.setattr(os, "posix_fallocate", _no_space, raising=False)
        rc, err = cli(capfd, *_train({"tiny": tiny, "tmp": tmp_path}, cache=tmp_path / "disk"))
        assert_one_line(rc, err, "no space left for the feature cache", "--cache-dir")


def test_full_disk_when_writing_evaluation_reports(capfd, tiny, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("captioner.evaluate.all_metrics",  # scores are not the point here, and METEOR is slow
                        lambda hyps, refs, per_image: ({"BLEU-4": 0.0}, {"BLEU-4": [0.0] * len(hyps)}, []))
    with small_disk(tmp_path / "disk", "4k") as real:  # metrics.json fits, the rest does not
        if not real:
            monkeypatch.setattr("captioner.checkpoint.os.fsync", _no_space)
        rc, err = cli(capfd, "evaluate", "--model", tiny_run / "best.safetensors", "--data", tiny / "caps.csv",
                      "--split", "dev", "--out", tmp_path / "disk" / "eval", "--cache-dir", tiny / "cache",
                      "--workers", "0", "--quiet")
        assert_one_line(rc, err, "No space left on device", str(tmp_path / "disk" / "eval"))


def test_cli_errors_in_a_real_process(tiny):
    """The same one-line errors from a real `python -m captioner` process (warnings, import noise included)."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    r = run("train", "--data", tiny / "caps.csv", "--lr", "abc")
    assert_usage_error(r.returncode, r.stderr, "expected a number, got 'abc'")
    r = run("train", "--data", tiny / "caps.csv", "--out", tiny / "never", "--device", "cuda:0", "--quiet")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line(r.returncode, r.stderr, "no CUDA GPU is available")


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_checkpoint_whose_header_length_looks_like_a_pickle_still_loads(tiny_run, tmp_path, first_bytes):
    """The first 8 bytes of a safetensors file are its header length: once in 256 files the low byte is
    0x80 (a pickle's first byte), and 'PK' once in 65536. Such a checkpoint is not a pickle."""
    from captioner.inference import load_model
    tensors, meta = load_tensors(tiny_run / "best.safetensors")
    path = tmp_path / "model.safetensors"
    meta["pad"] = ""
    save_tensors(path, tensors, meta)
    data = path.read_bytes()
    raw = len(data[8:8 + int.from_bytes(data[:8], "little")].rstrip(b" "))  # header JSON before 8-byte padding
    want = int.from_bytes(first_bytes.ljust(2, b"\x00")[:len(first_bytes)], "little")
    modulus = 256 ** len(first_bytes)
    target = raw + (want - raw) % modulus  # a multiple of 8 at least `raw` long, with the wanted low bytes
    meta["pad"] = "x" * (target - raw)
    save_tensors(path, tensors, meta)
    assert path.read_bytes().startswith(first_bytes)
    _, loaded = load_tensors(path)
    assert loaded["vocab"] == meta["vocab"]
    load_model(path)


def test_written_files_get_the_mode_the_umask_gives(tmp_path):
    """Atomic writes go through a private temporary file; the result must still be readable as the user's
    umask says (a report served by a web server, a checkpoint shared with a colleague)."""
    import os
    import stat
    from captioner.checkpoint import atomic_write_text, save_tensors
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
        save_tensors(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {})
        assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_cli_parses_without_torch_and_every_option_has_one_help_line():
    """`captioner --help` must not pay for importing torch, and each option explains itself with its default
    said once."""
    import subprocess
    import sys
    code = "import sys; from captioner.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
    import argparse
    from captioner.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert action.help.count("(default:") <= 1 and "(default: None)" not in action.help, (name, action.help)
        assert "default: None" not in parser.format_help()
