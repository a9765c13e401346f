"""Ensembles of decoders: the vote is the average of the members' probabilities, decoding treats the
stacked states like one model's, and several runs combine into one checkpoint that loads anywhere."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.config import Decoding

LENGTH_PENALTY = Decoding().length_penalty
from captioner.errors import CaptionerError
from captioner.decoding import _step, beam_search, beam_search_reference, greedy
from captioner.inference import Captioner, load_model, save_ensemble
from captioner.model import DecoderConfig, Ensemble, ShowAndTell
from captioner.train import TrainConfig, train
from captioner.vocab import Vocabulary
from conftest import make_tiny_dataset

WORDS = "a dog cat runs sits on the grass in water red ball".split()


def _models(n: int, layers: int = 1) -> tuple[list[ShowAndTell], Vocabulary]:
    vocab = Vocabulary.build([" ".join(WORDS)], min_count=1)
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = ShowAndTell(DecoderConfig(len(vocab), feature_dim=12, embed_dim=10, hidden_dim=10, num_layers=layers))
        for p in m.parameters():
            p.data.mul_(4)  # sharper distributions, so members really disagree
        out.append(m.eval())
    return out, vocab


def test_one_member_is_the_model_itself():
    (m,), vocab = _models(1)
    feats = torch.randn(5, 12)
    assert [h.tokens for h in greedy(Ensemble([m]), feats, vocab)] == [h.tokens for h in greedy(m, feats, vocab)]
    a = beam_search(Ensemble([m]), feats, vocab, beam_size=3, n_best=3)
    b = beam_search(m, feats, vocab, beam_size=3, n_best=3)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]


@pytest.mark.parametrize("layers", [1, 2])
def test_vote_is_the_mean_of_member_probabilities(layers):
    members, vocab = _models(3, layers)
    ens = Ensemble(members).eval()
    feats, tokens = torch.randn(4, 12), torch.tensor([1, 4, 5, 6])
    with torch.no_grad():
        logp, state = ens.step(tokens, ens.init_state(feats))
        probs = [m.step(tokens, m.init_state(feats))[0].exp() for m in members]
        assert torch.allclose(logp, torch.stack(probs).mean(0).log(), atol=1e-5)
        assert state[0].shape == (3 * layers, 4, 10)
        fast, fast_state = _step(ens, tokens, ens.init_state(feats))  # lstm_cell path, member by member
        assert torch.allclose(fast, logp, atol=1e-5) and torch.allclose(fast_state[1], state[1], atol=1e-5)
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # the test means something


def test_ensemble_beam_search_equals_reference_and_differs_from_members():
    members, vocab = _models(2)
    ens = Ensemble(members)
    feats = torch.randn(20, 12)
    batched = beam_search(ens, feats, vocab, beam_size=3, n_best=2)
    ref = beam_search_reference(ens, feats, vocab, beam_size=3, n_best=2)
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in ref]
    assert all(math.isclose(a[0].logprob, b[0].logprob, abs_tol=1e-4) for a, b in zip(batched, ref))
    alone = [[h.tokens for h in hs] for hs in beam_search(members[0], feats, vocab, beam_size=3, n_best=2)]
    assert alone != [[h.tokens for h in hs] for hs in batched]


def test_members_must_fit_together():
    (a,), vocab = _models(1)
    b = ShowAndTell(DecoderConfig(len(vocab), feature_dim=12, embed_dim=10, hidden_dim=14))
    with pytest.raises(ValueError, match="share"):
        Ensemble([a, b])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = make_tiny_dataset(root / "data")
    out = []
    for seed in (0, 1):
        cfg = TrainConfig(data=str(data / "caps.csv"), out=str(root / f"s{seed}"), cache_dir=str(data / "cache"),
                          embed_dim=16, hidden_dim=16, min_count=1, batch_size=4, epochs=2, workers=0,
                          warmup_steps=2, seed=seed)
        train(cfg, progress=False)
        out.append(root / f"s{seed}" / "best.safetensors")
    return data, out


def test_runs_combine_into_one_checkpoint(runs, tmp_path):
    data, ckpts = runs
    assert save_ensemble(tmp_path / "ens.safetensors", ckpts) == 2
    cap = Captioner.load(tmp_path / "ens.safetensors")
    assert isinstance(cap.decoder, Ensemble) and len(cap.decoder.members) == 2
    images = sorted(data.glob("img*.jpg"))
    by_hand = Ensemble([Captioner.load(c).decoder for c in ckpts])
    feats = cap.encode(images)
    expect = [cap.vocab.decode(hs[0].tokens) for hs in beam_search(by_hand, feats, cap.vocab, 3, suppress_unk=True,
                                                                    length_penalty=LENGTH_PENALTY, block_trigrams=True,
                                                                        block_repeats=True)]
    assert cap.caption(images, beam_size=3, rerank=0) == expect
    # an ensemble is itself a member: three decoders from two files
    assert save_ensemble(tmp_path / "three.safetensors", [tmp_path / "ens.safetensors", ckpts[0]]) == 3


def test_bundle_script_and_refusals(runs, tmp_path, capsys):
    data, ckpts = runs
    bundle = Path(__file__).parent.parent / "train" / "bundle.py"
    r = subprocess.run([sys.executable, bundle, *map(str, ckpts), "--out", tmp_path / "b.safetensors"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ensemble of 2" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, bundle, *map(str, ckpts), "--out", tmp_path / "b8.safetensors",
                        "--storage", "int8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ensemble of 2" in r.stdout, r.stderr
    # int8: each matrix row within half a step (its largest magnitude / 254) of the float32 original
    save_ensemble(tmp_path / "e32.safetensors", ckpts)
    (d32, _, _, _), (d8, _, _, meta) = load_model(tmp_path / "e32.safetensors"), load_model(tmp_path / "b8.safetensors")
    assert meta["storage"] == "int8"
    for (k, w), w8 in zip(d32.state_dict().items(), d8.state_dict().values()):
        bound = w.abs().amax(-1, keepdim=True) / 254 * 1.001 + 1e-6 if w.dim() == 2 else w.abs() / 1000 + 1e-6
        assert ((w8 - w).abs() <= bound).all(), k
    sizes = {n: (tmp_path / f"{n}.safetensors").stat().st_size for n in ("e32", "b", "b8")}
    assert sizes["b8"] < 0.6 * sizes["b"] and sizes["b"] < 0.55 * sizes["e32"], sizes  # metadata takes the rest
    assert all(Captioner.load(tmp_path / "b8.safetensors").caption(sorted(data.glob("img*.jpg"))[:2]))
    # a run on other data has another vocabulary
    other = make_tiny_dataset(tmp_path / "other", extra_rows=("img0.jpg,a zebra zebra photo,train",))
    cfg = TrainConfig(data=str(other / "caps.csv"), out=str(tmp_path / "o"), cache_dir=str(data / "cache"),
                      embed_dim=16, hidden_dim=16, min_count=1, batch_size=4, epochs=1, workers=0)
    train(cfg, progress=False)
    r = subprocess.run([sys.executable, bundle, str(ckpts[0]), str(tmp_path / "o"), "--out", tmp_path / "x.safetensors"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "vocabulary differs" in r.stderr, r.stderr
    from captioner.cli import main
    save_ensemble(tmp_path / "ens.safetensors", ckpts)
    capsys.readouterr()
    assert main(["train", "--scst", "--init", str(tmp_path / "ens.safetensors"), "--data", str(data / "caps.csv"),
                 "--out", str(tmp_path / "scst"), "--quiet"]) != 0
    assert "is an ensemble; run SCST on each member" in capsys.readouterr().err
    assert not (tmp_path / "scst").exists()


def test_members_that_fine_tuned_their_encoders_top_share_its_trunk(runs, tmp_path):
    """Each member keeps its own tuned last stage: one trunk pass per image, each member's stage on it, and each
    decoder reads its own features; the int8 file (its convolution kernels included) decodes alike."""
    from captioner.encoders import SharedTrunk, create_encoder
    from captioner.features import model_features
    data, plain = runs
    ckpts = []
    for seed in (0, 1):
        cfg = TrainConfig(data=str(data / "caps.csv"), out=str(tmp_path / f"ft{seed}"), cache_dir=str(data / "cache"),
                          embed_dim=16, hidden_dim=16, min_count=1, batch_size=4, epochs=1, workers=0,
                          warmup_steps=2, seed=seed, fine_tune_blocks=1, lr=0.01)
        train(cfg, progress=False)
        ckpts.append(tmp_path / f"ft{seed}" / "best.safetensors")
    assert save_ensemble(tmp_path / "ens.safetensors", ckpts) == 2
    cap = Captioner.load(tmp_path / "ens.safetensors")
    assert isinstance(cap.encoder, SharedTrunk) and cap.decoder.split_features and cap.encoder.dim == 2 * 1280
    alone = [Captioner.load(c) for c in ckpts]
    head = "features.net._conv_head.weight"
    assert not torch.equal(alone[0].encoder.state_dict()[head], alone[1].encoder.state_dict()[head])
    sd, stem = cap.encoder.state_dict(), "features.net._conv_stem.weight"
    assert sd[f"members.1.{stem}"].data_ptr() == sd[f"members.0.{stem}"].data_ptr()  # one trunk in memory
    assert not torch.equal(sd[f"members.1.{head}"], sd[f"members.0.{head}"])  # each member's own head
    images = sorted(data.glob("img*.jpg"))
    feats = cap.encode(images)
    for i, a in enumerate(alone):  # each part is that member's own tuned features
        torch.testing.assert_close(feats[:, i * 1280:(i + 1) * 1280], a.encode(images), rtol=1e-4, atol=1e-4)
    by_hand = Ensemble([a.decoder for a in alone])
    with torch.no_grad():
        s_ens = cap.decoder.init_state(feats)
        s_hand = [m.init_state(a.encode(images)) for m, a in zip(by_hand.members, alone)]
    torch.testing.assert_close(s_ens[0], torch.cat([s[0] for s in s_hand]), rtol=1e-4, atol=1e-4)
    # cached features (the trunk's maps, each member's stage on them) equal the encoder's own, and the views align
    cached = model_features(cap.encoder, images, data / "cache", workers=0, progress=False)
    assert cached.features.shape == (len(images), 2 * 1280)
    torch.testing.assert_close(torch.tensor(np.asarray(cached.features), dtype=torch.float32), feats, atol=2e-2, rtol=1e-2)
    six = cap.encode(images[:2], views=6)
    halves = [a.encode(images[:2], views=6) for a in alone]
    torch.testing.assert_close(six, torch.cat(halves, 1), rtol=1e-4, atol=1e-4)
    # int8 storage quantises the tuned kernels too, and the bundle still captions like the float32 file
    bundle = Path(__file__).parent.parent / "train" / "bundle.py"
    r = subprocess.run([sys.executable, bundle, *map(str, ckpts), "--storage", "int8", "--out", tmp_path / "b8.safetensors"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ensemble of 2" in r.stdout, r.stderr
    from captioner.checkpoint import load_tensors
    t8, meta = load_tensors(tmp_path / "b8.safetensors")
    assert meta["encoder"]["parts"] == 2 and f"encoder.m1.{head}" not in t8
    assert t8[f"encoder.m1.{head}.delta4"].dtype == torch.uint8  # 4 bits of difference from the pretrained kernels
    c8 = Captioner.load(tmp_path / "b8.safetensors", precision="float32")
    w, w8 = cap.encoder.state_dict()[f"members.1.{head}"], c8.encoder.state_dict()[f"members.1.{head}"]
    d = w - create_encoder().state_dict()[head]
    assert d.abs().max() > 1e-3 and ((w8 - w).abs() <= d.abs().amax((1, 2, 3), keepdim=True) / 14 * 1.01 + 1e-7).all()
    bn = "features.net._bn1.weight"  # vectors stay float16
    assert torch.allclose(c8.encoder.state_dict()[f"members.0.{bn}"], cap.encoder.state_dict()[f"members.0.{bn}"], rtol=1e-3)
    assert all(c8.caption(images[:2]))
    from captioner.inference import bundle as bundle_one
    bundle_one(tmp_path / "one8.safetensors", [ckpts[1]], storage="int8")  # one tuned model stores its delta alike
    one = Captioner.load(tmp_path / "one8.safetensors", precision="float32").encoder.state_dict()[head]
    torch.testing.assert_close(one, w8, rtol=0, atol=1e-6)
    from captioner.checkpoint import save_tensors
    for odd, msg in (({"parts": 3}, "3 encoder parts need as many members"), ({"parts": "two"}, "malformed"),
                     ({"parts": 1}, "1280-d features but encoder efficientnet_lite0 gives 2560-d"),
                     ({"cut": 1}, "4-bit weight difference features.net._conv_head.weight.delta4 does not fit")):
        # metadata or tensors that do not fit together: one clear line
        cut = {k: v[:, :-1] if k.endswith(".delta4") and "cut" in odd else v for k, v in t8.items()}
        save_tensors(tmp_path / "odd.safetensors", cut, {**meta, "encoder": {**meta["encoder"], **odd}})
        with pytest.raises(CaptionerError, match=msg):
            Captioner.load(tmp_path / "odd.safetensors")
    # plain and tuned members cannot mix: they would need different features
    with pytest.raises(CaptionerError, match="encoder differs"):
        save_ensemble(tmp_path / "mix.safetensors", [plain[0], ckpts[0]])


def test_members_that_read_different_cnns_keep_them(runs, tmp_path):
    """A Lite0 run and a Lite1 run make one file whose encoder is both CNNs (EncoderStack): each decoder reads
    its own CNN's features, each CNN at its own input size, as when each captions alone; evaluation's cached
    features equal the encoder's own; the int8 bundle loads; broken stack metadata is one clear error."""
    from captioner.checkpoint import load_tensors, save_tensors
    from captioner.encoders import EncoderStack
    from captioner.evaluate import view_features
    data, plain = runs
    cfg = TrainConfig(data=str(data / "caps.csv"), out=str(tmp_path / "l1"), cache_dir=str(data / "cache"),
                      embed_dim=16, hidden_dim=16, min_count=1, batch_size=4, epochs=2, workers=0,
                      warmup_steps=2, seed=2, encoder="efficientnet_lite1")
    train(cfg, progress=False)
    ckpts = [plain[0], tmp_path / "l1" / "best.safetensors"]
    assert save_ensemble(tmp_path / "mix.safetensors", ckpts) == 2
    cap = Captioner.load(tmp_path / "mix.safetensors")
    assert isinstance(cap.encoder, EncoderStack) and cap.decoder.split_features
    assert cap.encoder.name == "efficientnet_lite0+efficientnet_lite1" and cap.encoder.dim == 2 * 1280
    alone = [Captioner.load(c) for c in ckpts]
    assert [a.encoder.preprocess.size for a in alone] == [224, 240]
    images = sorted(data.glob("img*.jpg"))
    feats = cap.encode(images)
    torch.testing.assert_close(feats, torch.cat([a.encode(images) for a in alone], 1), rtol=1e-4, atol=1e-4)
    six = cap.encode(images[:2], views=6)
    torch.testing.assert_close(six, torch.cat([a.encode(images[:2], views=6) for a in alone], 1), rtol=1e-4, atol=1e-4)
    by_hand = Ensemble([a.decoder for a in alone], split_features=True)
    shipped = dict(length_penalty=LENGTH_PENALTY, suppress_unk=True, block_trigrams=True, block_repeats=True)
    expect = [cap.vocab.decode(hs[0].tokens) for hs in beam_search(by_hand, feats, cap.vocab, 3, **shipped)]
    assert cap.caption(images, beam_size=3, rerank=0) == expect
    assert expect != [cap.vocab.decode(hs[0].tokens)  # the second member has a say
                      for hs in beam_search(alone[0].decoder, feats[:, :1280], cap.vocab, 3, **shipped)]
    cached, mask, bad = view_features(cap, images, 1, str(data / "cache"), workers=0, progress=False)
    assert mask.all() and not bad
    torch.testing.assert_close(cached, feats, atol=2e-2, rtol=1e-2)  # float16 caches, each CNN's own
    bundle = Path(__file__).parent.parent / "train" / "bundle.py"
    r = subprocess.run([sys.executable, bundle, *map(str, ckpts), "--storage", "int8", "--out", tmp_path / "b8.safetensors"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ensemble of 2" in r.stdout, r.stderr
    tensors, meta = load_tensors(tmp_path / "b8.safetensors")
    assert meta["encoder"]["parts"] == 2 and [m["name"] for m in meta["encoder"]["stack"]] == [
        "efficientnet_lite0", "efficientnet_lite1"] and not any(k.startswith("encoder.") for k in tensors)
    assert all(Captioner.load(tmp_path / "b8.safetensors").caption(images[:2]))
    # a stack and a member that fine-tuned its encoder do not mix; metadata naming an unknown CNN is refused
    stack = meta["encoder"]["stack"]
    for broken, says in ((dict(meta["encoder"], stack=[stack[0], dict(stack[1], name="resnet9")]), "unknown encoder"),
                         (dict(meta["encoder"], stack=stack[:1]), "malformed")):
        save_tensors(tmp_path / "bad.safetensors", tensors, dict(meta, encoder=broken))
        with pytest.raises(CaptionerError, match=says):
            load_model(tmp_path / "bad.safetensors")
