"""Consensus reranking: its BLEU+1 and F-mean against NLTK's, its choice on constructed lists, and Captioner.decode."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.consensus import _bleu1, _fmean, _ngrams, agreement, rerank
from captioner.config import Decoding

RERANK_FMEAN = Decoding().rerank_fmean
from captioner.errors import CaptionerError


def test_bleu_plus_one_equals_nltk_method2():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    rng, smooth = random.Random(0), SmoothingFunction().method2
    for _ in range(2000):  # a 6-word alphabet: plenty of matches, misses and captions shorter than 4
        h = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        r = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        want = sentence_bleu([r], h, smoothing_function=smooth)
        assert _bleu1(_ngrams(h), len(h), _ngrams(r), len(r)) == pytest.approx(want, abs=1e-12)


def test_fmean_equals_nltk_meteor_without_stems_synonyms_or_fragmentation():
    from nltk.translate.meteor_score import single_meteor_score

    class Same:  # exact matches only: no stemming, no synonyms
        def stem(self, w):
            return w

        def synsets(self, w):
            return []
    rng = random.Random(1)
    for _ in range(2000):
        h = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        r = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        want = single_meteor_score([f"w{t}" for t in r], [f"w{t}" for t in h], stemmer=Same(), wordnet=Same(),
                                   alpha=0.9, gamma=0.0)
        got = _fmean(_ngrams(h)[0], len(h), _ngrams(r)[0], len(r))
        assert got == pytest.approx(want, abs=1e-12)


def test_fmean_share_favours_the_caption_that_covers_the_shared_words():
    # half the voters repeat the short caption's phrase, half mention two more words the longer one has
    short, longer = [1, 2, 3], [1, 2, 9, 5, 4]
    caps = [short, longer, [1, 2, 3], [1, 2, 3, 8], [5, 4, 1, 2, 6], [4, 5, 1, 2, 7]]
    assert rerank(caps, 2, 6)[0] == 0  # BLEU+1: the repeated phrase wins
    assert rerank(caps, 2, 6, fmean=1.0)[0] == 1  # F-mean (recall 9:1): the words covered win
    bleu, f = agreement(caps, 2, 6), agreement(caps, 2, 6, fmean=1.0)
    assert agreement(caps, 2, 6, fmean=0.25) == pytest.approx([0.75 * b + 0.25 * x for b, x in zip(bleu, f)])
    with pytest.raises(ValueError):
        agreement(caps, 2, 6, fmean=1.5)


def test_rerank_picks_the_caption_the_others_support():
    odd, a, b, c = [9, 9, 9], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]
    # the beam's best is an outlier; among the first three, [1, 2, 3, 4] agrees most with all four
    assert rerank([odd, a, b, c], candidates=3, evidence=4) == [1, 2, 0, 3]
    assert agreement([odd, a, b, c], 3, 4)[0] == 0.0
    # only the first `evidence` captions vote: with two, the outlier and `a` just compare with each other
    s = agreement([odd, a, b, c], 2, 2)
    assert s[0] == s[1] == 0.0 and rerank([odd, a, b, c], 2, 2) == [0, 1, 2, 3]  # a tie keeps the beam's order


@pytest.mark.parametrize("candidates,evidence", [(0, 5), (1, 5), (3, 1), (3, 0)])
def test_rerank_off_keeps_the_beam_order(candidates, evidence):
    caps = [[1], [2, 3], [2, 3, 4], [5]]
    assert rerank(caps, candidates, evidence) == [0, 1, 2, 3]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=8), max_size=12), st.integers(0, 12), st.integers(0, 12))
def test_rerank_is_a_permutation_that_moves_only_the_candidates(caps, candidates, evidence):
    order = rerank(caps, candidates, evidence)
    assert sorted(order) == list(range(len(caps)))
    head = min(candidates, len(caps)) if candidates >= 2 and evidence >= 2 and len(caps) >= 2 else 0
    assert sorted(order[:head]) == list(range(head)) and order[head:] == list(range(head, len(caps)))
    scores = agreement(caps, candidates, evidence) if head else []
    assert all(0.0 <= x <= 1.0 for x in scores)
    assert [scores[i] for i in order[:head]] == sorted(scores, reverse=True)


def test_decode_reranks_within_the_beam(photos):
    from captioner.inference import Captioner
    cap = Captioner.load(precision="float32")
    feats = cap.encode(sorted(photos.glob("*.jpg"))[:8])
    plain = cap.decode(feats, beam_size=10, n_best=10, rerank=0)
    for r in (3, 10):
        got = cap.decode(feats, beam_size=10, n_best=10, rerank=r)
        for p, g in zip(plain, got):
            texts = [t for t, _ in p.alternatives]
            assert sorted(g.alternatives) == sorted(p.alternatives)  # the same ten, reordered
            assert g.text in texts[:r] and [t for t, _ in g.alternatives][r:] == texts[r:]
            want = agreement([cap.vocab.encode(t)[1:-1] for t in texts], r, 10, RERANK_FMEAN)
            assert want[texts.index(g.text)] == max(want)
    for share in (0.0, 1.0):  # the shipped share and the other end: each picks its own agreement's best
        got = cap.decode(feats, beam_size=10, n_best=10, rerank=3, rerank_fmean=share)
        for p, g in zip(plain, got):
            texts = [t for t, _ in p.alternatives]
            want = agreement([cap.vocab.encode(t)[1:-1] for t in texts], 3, 10, share)
            assert want[texts.index(g.text)] == max(want)
    # one caption asked for: still the reranked one, and every beam still votes
    one = cap.decode(feats, beam_size=10, rerank=3)
    assert [c.text for c in one] == [c.text for c in cap.decode(feats, beam_size=10, n_best=10, rerank=3)]
    assert [c.text for c in cap.decode(feats, beam_size=1, rerank=3)] == \
        [c.text for c in cap.decode(feats, beam_size=1, rerank=0)]  # greedy has nothing to rerank
    assert any(a.text != b.alternatives[0][0] for a, b in zip(one, plain)), "reranking changed no caption"
    with pytest.raises(CaptionerError, match="F-mean's share"):
        cap.decode(feats, beam_size=10, rerank=3, rerank_fmean=1.5)
