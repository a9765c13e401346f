"""Invariants, checked with hypothesis on generated inputs rather than a few hand-picked ones.

* tokenizer and vocabulary: tokenizing is a normal form, and decode(encode(text)) gives the text's
  normalised tokens (<unk> for words outside the vocabulary);
* decoding (greedy, beam search, sampling) on small random models: captions always end, are never
  empty, never exceed max_len and never contain <pad>/<start>/<end> (nor <unk> when suppressed);
* fuzzing: mutated real JPEG/PNG/GIF bytes given to `load_image` give an RGB image or an ImageError,
  and mutated checkpoints given to `load_tensors` give tensors or a CaptionerError, never anything else.

Examples are derandomized (the same every run, so CI is reproducible) and no example database is kept.
"""
from __future__ import annotations

import io
import json
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.checkpoint import load_tensors, save_tensors
from captioner.decoding import beam_search, beam_search_reference, greedy
from captioner.errors import CaptionerError
from captioner.images import ImageError, load_image
from captioner.model import DecoderConfig, ShowAndTell
from captioner.vocab import SPECIALS, Vocabulary, tokenize

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is many times faster than waking a pool for each small op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- tokenizer and vocabulary ---------------------------------------------------------------------------

WORD = st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4})?|[^\W\d_]{1,6}", fullmatch=True)
SEPARATOR = st.sampled_from([" ", "  ", ", ", " . ", "! ", "\t", "\n", " 🐶 ", " -- ", "?"])


@st.composite
def captions(draw, words=WORD):
    ws = draw(st.lists(words, min_size=0, max_size=12))
    seps = draw(st.lists(SEPARATOR, min_size=len(ws), max_size=len(ws)))
    shout = draw(st.booleans())
    text = "".join(w + s for w, s in zip(ws, seps))
    return text.upper() if shout else text


@FAST
@given(st.text(max_size=80))
def test_tokenize_is_a_normal_form(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens
    assert all(t and t == t.strip() and not set(t) & set("<> \t\n") for t in tokens)


@FAST
@given(st.lists(captions(), min_size=1, max_size=6), captions())
def test_encode_decode_round_trip(corpus, other):
    vocab = Vocabulary.build(corpus, min_count=1)
    for text in corpus:  # every word in the vocabulary: the normalised tokens come back
        ids = vocab.encode(text)
        assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and vocab.unk_id not in ids
        assert vocab.decode(ids) == " ".join(tokenize(text))
    expected = [w if w in vocab.stoi else "<unk>" for w in tokenize(other)]  # others become <unk>
    assert vocab.decode(vocab.encode(other)) == " ".join(expected)


@FAST
@given(st.lists(captions(), min_size=1, max_size=8), st.integers(1, 3), st.randoms(use_true_random=False))
def test_vocabulary_is_deterministic_and_round_trips(tmp_path_factory, corpus, min_count, rnd):
    vocab = Vocabulary.build(corpus, min_count)
    shuffled = list(corpus)
    rnd.shuffle(shuffled)
    assert Vocabulary.build(shuffled, min_count).itos == vocab.itos  # order of captions does not matter
    assert vocab.itos[:4] == list(SPECIALS) and len(set(vocab.itos)) == len(vocab)
    path = tmp_path_factory.getbasetemp() / "vocab.json"
    path.write_text(json.dumps(vocab.to_list()))
    assert Vocabulary.load(path).itos == vocab.itos


# --- decoding -------------------------------------------------------------------------------------------

@st.composite
def small_models(draw):
    n_words = draw(st.integers(0, 25))  # 0: a vocabulary of nothing but the special tokens
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(n_words))])
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = ShowAndTell(DecoderConfig(len(vocab), 6, 5, 7, num_layers=draw(st.integers(1, 2)))).eval()
    with torch.no_grad():  # make <end> anywhere from rare to likely, so captions of every length turn up
        model.out.bias[vocab.end_id] += draw(st.floats(-4, 4))
    feats = torch.randn(draw(st.integers(1, 3)), 6) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    return model, vocab, feats


def check_caption(tokens: list[int], vocab: Vocabulary, max_len: int, suppress_unk: bool) -> None:
    assert 1 <= len(tokens) <= max_len
    assert not {vocab.pad_id, vocab.start_id, vocab.end_id} & set(tokens)
    if suppress_unk and len(vocab) > len(SPECIALS):
        assert vocab.unk_id not in tokens
    text = vocab.decode(tokens + [vocab.end_id, 5, 6])  # whatever follows <end> is not shown
    assert text.split() == [vocab.itos[t] for t in tokens]


@FAST
@given(small_models(), st.integers(1, 12), st.booleans())
def test_greedy_captions_end_within_max_len(m, max_len, suppress_unk):
    model, vocab, feats = m
    for h in greedy(model, feats, vocab, max_len, suppress_unk):
        check_caption(h.tokens, vocab, max_len, suppress_unk)
        assert np.isfinite(h.logprob) and h.logprob <= 0


@FAST
@given(small_models(), st.integers(1, 10), st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.0, 0.7]),
       st.booleans())
def test_beam_search_captions_end_within_max_len(m, max_len, beam, n_best, alpha, suppress_unk):
    model, vocab, feats = m
    n_best = min(n_best, beam)
    results = beam_search(model, feats, vocab, beam, max_len, alpha, n_best, suppress_unk)
    assert len(results) == len(feats)
    for hyps in results:
        assert 1 <= len(hyps) <= n_best
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            check_caption(h.tokens, vocab, max_len, suppress_unk)
            assert np.isfinite(h.logprob) and h.logprob <= 0
    ref = beam_search_reference(model, feats, vocab, beam, max_len, alpha, 1, suppress_unk)
    assert [r[0].tokens for r in results] == [r[0].tokens for r in ref]
    if beam == 1:
        assert [r[0].tokens for r in results] == [h.tokens for h in greedy(model, feats, vocab, max_len, suppress_unk)]


@FAST
@given(small_models(), st.integers(1, 10), st.integers(1, 4), st.floats(0.1, 2.0), st.integers(0, 99))
def test_sampled_captions_end_within_max_len(m, max_len, n, temperature, seed):
    from captioner.webapp import sample
    model, vocab, feats = m
    cap = types.SimpleNamespace(decoder=model, vocab=vocab)  # all `sample` uses of a Captioner
    for alternatives in sample(cap, feats, n, max_len, temperature, seed):
        assert 1 <= len(alternatives) <= n
        for text, logprob in alternatives:
            words = text.split()
            assert 1 <= len(words) <= max_len and not {"<pad>", "<start>", "<end>"} & set(words)
            assert "<unk>" not in words or len(vocab) == len(SPECIALS)
            assert logprob <= 0


# --- fuzzing the file boundaries --------------------------------------------------------------------------

def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = []
    for fmt, img, kw in [("JPEG", noise, {"quality": 80}), ("JPEG", noise.convert("CMYK"), {}),
                         ("PNG", noise.convert("RGBA"), {}), ("PNG", noise.convert("P"), {"transparency": 0}),
                         ("PNG", Image.fromarray((rng.integers(0, 65535, (24, 32))).astype(np.uint16)), {}),
                         ("GIF", noise.convert("P"), {"save_all": True, "append_images": [noise.convert("P")]}),
                         ("WEBP", noise, {}), ("BMP", noise.convert("L"), {}), ("TIFF", noise, {})]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated(draw, seeds: list[bytes]):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "byte", "delete", "insert", "truncate", "zero-run", "ff-run"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "truncate":
            del data[pos:]
        else:
            n = draw(st.integers(1, 16))
            data[pos:pos + n] = (b"\x00" if op == "zero-run" else b"\xff") * n
    return bytes(data)


@settings(FAST, max_examples=200)
@given(st.one_of(mutated(SEEDS), st.binary(max_size=300)), st.sampled_from([None, 16]))
def test_fuzzed_images_load_as_rgb_or_raise_image_error(data, draft_size):
    try:
        img = load_image(data, draft_size=draft_size)
    except ImageError as e:
        assert str(e).strip() and "\n" not in str(e)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert np.asarray(img).dtype == np.uint8


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_tensors(path, {"decoder.w": torch.randn(4, 3), "decoder.ids": torch.arange(5)},
                 {"vocab": list(SPECIALS) + ["dog"], "decoder": {"vocab_size": 5}})
    return path.read_bytes()


@settings(FAST, max_examples=150)
@given(data=st.data())
def test_fuzzed_checkpoints_load_or_raise_captioner_error(checkpoint_bytes, tmp_path_factory, data):
    blob = data.draw(st.one_of(mutated([checkpoint_bytes]), st.binary(max_size=64)))
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        tensors, meta = load_tensors(path)
    except CaptionerError as e:
        assert str(e).strip() and "\n" not in str(e)
        return
    assert isinstance(meta, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())
