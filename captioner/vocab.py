"""Tokenizer and vocabulary, shared by training, decoding and evaluation so scores compare like with like."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from .errors import CaptionerError

# Words (unicode letters/digits, hyphenated compounds kept whole) and PTB-style clitics ('s, n't) as
# their own tokens, which is what the COCO toolkit's PTB tokenizer produces; punctuation and emoji go.
_TOKEN = re.compile(r"n't|'[^\W_]+|[^\W_]+(?:-[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase, split clitics, drop punctuation. No NLTK data needed (punkt is not available offline)."""
    text = text.lower().replace("\u2019", "'").replace("n't", " n't")
    return _TOKEN.findall(text)


# Words whose repetition within a caption is ordinary ("a man and a woman on a bench", "a black and white
# dog"): articles, prepositions, conjunctions, pronouns, auxiliaries, colours and numbers. Any other word
# said twice ("a man riding a bicycle on a bicycle"), or once in the plural and once in the singular, is a
# repeated content word (`repeated_word`).
FUNCTION_WORDS = frozenset("""
a an the this that these those some another other each one two three four five six several many few
of in on at to into onto from with without by for over under above below near next beside behind between
through across along around down up out off while as about against toward towards inside outside
and or but nor so then than
he she it they them his her its their him i you we me my your our who whom which what where there here
is are was were be been being has have had do does did can could will would may might
's n't not very
black white red blue green yellow orange brown pink purple gray grey silver gold tan dark light colored
""".split())


# Plurals that no ending rule undoes.
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "feet": "foot",
                     "teeth": "tooth", "mice": "mouse", "geese": "goose"}


def singular(word: str) -> str:
    """A plural noun's singular ("sinks" -> "sink", "benches" -> "bench", "men" -> "man"); any other word as
    it is. Repetition is judged on these, so "two sinks and a sink" says a word twice."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def repeated_word(words: Sequence[str]) -> str | None:
    """The first content word (not in FUNCTION_WORDS) that occurs twice in a tokenized caption, a plural and
    its singular counting as one word, or None."""
    seen = set()
    for w in words:
        if w in FUNCTION_WORDS:
            continue
        key = singular(w)
        if key in seen:
            return w
        seen.add(key)
    return None


def degenerate(words: Sequence[str]) -> bool:
    """A repetition no person writes: a word twice in a row ("eating eating"), or "X on a X" (a content word
    again after a preposition and an article, "a wave on a wave")."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    return any(singular(x) == singular(y) and x not in FUNCTION_WORDS and p not in ("and", "or") for x, p, _, y in
               zip(words, words[1:], words[2:], words[3:]) if _ in ("a", "an", "the"))


PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocabulary:
    """Word <-> id map; ids 0..3 are pad, start, end, unk."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:4]) != SPECIALS or len(set(words)) != len(words):
            raise CaptionerError("malformed vocabulary: must start with <pad> <start> <end> <unk> and have no repeats")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3
    SPECIALS = SPECIALS

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """A vocab.json (a JSON list of words) as written by training; a clear error for anything else."""
        try:
            words = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionerError(f"vocabulary file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CaptionerError(f"cannot read vocabulary {path}: {getattr(e, 'strerror', None) or e}") from None
        except json.JSONDecodeError as e:
            raise CaptionerError(f"{path} is malformed JSON ({e.msg})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CaptionerError(f"{path} must hold a JSON list of words")
        try:
            return cls(words)
        except CaptionerError as e:
            raise CaptionerError(f"{path}: {e}") from None

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical, so it is deterministic)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Token ids of a caption, wrapped in <start> ... <end>."""
        return [self.start_id, *(self.stoi.get(w, self.unk_id) for w in tokenize(text)), self.end_id]

    def content_words(self) -> list[bool]:
        """Per id, whether `block_repeats` forbids saying it twice: <unk> and every word outside FUNCTION_WORDS
        ("a <unk> looking at a <unk>" repeats itself as much as "a wave on a wave")."""
        return [i == self.unk_id or (i >= len(SPECIALS) and w not in FUNCTION_WORDS) for i, w in enumerate(self.itos)]

    def repeat_groups(self) -> list[int]:
        """Per id, the number of its word's group: a plural and its singular share one (`singular`), so
        `block_repeats` bars "sink" after "sinks"."""
        group: dict[str, int] = {}
        return [group.setdefault(singular(w) if i >= len(SPECIALS) else w, len(group)) for i, w in enumerate(self.itos)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>; pad and start are never shown."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def to_list(self) -> list[str]:
        return list(self.itos)
