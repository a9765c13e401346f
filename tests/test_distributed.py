"""DistributedDataParallel (2 CPU processes, gloo, through torchrun) and mixed precision (bf16 autocast on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_tensors
from captioner.distributed import DistContext, autocast, bfloat16_is_native, ddp_loss, setup
from captioner.inference import Captioner
from captioner.train import TrainConfig, train
from conftest import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# 8 training images x 3 captions + 1 = 25 captions: with batch 8 the last global batch holds one caption,
# so with 2 processes rank 1 gets none of it (the zero-weight placeholder path) and the shards differ in size.
TINY = dict(embed_dim=16, hidden_dim=16, min_count=1, batch_size=8, epochs=3, workers=0, warmup_steps=2,
            patience=10, dropout=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ddp")
    return make_tiny_dataset(root, ("img0.jpg,a very red square photo,train",))


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli_args(tiny: Path, out: Path, **kw) -> list[str]:
    opts = {**TINY, **kw}
    args = ["train", "--data", str(tiny / "caps.csv"), "--out", str(out), "--cache-dir", str(tiny / "cache"), "--quiet"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_one_process_context_is_a_pass_through(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.shard([3, 1, 2]) == [3, 1, 2]
    m = torch.nn.Linear(2, 2)
    assert ctx.wrap(m, "cpu") is m and ctx.broadcast({"a": 1}) == {"a": 1} and ctx.sum([1.0, 2.0]) == [1.0, 2.0]
    with ctx.local_main_first():
        pass
    assert autocast("cpu", False)[1] is None


def test_sharded_loss_sums_to_the_one_process_loss_and_gradient():
    """The per-rank losses DDP averages give exactly the one-process mean loss and gradient, even with
    uneven shards and an empty one (a zero-weight placeholder)."""
    from captioner.model import DecoderConfig, ShowAndTell
    torch.manual_seed(0)
    m = ShowAndTell(DecoderConfig(30, 12, 8, 8, dropout=0.0))
    lens = torch.tensor([7, 3, 5, 4, 6])
    caps = torch.randint(4, 30, (5, 7)) * (torch.arange(7) < lens[:, None])
    feats = torch.randn(5, 12)

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    ref = m.loss(feats, caps, lens)
    g_ref = grads(ref)
    for world in (2, 3, 6):  # world 6 > 5 captions: rank 5 gets none
        total, g_sum, n_tok = 0.0, None, int((lens - 1).sum())
        for rank in range(world):
            ctx = DistContext(rank, world)
            mine = ctx.shard(list(range(5)))
            use = mine or [0]
            loss = ddp_loss(m, feats[use], caps[use], lens[use], n_tok, world, weight=float(bool(mine)))
            total += loss.item()
            g = grads(loss)
            g_sum = g if g_sum is None else [a + b for a, b in zip(g_sum, g)]
        assert abs(total / world - ref.item()) < 1e-6
        for a, b in zip(g_sum, g_ref):
            torch.testing.assert_close(a / world, b, rtol=1e-5, atol=1e-7)


def test_two_processes_give_the_one_process_loss_curve(tiny, tmp_path):
    """torchrun with 2 gloo processes, global batch 8 (4 + 4, the last batch 1 + 0): the same training as 1 process."""
    train(TrainConfig(data=str(tiny / "caps.csv"), out=str(tmp_path / "one"), cache_dir=str(tiny / "cache"), **TINY),
          progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "captioner.cli", *_cli_args(tiny, tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("best dev BLEU-4") == 2  # each rank returns; only rank 0 logs epochs
    assert r.stdout.count("epoch 1: train loss") + r.stderr.count("epoch 1: train loss") == 1
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(one) == len(two) == 3 and [h["step"] for h in two] == [4, 8, 12]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-4)
    assert one[0]["train_loss"] > one[-1]["train_loss"]  # it really trained
    sa, _ = load_tensors(tmp_path / "one" / "state.safetensors")
    sb, _ = load_tensors(tmp_path / "two" / "state.safetensors")
    for k in sa:
        if k.startswith("model."):
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "two").glob(".*.tmp"))


def test_two_processes_interrupted_save_state_and_resume_to_the_one_process_curve(tiny, tmp_path):
    """An interrupted torchrun run (the close path without the final barrier): both ranks stop at the same step
    with the one-line message, nothing hangs, and --resume under torchrun finishes the one-process training."""
    train(TrainConfig(data=str(tiny / "caps.csv"), out=str(tmp_path / "one"), cache_dir=str(tiny / "cache"), **TINY),
          progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "captioner.cli"]
    cut = subprocess.run(run + _cli_args(tiny, tmp_path / "two") + ["--stop-after-steps", "6"], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)  # mid-epoch 2 of 3
    assert cut.returncode != 0
    msg = f"interrupted at epoch 2, batch 2; state saved, continue with: captioner train --resume {tmp_path / 'two'}"
    assert cut.stderr.count(msg) == 2, cut.stderr[-3000:]  # each rank, one line
    assert "captioner/" not in cut.stderr  # no traceback from our code (torchrun reports the exit codes itself)
    assert len(_history(tmp_path / "two")) == 1 and not list((tmp_path / "two").glob(".*.tmp"))
    again = subprocess.run(run + ["train", "--resume", str(tmp_path / "two"), "--quiet"], capture_output=True,
                           text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [h["step"] for h in two] == [4, 8, 12]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-4)


@pytest.mark.skipif(not bfloat16_is_native(), reason="this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX): "
                    "oneDNN refuses a bfloat16 LSTM here, and --amp trains in float32 (the test below)")
def test_amp_bf16_autocast_trains_on_cpu(tiny, tmp_path):
    ctx, scaler = autocast("cpu", True)
    assert scaler is None and ctx.fast_dtype == torch.bfloat16
    base = dict(data=str(tiny / "caps.csv"), cache_dir=str(tiny / "cache"), **{**TINY, "epochs": 2})
    train(TrainConfig(out=str(tmp_path / "fp32"), **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "bf16"), amp=True, **base), progress=False)
    fp32, bf16 = _history(tmp_path / "fp32"), _history(tmp_path / "bf16")
    for a, b in zip(fp32, bf16):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.03)  # bf16 rounding, same training
        assert b["train_loss"] != a["train_loss"]  # autocast really ran in lower precision
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["amp"] is True
    cap = Captioner.load(tmp_path / "bf16")
    assert cap.decoder.out.weight.dtype == torch.float32 and all(cap.caption(sorted(tiny.glob("img*.jpg"))[:2]))


def test_amp_trains_in_float32_where_the_cpu_only_emulates_bfloat16(tiny, tmp_path, monkeypatch, capsys):
    """Emulated bfloat16 made the recipe's training step 21-24x slower than float32 on an AVX2-only CPU."""
    monkeypatch.setattr("captioner.distributed.bfloat16_is_native", lambda device="cpu": False)
    ctx, scaler = autocast("cpu", True)
    assert scaler is None and not isinstance(ctx, torch.autocast)
    base = dict(data=str(tiny / "caps.csv"), cache_dir=str(tiny / "cache"), **{**TINY, "epochs": 1})
    train(TrainConfig(out=str(tmp_path / "fp32"), **base), progress=False)
    assert "bfloat16" not in capsys.readouterr().out
    train(TrainConfig(out=str(tmp_path / "amp"), amp=True, **base), progress=False)
    assert "--amp: this CPU has no bfloat16 arithmetic" in capsys.readouterr().out
    assert _history(tmp_path / "amp")[0]["train_loss"] == _history(tmp_path / "fp32")[0]["train_loss"]


def test_feature_extraction_saves_progress_when_interrupted_and_resumes(tiny, tmp_path, monkeypatch):
    """Progress is written every few seconds (not after every batch, which cost more than the encoder), and on
    an interruption: resuming then computes only the rest, and the features equal an uninterrupted run's."""
    import numpy as np

    from captioner import features
    from captioner.encoders import create_encoder
    enc = create_encoder()
    paths = sorted(tiny.glob("img*.jpg"))
    whole = features.extract_features(enc, paths, tmp_path / "whole", batch_size=2, workers=0, progress=False)
    calls = {"n": 0}
    real_forward = type(enc).forward

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_forward(self, x)
    monkeypatch.setattr(type(enc), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        features.extract_features(enc, paths, tmp_path / "cut", batch_size=2, workers=0, progress=False)
    (index,) = (tmp_path / "cut").glob("*.json")
    state = json.loads(index.read_text())
    assert state["done"] == 4 and not state["complete"]  # two batches of 2 kept although no timed save came
    calls["n"] = 100
    again = features.extract_features(enc, paths, tmp_path / "cut", batch_size=2, workers=0, progress=False)
    assert calls["n"] == 100 + (len(paths) - 4) // 2  # only the rest was computed
    assert np.array_equal(np.asarray(again.features), np.asarray(whole.features))


