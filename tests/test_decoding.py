"""Beam search against greedy and against the plain per-image reference, on real images and the bundled model."""
import pytest
import torch

from captioner.data import load_dataset
from captioner.decoding import (INT8, beam_search, beam_search_reference, greedy, int8_is_available, precision_dtype,
                                set_precision)
from captioner.evaluate import view_features
from captioner.inference import Captioner


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from conftest import require_shared
    root = require_shared("flickr8k")
    cap = Captioner.load()
    recs = load_dataset(root, split="dev").records[:200]
    feats, mask, _ = view_features(cap, [r.image for r in recs], 1, str(tmp_path_factory.mktemp("cache")),
                                   workers=0, progress=False)  # each of the bundled pair's CNNs, side by side
    assert mask.all()
    return cap, feats


def test_beam_size_one_equals_greedy(real):
    cap, feats = real
    g = greedy(cap.decoder, feats, cap.vocab, max_len=20)
    b = beam_search(cap.decoder, feats, cap.vocab, beam_size=1, max_len=20)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert all(abs(x.logprob - y[0].logprob) < 1e-6 for x, y in zip(g, b))


@pytest.mark.parametrize("k,alpha", [(3, 0.0), (5, 0.7)])
def test_batched_beam_equals_reference(real, k, alpha):
    """Identical captions in float64. In float32 a batch rounds differently from a batch of 1, and the
    bundled ensemble has near-ties (two words a few 1e-6 apart in log-prob swap places), after which the
    searches follow different beams; in float64 they cannot."""
    import copy
    cap, feats = real
    f = feats[:15].double()
    decoder = copy.deepcopy(cap.decoder).double()
    batched = beam_search(decoder, f, cap.vocab, beam_size=k, length_penalty=alpha, n_best=k)
    ref = beam_search_reference(decoder, f, cap.vocab, beam_size=k, length_penalty=alpha, n_best=k)
    assert [[h.tokens for h in hs][:1] for hs in batched] == [[h.tokens for h in hs][:1] for hs in ref]
    for hs_b, hs_r in zip(batched, ref):
        assert abs(hs_b[0].logprob - hs_r[0].logprob) < 1e-9


def test_batched_beam_equals_reference_in_the_shipped_precisions(real):
    """float32, bfloat16 and int8 weights, as shipped: the same captions but for near-ties, log-probs equal to
    rounding (bfloat16 products are rounded to 8 bits, and a batch of 30 sums in another order; int8 rounds
    each product's input to 7 bits with one scale per call, so a row's rounding depends on its batch)."""
    cap, feats = real
    feats = feats[:30]
    try:
        for dtype, tol, least in ((torch.float32, 1e-4, 28), (torch.bfloat16, 0.05, 28), (INT8, 0.15, 25)):
            if dtype == INT8 and not int8_is_available():
                continue
            set_precision(cap.decoder, dtype)
            batched = beam_search(cap.decoder, feats, cap.vocab, beam_size=5, length_penalty=0.7, n_best=5)
            ref = beam_search_reference(cap.decoder, feats, cap.vocab, beam_size=5, length_penalty=0.7, n_best=5)
            same = [b[0].tokens == r[0].tokens for b, r in zip(batched, ref)]
            assert sum(same) >= least, (dtype, sum(same))
            diffs = [abs(b[0].logprob - r[0].logprob) for b, r, ok in zip(batched, ref, same) if ok]
            assert max(diffs) < tol, dtype
    finally:
        set_precision(cap.decoder, precision_dtype(cap.precision))


def _repeats_a_trigram(tokens: list[int]) -> bool:
    grams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(grams) != len(set(grams))


def test_trigram_blocking_batched_equals_reference_and_never_repeats(real):
    """With blocking, no hypothesis of the n-best repeats a trigram, where without it some do (the bundled
    pair on these 200 dev images), and the batched search equals the per-image reference (float64)."""
    import copy
    cap, feats = real
    k = 5
    free = beam_search(cap.decoder, feats, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k)
    blocked = beam_search(cap.decoder, feats, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k,
                          block_trigrams=True)
    assert sum(_repeats_a_trigram(h.tokens) for hs in free for h in hs) >= 5
    assert not any(_repeats_a_trigram(h.tokens) for hs in blocked for h in hs)
    assert all(len(hs) == k for hs in blocked)  # blocking frees places; it never empties a beam
    decoder = copy.deepcopy(cap.decoder).double()
    f = feats[:30].double()
    batched = beam_search(decoder, f, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k, block_trigrams=True)
    ref = beam_search_reference(decoder, f, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k,
                                block_trigrams=True)
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in ref]  # all k
    assert max(abs(b.logprob - r.logprob) for bs, rs in zip(batched, ref) for b, r in zip(bs, rs)) < 1e-9


def test_repeat_blocking_batched_equals_reference_and_never_repeats_a_content_word(real):
    """With block_repeats no caption of the n-best says a content word twice (function words may repeat), the
    batched search equals the per-image reference, and greedy decoding blocks the same way."""
    import copy
    from captioner.vocab import repeated_word
    cap, feats = real
    k = 5
    text = lambda h: [cap.vocab.itos[t] for t in h.tokens]  # noqa: E731
    free = beam_search(cap.decoder, feats, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k)
    blocked = beam_search(cap.decoder, feats, cap.vocab, beam_size=k, length_penalty=0.5, n_best=k,
                          block_repeats=True)
    assert sum(repeated_word(text(h)) is not None for hs in free for h in hs) >= 5
    assert not [text(h) for hs in blocked for h in hs if repeated_word(text(h))]
    assert all(len(hs) == k for hs in blocked)
    assert not any(repeated_word(text(h)) for h in greedy(cap.decoder, feats, cap.vocab, block_repeats=True))
    decoder = copy.deepcopy(cap.decoder).double()
    f = feats[:20].double()
    kw = dict(beam_size=k, length_penalty=0.5, n_best=k, block_trigrams=True, block_repeats=True)
    batched, ref = beam_search(decoder, f, cap.vocab, **kw), beam_search_reference(decoder, f, cap.vocab, **kw)
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in ref]


def test_repeat_blocking_bars_a_plural_after_its_singular_in_torch_and_numpy():
    """After "sinks", neither "sinks" nor "sink" may come; "bench" and function words still may, in both the
    torch search and the torch-free one that ONNX exports run."""
    import numpy as np
    from captioner import onnx_runtime
    from captioner.decoding import _block_repeats
    from captioner.vocab import SPECIALS, Vocabulary
    vocab = Vocabulary([*SPECIALS, "a", "sinks", "sink", "bench", "and"])
    prefix = [[vocab.stoi["a"], vocab.stoi["sinks"], vocab.stoi["and"]]]
    barred = {vocab.stoi["sinks"], vocab.stoi["sink"]}
    logp = torch.zeros(1, len(vocab.itos))
    _block_repeats(logp, torch.tensor(prefix), vocab)
    assert {i for i, v in enumerate(logp[0].tolist()) if v == -float("inf")} == barred
    logp_np = np.zeros((1, len(vocab.itos)), dtype=np.float32)
    onnx_runtime._block_repeats(logp_np, np.array(prefix), np.array(vocab.content_words()),
                                np.array(vocab.repeat_groups()))
    assert set(np.flatnonzero(np.isneginf(logp_np[0])).tolist()) == barred


def test_captioner_and_cli_block_repeats_by_default(real):
    """The shipped path (`Captioner.decode`, beam 10 reranked) repeats no trigram and no content word, and
    no caption is degenerate ("a wave on a wave"), unless told otherwise; without either rule some do."""
    from captioner.cli import build_parser
    from captioner.vocab import degenerate, repeated_word
    cap, feats = real
    words = lambda cs: [c.text.split() for c in cs]  # noqa: E731
    shipped, free = cap.decode(feats), cap.decode(feats, block_trigrams=False, block_repeats=False)
    assert not any(_repeats_a_trigram(w) or repeated_word(w) or degenerate(w) for w in words(shipped))
    assert any(repeated_word(w) for w in words(free))
    for cmd in (["caption", "x.jpg"], ["evaluate", "--data", "d"]):
        for rule in ("block_trigrams", "block_repeats"):
            assert getattr(build_parser().parse_args(cmd), rule) is True
            flag = "--no-" + rule.replace("_", "-")
            assert getattr(build_parser().parse_args(cmd + [flag]), rule) is False


def test_captions_always_end_and_never_empty(real):
    cap, feats = real
    v = cap.vocab
    for max_len in (1, 3, 20):
        for hs in beam_search(cap.decoder, feats[:50], v, beam_size=3, max_len=max_len, n_best=3,
                              suppress_unk=True):
            assert 1 <= len(hs) <= 3
            assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
            for h in hs:
                assert 1 <= len(h.tokens) <= max_len
                assert not {v.pad_id, v.start_id, v.end_id, v.unk_id} & set(h.tokens)


def test_captioner_api_batches_and_n_best(photos):
    # float32: int8's dynamic scales depend on the batch, which may swap a near-tie (shipped-precisions test)
    cap = Captioner.load(precision="float32")
    paths = sorted(photos.glob("*.jpg"))[:5]
    one = cap.caption(paths[0], beam_size=3)
    many = cap.caption(paths, beam_size=3)
    assert isinstance(one, str) and one == many[0] and all(many)
    full = cap.caption_full(paths[:2], beam_size=3, n_best=3)
    assert all(len(c.alternatives) == 3 and c.alternatives[0][0] == c.text for c in full)


def test_precision_is_chosen_by_the_hardware_and_can_be_forced(monkeypatch):
    from captioner.distributed import bfloat16_is_native
    from captioner.errors import CaptionerError
    auto = "int8" if int8_is_available() else "bfloat16" if bfloat16_is_native() else "float32"
    assert Captioner.load().precision == auto
    assert Captioner.load(precision="float32").precision == "float32"
    with pytest.raises(CaptionerError, match="precision must be one of"):
        Captioner.load(precision="int4")
    assert not int8_is_available("cuda") and not int8_is_available("meta")
    # a torch without the int8 kernels: auto falls back to float32 (bfloat16 where native), int8 says why
    monkeypatch.setattr("captioner.inference.int8_is_available", lambda device="cpu": False)
    assert Captioner.load().precision == ("bfloat16" if bfloat16_is_native() else "float32")
    with pytest.raises(CaptionerError, match="int8 decoding runs on CPUs"):
        Captioner.load(precision="int8")


def test_decode_refuses_settings_beyond_its_limits_before_any_work(real):
    """The library's own guard (the CLI's flags and the demo stop such values earlier): a beam of a million rows
    per image would be tens of GB, a NaN length penalty an arbitrary ranking."""
    from captioner.config import MAX_BEAM, MAX_LEN
    from captioner.errors import CaptionerError
    cap, feats = real
    for kw, needle in [({"beam_size": MAX_BEAM + 1}, "beam size"), ({"n_best": 10**6}, "n-best"),
                       ({"rerank": MAX_BEAM + 1}, "rerank"), ({"max_len": MAX_LEN + 1}, "max length"),
                       ({"length_penalty": float("nan")}, "length penalty"), ({"length_penalty": float("inf")}, "finite")]:
        with pytest.raises(CaptionerError, match=needle):
            cap.decode(feats[:1], **kw)
    assert len(cap.decode(feats[:1], beam_size=MAX_BEAM, n_best=MAX_BEAM, max_len=MAX_LEN)[0].alternatives) > 1
