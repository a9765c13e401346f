"""Attention per word: the weights recorded while decoding are those of the steps each returned caption ran
on its own beam, in every precision, and they draw as one panel per word."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.attention import WordAttention, grid_size, heatmap, overlay, plot
from captioner.cli import main
from captioner.decoding import (beam_search, beam_search_reference, greedy, int8_is_available, precision_dtype,
                                set_precision)
from captioner.errors import CaptionerError
from captioner.inference import BUNDLED_MODEL, Captioner
from captioner.model import DecoderConfig, Ensemble, ShowAndTell
from captioner.vocab import Vocabulary
from conftest import ROOT

EXAMPLES = sorted((ROOT / "captioner" / "assets" / "examples").glob("*.jpg"))
VOCAB = Vocabulary([*Vocabulary.SPECIALS, *(f"w{i}" for i in range(30 - len(Vocabulary.SPECIALS)))])
R = 4


def _attending(seed: int = 0, layers: int = 1) -> ShowAndTell:
    torch.manual_seed(seed)
    return ShowAndTell(DecoderConfig(30, 6 * (R + 1), 8, 16, num_layers=layers, dropout=0.0, regions=R,
                                     att_dim=5)).eval()


def _features(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6 * (R + 1), generator=torch.Generator().manual_seed(seed)) * 3


def _members(model) -> list[ShowAndTell]:
    return list(model.members) if isinstance(model, Ensemble) else [model]


@torch.inference_mode()
def teacher_forced(model, features: torch.Tensor, tokens: list[int], step=None) -> torch.Tensor:
    """[words, decoders, R + 1] by hand: each decoder fed <start> and the caption's words one by one
    (`step(member, tokens, state)`, model.step by default), its weights read off the state it reached."""
    out = []
    parts = features.chunk(len(_members(model)), -1) if getattr(model, "split_features", False) else None
    for i, m in enumerate(_members(model)):
        state, rows = m.init_state(parts[i] if parts else features), []
        for tok in [Vocabulary.start_id, *tokens[:-1]]:
            _, state = (step or (lambda m, t, s: m.step(t, s)))(m, torch.tensor([tok]), state)
            h, memory = state[0][-1], state[2]
            weights = m.attention(h, memory).reshape(1, -1)
            context = m.attend(h, memory) - h
            share = h.norm() / (h.norm() + context.norm())
            rows.append(torch.cat([weights[0], share.view(1)]))
        out.append(torch.stack(rows))
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["one", "ensemble", "two layers"])
def test_greedy_and_beam_record_the_steps_each_caption_ran(kind):
    """Beam 1 and greedy: the weights equal a teacher-forced re-run along the returned words; beam 3: the
    batched search (rows reordered by beam each step, images dropped as they finish) equals the one-beam-
    at-a-time reference's own tracking, and every hypothesis of the n-best carries its own beam's weights."""
    model = {"one": lambda: _attending(), "ensemble": lambda: Ensemble([_attending(1), _attending(2)]),
             "two layers": lambda: _attending(layers=2)}[kind]()
    feats = _features()
    hyps = greedy(model, feats, VOCAB, max_len=8, attention=True)
    assert [h.tokens for h in hyps] == [h.tokens for h in greedy(model, feats, VOCAB, max_len=8)]  # no other words
    for b, h in enumerate(hyps):
        D = len(_members(model))
        assert h.attention.shape == (len(h.tokens), D, R + 1)
        torch.testing.assert_close(h.attention[..., :R].sum(-1), torch.ones(len(h.tokens), D))
        torch.testing.assert_close(h.attention, teacher_forced(model, feats[b:b + 1], h.tokens), rtol=0, atol=2e-5)
    one = beam_search(model, feats, VOCAB, beam_size=1, max_len=8, attention=True)
    assert all(torch.equal(g.attention, hs[0].attention) for g, hs in zip(hyps, one))
    double = copy.deepcopy(model).double()  # float64: the searches cannot part on a near-tie
    fast = beam_search(double, feats.double(), VOCAB, beam_size=3, max_len=8, n_best=3, attention=True)
    ref = beam_search_reference(double, feats.double(), VOCAB, beam_size=3, max_len=8, n_best=3, attention=True)
    assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in ref]
    for b, (hs, rs) in enumerate(zip(fast, ref)):
        for h, r in zip(hs, rs):
            torch.testing.assert_close(h.attention, r.attention.float(), rtol=0, atol=1e-6)
            torch.testing.assert_close(h.attention, teacher_forced(double, feats[b:b + 1].double(), h.tokens).float(),
                                       rtol=0, atol=1e-6)
    assert any(len({h.tokens[0] for h in hs}) < len(hs) for hs in fast)  # a beam that split: the gathering counts
    plain = beam_search(model, feats, VOCAB, beam_size=3, max_len=8, n_best=3)
    assert all(h.attention is None for hs in plain for h in hs)


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_low_precision_steps_record_their_own_weights(precision):
    """The int8 and bfloat16 decoding steps compute the hidden state in their own arithmetic: the recorded
    weights are those of that state (a re-run through the same step), not float32's."""
    if precision == "int8" and not int8_is_available():
        pytest.skip("no int8 kernels in this torch")
    from captioner.decoding import _step
    model = Ensemble([_attending(1), _attending(2)])
    feats = _features(2)
    set_precision(model, precision_dtype(precision))
    for b in range(2):  # one image at a time: int8's rounding depends on the rows of each call
        h = greedy(model, feats[b:b + 1], VOCAB, max_len=8, attention=True)[0]
        torch.testing.assert_close(h.attention, teacher_forced(model, feats[b:b + 1], h.tokens, _step), rtol=0, atol=1e-6)
        assert not torch.allclose(h.attention, teacher_forced(model, feats[b:b + 1], h.tokens), rtol=0, atol=1e-5)
    set_precision(model, torch.float32)


@pytest.fixture(scope="module")
def cap() -> Captioner:
    if not BUNDLED_MODEL.is_file():
        pytest.skip("no bundled model")
    return Captioner.load(precision="float32")


def test_bundled_model_words_weights_and_reranked_caption(cap):
    """The shipped decoding (beam 10, 3 best reranked by agreement): each returned caption's words carry the
    weights of its own beam (a teacher-forced re-run along it), also where reranking returned another beam
    than the most probable; weights sum to one, the mean is the members' mean, and other photos read
    other regions."""
    feats = cap.encode(EXAMPLES)
    caps = cap.decode(feats, attention=True)
    top = cap.decode(feats, rerank=0)
    assert [c.text for c in caps] == [c.text for c in cap.decode(feats)]
    assert any(c.text != t.text for c, t in zip(caps, top))  # a reranked pick is among them
    for b, c in enumerate(caps):
        words = c.attention
        assert [w.word for w in words] == c.text.split()
        assert all(w.members.shape == (2, 9) and w.grid == 3 for w in words)
        stacked = torch.stack([torch.cat([w.members, w.member_global_shares[:, None]], -1) for w in words])
        tokens = cap.vocab.encode(c.text)[1:-1]
        torch.testing.assert_close(stacked, teacher_forced(cap.decoder, feats[b:b + 1], tokens), rtol=0, atol=1e-4)
        for w in words:
            torch.testing.assert_close(w.members.sum(-1), torch.ones(2))
            torch.testing.assert_close(w.weights, w.members.mean(0))
            assert w.global_share == pytest.approx(float(w.member_global_shares.mean()))
            assert 0 < w.global_share < 1
    first = torch.stack([c.attention[0].weights for c in caps])  # the first word: only the photo differs
    assert (first[1:] - first[0]).abs().amax(-1).min() > 1e-3


def test_model_without_regions_is_a_clear_error(cap, tmp_path, capsys, monkeypatch):
    """A model of pool "avg" has no regions to show: one line from the API and from the CLI, no figure."""
    avg = Captioner(ShowAndTell(DecoderConfig(len(cap.vocab), feature_dim=cap.decoder.feature_dim)), cap.vocab,
                    cap.encoder, precision="float32")
    with pytest.raises(CaptionerError, match=r"^this model does not attend over image regions .*--pool regions$"):
        avg.decode(torch.zeros(1, cap.decoder.feature_dim), attention=True)
    with pytest.raises(ValueError, match="attention needs a decoder that attends"):
        greedy(avg.decoder, torch.zeros(1, cap.decoder.feature_dim), cap.vocab, attention=True)
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, *args, **kwargs: avg))
    assert main(["caption", str(EXAMPLES[0]), "--attention", str(tmp_path / "att.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner: error: this model does not attend") and err.count("\n") == 1
    assert not (tmp_path / "att.png").exists()


@pytest.mark.parametrize("regions", [9, 49])
def test_heatmap_is_smooth_and_keeps_each_cell_at_its_place(regions):
    g = grid_size(regions)
    w = torch.softmax(torch.randn(regions, generator=torch.Generator().manual_seed(regions)) * 2, 0)
    heat = heatmap(w, (g * 40, g * 30))
    assert heat.shape == (g * 30, g * 40) and 0 <= heat.min() and heat.max() <= 1
    assert len(np.unique(heat.round(4))) > 20 * regions  # a gradient, not g x g flat squares
    centres = heat[15::30, 20::40]  # each cell's centre
    np.testing.assert_allclose(centres, (w / w.max()).view(g, g).numpy(), atol=0.08)
    assert overlay(Image.new("RGB", (g * 40, g * 30), "white"), w).size == (g * 40, g * 30)
    with pytest.raises(CaptionerError, match="square grid"):
        heatmap(torch.ones(8) / 8, (10, 10))


@pytest.mark.parametrize("regions", [9, 49])
def test_figure_has_the_photo_and_one_panel_per_word(tmp_path, regions):
    words = [WordAttention(f"word{i}", torch.softmax(torch.randn(regions), 0), torch.softmax(torch.randn(2, regions), 1),
                           0.6, torch.tensor([0.5, 0.7])) for i in range(7)]
    out = tmp_path / "att.png"
    fig = plot(EXAMPLES[0], words, out)
    assert len(fig.axes) == 1 + len(words)
    assert [ax.get_title() for ax in fig.axes] == ["photo", *(w.word for w in words)]
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 4 * 200 and png.height > 2 * 100  # 5 columns, 2 rows


def test_cli_writes_the_figure(cap, tmp_path, capsys, monkeypatch):
    """`captioner caption photo --attention out.png`: the caption on stdout, the figure written (the loaded
    model is the module's, so the test does not load it twice)."""
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, *args, **kwargs: cap))
    out = tmp_path / "att.png"
    assert main(["caption", str(EXAMPLES[1]), "--attention", str(out), "--beam-size", "3"]) == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == f"wrote {out}"
    n = len(printed.out.split()) + 1
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= min(5, n) * 200 and png.height >= (n + 4) // 5 * 150
