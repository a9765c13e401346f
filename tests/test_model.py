import torch

from captioner.decoding import beam_search, greedy
from captioner.model import DecoderConfig, ShowAndTell
from captioner.train import _pad
from captioner.vocab import Vocabulary

CAPTIONS = ["a black dog runs on the grass", "two children play in the snow",
            "a man rides a red bike", "a woman sits on a bench"]


def _overfit(steps: int = 300):
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    feats = torch.randn(len(CAPTIONS), 32)
    model = ShowAndTell(DecoderConfig(len(vocab), feature_dim=32, embed_dim=64, hidden_dim=64, dropout=0.0))
    caps, lens = _pad([vocab.encode(c) for c in CAPTIONS])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(feats, caps, lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), vocab, feats, losses


def test_tiny_model_overfits_and_greedy_reproduces_captions():
    model, vocab, feats, losses = _overfit()
    assert losses[-1] < 0.05 * losses[0]
    decoded = [vocab.decode(h.tokens) for h in greedy(model, feats, vocab, max_len=12)]
    assert decoded == CAPTIONS
    assert [vocab.decode(hs[0].tokens) for hs in beam_search(model, feats, vocab, beam_size=3)] == CAPTIONS


def test_loss_ignores_padding():
    model, vocab, feats, _ = _overfit(steps=1)
    model.train(False)
    caps, lens = _pad([vocab.encode(c) for c in CAPTIONS])
    wide = torch.cat([caps, torch.full((len(CAPTIONS), 5), 7)], dim=1)  # junk after the real lengths
    assert torch.allclose(model.loss(feats, caps, lens), model.loss(feats, wide, lens))
    logits, targets = model(feats, caps, lens)
    assert targets.numel() == int((lens - 1).sum()) and (targets != vocab.pad_id).all()
