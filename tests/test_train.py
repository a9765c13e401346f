import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioner.checkpoint import load_tensors
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from captioner.train import Interrupted, TrainConfig, resume_config, train
from conftest import make_tiny_dataset



@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_dataset(root)


def _cfg(tiny_data, out, **kw):
    base = dict(data=str(tiny_data / "caps.csv"), out=str(out), cache_dir=str(tiny_data / "cache"), embed_dim=16,
                hidden_dim=16, min_count=1, batch_size=4, epochs=3, workers=0, warmup_steps=2, patience=10)
    return TrainConfig(**{**base, **kw})


def test_resume_equals_uninterrupted_run(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "full"), progress=False)
    with pytest.raises(Interrupted, match="--resume"):
        train(_cfg(tiny_data, tmp_path / "cut", stop_after_steps=8), progress=False)  # mid-epoch 2 of 3
    state, meta = load_tensors(tmp_path / "cut" / "state.safetensors")
    assert meta["progress"]["step"] == 8 and meta["progress"]["batch"] > 0
    cfg = resume_config(tmp_path / "cut")
    cfg.stop_after_steps = 0
    train(cfg, resume=True, progress=False)
    a, _ = load_tensors(tmp_path / "full" / "state.safetensors")
    b, _ = load_tensors(tmp_path / "cut" / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist_a = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    hist_b = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [h["dev_loss"] for h in hist_a] == [h["dev_loss"] for h in hist_b]
    for name in ("best.safetensors", "config.json", "vocab.json", "curves.png", "summary.json"):
        assert (tmp_path / "full" / name).is_file(), name


def test_select_keeps_the_epoch_it_names(tiny_data, tmp_path):
    """best.safetensors holds the epoch with the best greedy BLEU-4, the lowest dev loss, or the last one."""
    from captioner.inference import load_model
    for select in ("bleu", "loss", "last"):
        summary = train(_cfg(tiny_data, tmp_path / select, epochs=4, select=select), progress=False)
        hist = [json.loads(l) for l in (tmp_path / select / "metrics.jsonl").read_text().splitlines()]
        want = {"bleu": max(range(4), key=lambda i: (hist[i]["dev_BLEU-4"], -i)),
                "loss": min(range(4), key=lambda i: (hist[i]["dev_loss"], i)), "last": 3}[select] + 1
        assert summary["best_epoch"] == want and summary["select"] == select
        assert summary["best_dev_BLEU-4"] == hist[want - 1]["dev_BLEU-4"]
        _, _, _, meta = load_model(tmp_path / select / "best.safetensors")
        assert meta["train"]["epoch"] == want
        if select == "last":  # the kept weights are the final state's
            best, _ = load_tensors(tmp_path / select / "best.safetensors")
            state, _ = load_tensors(tmp_path / select / "state.safetensors")
            assert torch.equal(best["decoder.out.weight"].float(), state["model.out.weight"].float())
    with pytest.raises(CaptionerError, match="select must be one of bleu, loss, last"):
        _cfg(tiny_data, tmp_path / "x", select="cider").validate()


def test_checkpoint_round_trip_gives_identical_outputs(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "run", epochs=1), progress=False)
    a = Captioner.load(tmp_path / "run" / "best.safetensors")
    b = Captioner.load(tmp_path / "run")  # a run folder works too
    imgs = sorted(tiny_data.glob("img*.jpg"))[:4]
    fa, fb = a.encode(imgs), b.encode(imgs)
    assert torch.equal(fa, fb)
    assert torch.equal(a.decoder.out.weight, b.decoder.out.weight)
    assert [c.text for c in a.caption_full(imgs, beam_size=2, n_best=2)] == \
           [c.text for c in b.caption_full(imgs, beam_size=2, n_best=2)]
    assert all(a.caption(imgs))


def test_bad_checkpoints_are_refused(tmp_path):
    import pickle
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CaptionerError, match="pickle"):
        Captioner.load(evil)
    with pytest.raises(CaptionerError, match="not found"):
        Captioner.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CaptionerError, match="not a captioner checkpoint"):
        Captioner.load(tmp_path / "other.safetensors")


def test_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "run", epochs=1), progress=False)
    data = (tmp_path / "run" / "best.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptionerError, match="truncated or corrupt"):
        Captioner.load(tmp_path / "cut.safetensors")


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True, timeout=300)
    (tmp_path / "file").write_text("x")
    for args, msg in [(["train", "--data", str(tmp_path / "nope")], "data path not found"),
                      (["train", "--data", str(tmp_path / "file"), "--out", str(tmp_path / "o")], "cannot tell"),
                      (["caption", str(tmp_path / "nope.jpg"), "--model", str(tmp_path / "m.safetensors")], "not found"),
                      (["caption", str(tmp_path / "file"), "--model", str(tmp_path / "file")], "not a readable"),
                      (["caption", str(tmp_path / "file"), "--device", "tpu"], "unknown device"),
                      (["evaluate", "--data", str(tmp_path / "file"), "--device", "cuda:7"],
                       "CUDA" if not torch.cuda.is_available() else "CUDA device(s)")]:
        r = run(*args)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_fine_tuning_last_blocks_trains_and_ships_the_encoder(tiny_data, tmp_path):
    from captioner.encoders import create_encoder
    from captioner.evaluate import evaluate
    train(_cfg(tiny_data, tmp_path / "ft", epochs=1, fine_tune_blocks=1, flip_augment=True), progress=False)
    tensors, meta = load_tensors(tmp_path / "ft" / "best.safetensors")
    assert meta["encoder"]["weights_included"] and meta["encoder"]["tuned_stages"] == 1
    pre = create_encoder().state_dict()
    shipped = {k[len("encoder."):] for k in tensors if k.startswith("encoder.")}
    assert shipped == {k for k in pre if k.startswith(("features.net._conv_head", "features.net._bn1"))}
    head = "features.net._conv_head.weight"
    assert not torch.equal(tensors[f"encoder.{head}"], pre[head])  # the last stage learned; the rest is pretrained
    cap = Captioner.load(tmp_path / "ft")
    assert torch.equal(cap.encoder.state_dict()[head], tensors[f"encoder.{head}"])
    stem = "features.net._conv_stem.weight"
    assert torch.equal(cap.encoder.state_dict()[stem], pre[stem])
    # The features scored come from the tuned head, cached under its own key, not the pretrained encoder's.
    assert cap.encoder.weights_tag().startswith("tuned1-")
    imgs = [str(tiny_data / f"img{i}.jpg") for i in range(3)]
    direct = cap.encode(imgs)
    from captioner.features import model_features
    cached = model_features(cap.encoder, imgs, tiny_data / "cache", workers=0, progress=False).features
    assert torch.allclose(direct, torch.tensor(np.asarray(cached), dtype=torch.float32), atol=2e-2)
    assert evaluate(tmp_path / "ft", tiny_data / "caps.csv", split="dev", cache_dir=str(tiny_data / "cache"),
                    workers=0, progress=False)["metrics"]
    # SCST keeps the tuned stages it started from (its checkpoints dropped them before).
    from captioner.cli import main
    assert main(["train", "--scst", "--init", str(tmp_path / "ft"), "--data", str(tiny_data / "caps.csv"), "--out",
                 str(tmp_path / "ft-scst"), "--epochs", "1", "--batch-size", "4", "--cache-dir", str(tiny_data / "cache"),
                 "--workers", "0", "--quiet"]) == 0
    after, _ = load_tensors(tmp_path / "ft-scst" / "best.safetensors")
    assert torch.equal(after[f"encoder.{head}"], tensors[f"encoder.{head}"])
    # `captioner last-epoch` writes the last epoch's tuned stage from the resumable state. A one-epoch run's
    # best epoch is its last, so best.safetensors is moved off first: the verb must not copy it.
    from captioner.checkpoint import save_tensors
    save_tensors(tmp_path / "ft" / "best.safetensors", {k: v + 0.5 if v.is_floating_point() else v for k, v in tensors.items()}, meta)
    r = subprocess.run([sys.executable, "-m", "captioner", "last-epoch", str(tmp_path / "ft")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    last, last_meta = load_tensors(tmp_path / "ft" / "last.safetensors")
    state, _ = load_tensors(tmp_path / "ft" / "state.safetensors")
    assert last_meta["encoder"]["tuned_stages"] == 1
    assert torch.equal(last[f"encoder.{head}"], state[f"encoder.{head}"].to(last[f"encoder.{head}"].dtype))
    weight = next(k for k in last if k.startswith("decoder.") and k.endswith("weight"))
    assert torch.equal(last[weight], state["model." + weight[len("decoder."):]].to(last[weight].dtype))
    assert not torch.equal(last[weight], tensors[weight] + 0.5)
    for stages, msg in ((2, "Missing key"), (99, "not 99 to fine-tune")):  # the stages said do not match the weights
        save_tensors(tmp_path / "odd.safetensors", tensors,
                     {**meta, "encoder": {**meta["encoder"], "tuned_stages": stages}})
        with pytest.raises(CaptionerError, match=msg):
            Captioner.load(tmp_path / "odd.safetensors")


def test_fine_tuning_from_a_weights_file_ships_the_whole_encoder(tiny_data, tmp_path):
    """The package cannot rebuild stages that came from the user's file, so the checkpoint must carry them all."""
    from safetensors.torch import save_file
    from captioner.encoders import create_encoder
    net = create_encoder().features.net
    sd = {k: v.contiguous().clone() for k, v in net.state_dict().items()}  # channels_last in memory
    stem = "_conv_stem.weight"
    sd[stem] = sd[stem] * 1.01  # a frozen stage that differs from the package's weights
    save_file(sd, str(tmp_path / "mine.safetensors"))
    train(_cfg(tiny_data, tmp_path / "ftw", epochs=1, fine_tune_blocks=1,
               encoder_weights=str(tmp_path / "mine.safetensors")), progress=False)
    tensors, meta = load_tensors(tmp_path / "ftw" / "best.safetensors")
    assert meta["encoder"]["weights_included"] and not meta["encoder"].get("tuned_stages")
    shipped = {k[len("encoder."):] for k in tensors if k.startswith("encoder.")}
    assert shipped == set(create_encoder().state_dict())
    assert torch.equal(tensors[f"encoder.features.net.{stem}"], sd[stem].to(tensors[f"encoder.features.net.{stem}"].dtype))
    head = "_conv_head.weight"
    assert not torch.equal(tensors[f"encoder.features.net.{head}"], sd[head])  # the tuned stage learned
    cap = Captioner.load(tmp_path / "ftw")  # loads without the file: everything it needs is inside
    assert torch.equal(cap.encoder.state_dict()[f"features.net.{stem}"], tensors[f"encoder.features.net.{stem}"])


def test_scst_stage_runs_from_a_cross_entropy_model(tiny_data, tmp_path):
    from captioner.cli import main
    train(_cfg(tiny_data, tmp_path / "xe", epochs=2), progress=False)
    assert main(["train", "--scst", "--init", str(tmp_path / "xe" / "best.safetensors"), "--data",
                 str(tiny_data / "caps.csv"), "--out", str(tmp_path / "scst"), "--epochs", "2", "--batch-size", "4",
                 "--cache-dir", str(tiny_data / "cache"), "--workers", "0", "--quiet"]) == 0
    hist = [json.loads(l) for l in (tmp_path / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and all(0 <= h["train_cider"] for h in hist[1:])
    assert Captioner.load(tmp_path / "scst").caption(sorted(tiny_data.glob("img*.jpg"))[:2])


def test_scst_sampling_and_cider_d():
    from captioner.model import DecoderConfig, ShowAndTell
    from captioner.scst import CiderD, sample
    from captioner.vocab import Vocabulary
    v = Vocabulary.build(["a dog runs", "a cat sits"], min_count=1)
    m = ShowAndTell(DecoderConfig(len(v), 8, 8, 8)).eval()
    caps, lens = sample(m, torch.randn(3, 8), v, 4, 6, torch.Generator().manual_seed(0))
    assert caps.shape[0] == 12 and (caps[:, 0] == v.start_id).all()
    for row, n in zip(caps.tolist(), lens.tolist()):
        assert row[n - 1] == v.end_id and all(t == v.pad_id for t in row[n:]) and 3 <= n <= 8
    refs = [["a dog runs on grass", "a brown dog runs"], ["a cat sits on a mat", "a cat is sitting"]] * 3
    c = CiderD(refs)
    s = c(["a dog runs on grass", "a banana phone"], refs[:2])
    assert s[0] > 1.0 and s[1] == 0.0


def test_scst_loss_scores_the_policy_it_samples_from():
    """The policy gradient's log-probabilities are those of the masked distribution `sample` draws from,
    so <unk> (never sampled) gets no gradient and cannot creep up until beam search writes it."""
    from torch.nn.utils.rnn import pack_padded_sequence
    from captioner.decoding import _mask
    from captioner.model import DecoderConfig, ShowAndTell
    from captioner.scst import _policy_mask, sample
    from captioner.vocab import Vocabulary
    torch.manual_seed(0)
    v = Vocabulary.build(["a dog runs", "a cat sits"], min_count=1)
    m = ShowAndTell(DecoderConfig(len(v), 8, 8, 8)).eval()
    feats = torch.randn(2, 8)
    caps, lens = sample(m, feats, v, 3, 6, torch.Generator().manual_seed(1))
    f = feats.repeat_interleave(3, 0)
    logits, targets = m(f, caps, lens)
    logits.retain_grad()
    lp = -torch.nn.functional.cross_entropy(_policy_mask(logits, len(lens), v), targets, reduction="none")
    lp.sum().backward()
    assert torch.all(logits.grad[:, v.unk_id] == 0) and torch.isfinite(lp).all()
    # the same numbers, step by step, with decoding's mask (as `sample` applies it)
    want = []
    with torch.no_grad():
        state = m.init_state(f)
        for t in range(caps.shape[1] - 1):
            logp, state = m.step(caps[:, t], state)
            want.append(_mask(logp.clone(), t, v, suppress_unk=True).log_softmax(-1).gather(1, caps[:, t + 1:t + 2]))
    want = pack_padded_sequence(torch.cat(want, 1), lens - 1, batch_first=True, enforce_sorted=False).data
    assert torch.allclose(lp.detach(), want, atol=1e-5)


def test_config_file_alone_names_data_and_out(tiny_data, tmp_path, monkeypatch):
    """`captioner train --config recipe.json` repeats a recipe; typed flags still win over the file."""
    from captioner.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps({
        "data": str(tiny_data / "caps.csv"), "out": "from-config", "epochs": 1, "batch_size": 4,
        "embed_dim": 8, "hidden_dim": 8, "min_count": 1, "seed": 3}))
    common = ["--cache-dir", str(tiny_data / "cache"), "--workers", "0", "--quiet"]
    assert main(["train", "--config", "recipe.json", *common]) == 0
    cfg = json.loads((tmp_path / "from-config" / "config.json").read_text())
    assert (cfg["hidden_dim"], cfg["seed"], cfg["epochs"]) == (8, 3, 1)
    assert main(["train", "--config", "recipe.json", "--out", "typed", "--seed", "5", *common]) == 0
    cfg = json.loads((tmp_path / "typed" / "config.json").read_text())
    assert (cfg["seed"], cfg["hidden_dim"]) == (5, 8)


def test_image_size_and_augmented_views_reach_the_checkpoint_and_the_features(tiny_data, tmp_path):
    from dataclasses import replace

    from PIL import Image

    from captioner.features import extract_features
    cache = tmp_path / "cache"
    train(_cfg(tiny_data, tmp_path / "run", epochs=2, image_size=96, flip_augment=True, crop_augment=True,
               cache_dir=str(cache)), progress=False)
    cap = Captioner.load(tmp_path / "run")
    pre = cap.encoder.preprocess
    assert pre.size == 96 and not pre.hflip and not pre.crop  # shipped plain
    # Every view went through the cache as its own entry: plain, mirrored and four corners.
    assert len(list(cache.glob("*.npy"))) == 6
    # A corner crop's features are those of that corner cut out by hand.
    img = Image.open(sorted(tiny_data.glob("img*.jpg"))[1]).convert("RGB")
    corner = tmp_path / "corner.png"
    img.crop((img.width - 56, img.height - 56, img.width, img.height)).save(corner)
    cap.encoder.preprocess = replace(pre, crop="br")
    by_view = cap.encode([sorted(tiny_data.glob("img*.jpg"))[1]])
    cap.encoder.preprocess = pre
    assert torch.allclose(by_view, cap.encode([corner]), atol=1e-4)
    # The mirrored view differs from the plain one.
    imgs = sorted(tiny_data.glob("img*.jpg"))[:3]
    cap.encoder.preprocess = pre
    plain = extract_features(cap.encoder, imgs, cache, workers=0, progress=False).features
    cap.encoder.preprocess = replace(cap.encoder.preprocess, hflip=True)
    flipped = extract_features(cap.encoder, imgs, cache, workers=0, progress=False).features
    assert plain.shape == flipped.shape and not (plain == flipped).all()
    # A mirrored image's features equal the flipped view of the original.
    mirror = tmp_path / "mirror.png"
    Image.open(imgs[0]).convert("RGB").resize((96, 96), Image.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
    cap.encoder.preprocess = replace(cap.encoder.preprocess, hflip=False)
    (mirrored,) = cap.encode([mirror])
    assert torch.allclose(mirrored.half().float(), torch.tensor(flipped[0], dtype=torch.float32), atol=2e-2)
    with pytest.raises(CaptionerError, match="image size"):
        _cfg(tiny_data, tmp_path / "bad2", image_size=8).validate()


def test_scst_update_trains_without_dropout_and_restores_the_mode():
    """cuDNN has no LSTM backward in eval mode, so the update runs in training mode with dropout off."""
    from captioner.model import DecoderConfig, ShowAndTell
    from captioner.scst import policy_step, sample, without_dropout
    from captioner.vocab import Vocabulary
    torch.manual_seed(0)
    v = Vocabulary.build(["a dog runs", "a cat sits"], min_count=1)
    m = ShowAndTell(DecoderConfig(len(v), 8, 8, 8, num_layers=2, dropout=0.5)).eval()
    feats = torch.randn(2, 8)
    caps, lens = sample(m, feats, v, 3, 6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(feats.repeat_interleave(3, 0), caps, lens)[0]
    with without_dropout(m):
        assert m.training and m.lstm.dropout == 0.0
        got = m(feats.repeat_interleave(3, 0), caps, lens)[0]
    assert torch.allclose(got, want) and not m.training and m.lstm.dropout == 0.5
    before = [p.clone() for p in m.parameters()]
    policy_step(m, torch.optim.Adam(m.parameters(), lr=1e-2), feats, caps, lens, torch.rand(2, 3), v)
    assert not m.training and any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def _pooled(pool: str, vectors: int):
    """The default encoder with this pooling on two random images: its output starts with the global average."""
    from captioner.encoders import create_encoder
    enc = create_encoder(pool=pool)
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        g, fmap = enc(x), enc.feature_map(x)
    assert enc.dim == vectors * 1280 and g.shape == (2, vectors * 1280)
    assert torch.allclose(g[:, :1280], fmap.mean((2, 3)), atol=1e-5)  # the global average first
    return enc, g, fmap


def test_region_attention_trains_loads_and_averages_views_in_place(tiny_data, tmp_path):
    from dataclasses import replace
    import torch.nn.functional as F
    from captioner.encoders import align_view
    enc, g, fmap = _pooled("regions", 10)
    assert torch.allclose(g[:, 1280:].view(2, 3, 3, 1280), F.adaptive_avg_pool2d(fmap, 3).permute(0, 2, 3, 1), atol=1e-5)
    # A mirrored view's grid comes back in place: cell (row, col) from (row, 2 - col); the global part stays.
    cells = torch.arange(10.0).repeat_interleave(4).view(1, 40)
    back = align_view(cells, "regions", replace(enc.preprocess, hflip=True)).view(10, 4)[:, 0]
    assert back.tolist() == [0, 3, 2, 1, 6, 5, 4, 9, 8, 7]
    assert torch.equal(align_view(cells, "regions", enc.preprocess), cells)
    assert torch.equal(align_view(cells, "grid", replace(enc.preprocess, hflip=True)), cells)

    train(_cfg(tiny_data, tmp_path / "run", epochs=1, pool="regions", flip_augment=True), progress=False)
    cap = Captioner.load(tmp_path / "run")
    assert cap.encoder.pool == "regions" and cap.decoder.cfg.regions == 9 and cap.decoder.cfg.feature_dim == 12800
    imgs = sorted(tiny_data.glob("img*.jpg"))[:3]
    plain, mirror = cap.encode(imgs), cap.encode([ImageOps.mirror(Image.open(p).convert("RGB")) for p in imgs])
    both = cap.encode(imgs, views=2)
    torch.testing.assert_close(both, (plain + align_view(mirror, "regions", replace(enc.preprocess, hflip=True))) / 2,
                               rtol=1e-4, atol=1e-4)
    assert all(cap.caption(imgs)) and all(c.text for c in cap.caption_full(imgs, views=2))


def test_scheduled_sampling_ramps_up_over_the_epochs(tiny_data, tmp_path):
    with pytest.raises(CaptionerError, match="scheduled sampling needs one LSTM layer"):
        _cfg(tiny_data, tmp_path / "x", sample_prob=0.25, num_layers=2).validate()
    with pytest.raises(CaptionerError, match="sample prob"):
        _cfg(tiny_data, tmp_path / "x", sample_prob=1.0).validate()
    train(_cfg(tiny_data, tmp_path / "run", epochs=3, sample_prob=0.5), progress=False)
    hist = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["sample_prob"] for h in hist] == [0.0, 0.25, 0.5]
    assert Captioner.load(tmp_path / "run").caption(sorted(tiny_data.glob("img*.jpg"))[:2])


def test_feature_rows_read_from_the_cache_equal_the_table(tiny_data, tmp_path):
    """What CPU training indexes (FeatureRows, read from the cache files) is the concatenated table."""
    from dataclasses import replace
    import numpy as np
    from captioner.encoders import create_encoder
    from captioner.features import FeatureRows, extract_features
    enc = create_encoder()
    imgs = sorted(tiny_data.glob("img*.jpg"))[:5]
    sets = [extract_features(enc, imgs, tmp_path, workers=0, progress=False, preprocess=p)
            for p in (enc.preprocess, replace(enc.preprocess, hflip=True))]
    table = np.concatenate([np.asarray(s.features) for s in sets])
    rows = FeatureRows(sets)
    picked = [9, 0, 4, 5, 5, 7]
    assert len(rows) == 10 and torch.equal(rows[picked], torch.from_numpy(table[picked]))
    rows.close()


def test_feature_cache_is_keyed_by_the_images_bytes_not_their_times(tiny_data, tmp_path):
    """A remount, a fresh copy in place or `touch` keeps the cache (no recomputation); new bytes under the same name
    rebuild it."""
    import os
    import shutil
    import numpy as np
    from captioner.encoders import create_encoder
    from captioner.features import extract_features
    enc, folder, cache = create_encoder(), tmp_path / "imgs", tmp_path / "cache"
    folder.mkdir()
    src = sorted(tiny_data.glob("img*.jpg"))[:3]
    imgs = [shutil.copy(p, folder / p.name) for p in src]
    first = np.array(extract_features(enc, imgs, cache, workers=0, progress=False).features)
    made = sorted(cache.glob("*.npy"))
    os.utime(imgs[0], ns=(1, 1))  # new times, same bytes
    again = extract_features(enc, imgs, cache, workers=0, progress=False)
    assert sorted(cache.glob("*.npy")) == made and np.array_equal(np.asarray(again.features), first)
    shutil.copy(src[2], imgs[0])  # new bytes under the old name
    changed = np.asarray(extract_features(enc, imgs, cache, workers=0, progress=False).features)
    assert len(list(cache.glob("*.npy"))) == 2
    assert np.array_equal(changed[0], first[2]) and np.array_equal(changed[1:], first[1:])


def test_ema_keeps_the_average_resumes_exactly_and_logs_the_raw_weights(tiny_data, tmp_path):
    """--ema: best.safetensors is the average, best_raw.safetensors the trained weights; an interrupted run resumes
    to the same average."""
    summary = train(_cfg(tiny_data, tmp_path / "full", ema=0.9, select="last"), progress=False)
    state, _ = load_tensors(tmp_path / "full" / "state.safetensors")
    best, _ = load_tensors(tmp_path / "full" / "best.safetensors")
    raw, _ = load_tensors(tmp_path / "full" / "best_raw.safetensors")
    assert summary["best_epoch"] == 3
    assert torch.equal(best["decoder.out.weight"].float(), state["ema.module.out.weight"].float())
    assert torch.equal(raw["decoder.out.weight"].float(), state["model.out.weight"].float())
    assert not torch.equal(state["ema.module.out.weight"], state["model.out.weight"])
    # `captioner last-epoch`: the average's last epoch by default, the trained weights' with --raw
    for extra, key in (([], "ema.module.out.weight"), (["--raw"], "model.out.weight")):
        r = subprocess.run([sys.executable, "-m", "captioner", "last-epoch", str(tmp_path / "full"), "--out",
                            str(tmp_path / "last.safetensors"), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        last, _ = load_tensors(tmp_path / "last.safetensors")
        assert torch.equal(last["decoder.out.weight"].float(), state[key].float()), extra
    hist = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("raw_dev_loss" in h and "raw_dev_BLEU-4" in h and h["raw_dev_loss"] != h["dev_loss"] for h in hist)

    with pytest.raises(Interrupted):
        train(_cfg(tiny_data, tmp_path / "cut", ema=0.9, select="last", stop_after_steps=8), progress=False)
    cfg = resume_config(tmp_path / "cut")
    cfg.stop_after_steps = 0
    train(cfg, resume=True, progress=False)
    again, _ = load_tensors(tmp_path / "cut" / "state.safetensors")
    assert state.keys() == again.keys()
    for k in state:
        assert torch.equal(state[k], again[k]), k

    # a run started without an average picks one up on --resume, from the weights as they are then
    train(_cfg(tiny_data, tmp_path / "late", epochs=1), progress=False)
    cfg = resume_config(tmp_path / "late")
    cfg.epochs, cfg.ema = 2, 0.9
    train(cfg, resume=True, progress=False)
    late, _ = load_tensors(tmp_path / "late" / "state.safetensors")
    assert "ema.n_averaged" in late and int(late["ema.n_averaged"]) > 0
    for bad, msg in ((1.0, "ema must be in"), (-0.1, "ema must be in")):
        with pytest.raises(CaptionerError, match=msg):
            _cfg(tiny_data, tmp_path / "x", ema=bad).validate()
    with pytest.raises(CaptionerError, match="fine_tune_blocks"):
        _cfg(tiny_data, tmp_path / "x", ema=0.9, fine_tune_blocks=1).validate()


def _train_plain(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "plain", epochs=1), progress=False)
    return tmp_path / "plain"


def test_limit_trains_on_a_sample_of_the_images_and_plots_from_one_epoch(tiny_data, tmp_path):
    """--limit N: a quick try on N training images (3 captions each here: 4 images, batch 4, 3 steps an epoch);
    the curves show the per-step training loss from the first epoch on."""
    summary = train(_cfg(tiny_data, tmp_path / "run", epochs=1, limit=4), progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 3 and summary["epochs_run"] == 1 and summary["seconds"] > 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    with pytest.raises(CaptionerError, match="limit"):
        _cfg(tiny_data, tmp_path / "x", limit=-1).validate()
