from captioner.vocab import Vocabulary, tokenize


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
