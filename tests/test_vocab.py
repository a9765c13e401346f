from captioner.vocab import SPECIALS, Vocabulary, degenerate, repeated_word, singular, tokenize


def test_tokenize_matches_training_and_eval_rules():
    assert tokenize("A Dog's toy, isn't it?!") == ["a", "dog", "'s", "toy", "is", "n't", "it"]
    assert tokenize("Two workers on an I-beam .") == ["two", "workers", "on", "an", "i-beam"]
    assert tokenize("Café 🐶 !!") == ["café"]
    assert tokenize("") == []


def test_vocabulary_round_trip_and_unk():
    caps = ["a dog runs"] * 5 + ["a cat sleeps"] * 2
    v = Vocabulary.build(caps, min_count=5)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert set(v.itos[4:]) == {"a", "dog", "runs"}
    ids = v.encode("A dog runs.")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == "a dog runs"
    assert v.decode(v.encode("a cat runs")) == "a <unk> runs"
    again = Vocabulary(v.to_list())
    assert again.itos == v.itos and again.encode("a dog") == v.encode("a dog")
    assert v.decode([v.start_id, 4, v.pad_id, 5, v.end_id, 6]) == f"{v.itos[4]} {v.itos[5]}"


def test_a_plural_and_its_singular_count_as_one_word():
    assert [singular(w) for w in ("sinks", "benches", "boxes", "glasses", "puppies", "men", "horses")] == \
        ["sink", "bench", "box", "glass", "puppy", "man", "horse"]
    assert [singular(w) for w in ("grass", "bus", "tennis", "dress", "sink", "ties")] == \
        ["grass", "bus", "tennis", "dress", "sink", "tie"]
    assert repeated_word(tokenize("a kitchen with two sinks and a sink")) == "sink"
    assert repeated_word(tokenize("two men and a man on a bench")) == "man"
    assert repeated_word(tokenize("a man and a woman walk two dogs")) is None
    assert degenerate(tokenize("a bird on a birds")) and not degenerate(tokenize("a bird on a branch"))
    vocab = Vocabulary([*SPECIALS, "a", "sinks", "sink", "bench", "benches", "and"])
    groups = vocab.repeat_groups()
    assert groups[vocab.stoi["sinks"]] == groups[vocab.stoi["sink"]] != groups[vocab.stoi["bench"]]
    assert groups[vocab.stoi["bench"]] == groups[vocab.stoi["benches"]]
    assert len(set(groups)) == len(vocab.itos) - 2
