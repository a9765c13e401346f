import pytest
import torch

from captioner.decoding import beam_search, greedy, int8_is_available
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


def test_decoding_step_equals_model_step_and_follows_weight_changes():
    """decoding._step (first layer through the precomputed word-input table) computes model.step, and
    the table is rebuilt when the weights change (as they do between the dev evaluations of training)."""
    from captioner.decoding import _step
    from captioner.model import DecoderConfig, ShowAndTell
    torch.manual_seed(0)
    for layers in (1, 2):
        m = ShowAndTell(DecoderConfig(40, 12, 8, 16, num_layers=layers)).eval()
        for B in (1, 3, 65, 400):
            tokens = torch.randint(0, 40, (B,))
            state = (torch.randn(layers, B, 16), torch.randn(layers, B, 16))
            for change in (None, "input", "output"):  # optimizer steps, in place
                with torch.no_grad():
                    if change == "input":
                        m.word_embed.weight.mul_(1.5)
                        m.lstm.bias_hh_l0.add_(0.1)
                    elif change == "output":
                        m.out.weight.mul_(0.5)
                with torch.inference_mode():
                    a, (ha, ca) = m.step(tokens, state)
                    b, (hb, cb) = _step(m, tokens, state)
                for x, y in ((a, b), (ha, hb), (ca, cb)):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_lowered_step_weights_follow_every_parameter():
    """In bfloat16 and int8 the cached step weights are copies, so a change to a parameter must reach the
    step whether the cache copies it or aliases it: the output bias alone here (today aliased, even inside
    int8's packed weight, so this guards against a future copy that the cache key would then have to follow)."""
    from captioner.decoding import INT8, _step, set_precision
    torch.manual_seed(0)
    tokens, state = torch.randint(4, 40, (5,)), (torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    for dtype in (torch.bfloat16, *([INT8] if int8_is_available() else [])):
        m = ShowAndTell(DecoderConfig(40, 12, 8, 16)).eval()
        set_precision(m, dtype)
        with torch.inference_mode():
            before = _step(m, tokens, state)[0]  # fills the cache
        with torch.no_grad():
            m.out.bias.add_(torch.randn(40))
        fresh = ShowAndTell(m.cfg).eval()
        fresh.load_state_dict(m.state_dict())
        set_precision(fresh, dtype)
        with torch.inference_mode():
            after, want = _step(m, tokens, state)[0], _step(fresh, tokens, state)[0]
        assert not torch.equal(after, before) and torch.equal(after, want)


def test_bfloat16_step_is_close_to_float32_and_switches_back():
    """bfloat16 decoder weights (the CPU default where the hardware has it) move log-probabilities by
    rounding only; the state stays float32; switching precision rebuilds the cached weights."""
    from captioner.decoding import _step, set_precision
    from captioner.model import DecoderConfig, Ensemble, ShowAndTell
    torch.manual_seed(0)
    ms = [ShowAndTell(DecoderConfig(50, 12, 16, 32)).eval() for _ in range(2)]
    tokens = torch.randint(4, 50, (6,))
    for model in (ms[0], Ensemble(ms)):
        state = model.init_state(torch.randn(6, 12))
        with torch.inference_mode():
            ref, (h32, _) = _step(model, tokens, state)
            set_precision(model, torch.bfloat16)
            low, (h16, c16) = _step(model, tokens, state)
            set_precision(model, torch.float32)
            again, _ = _step(model, tokens, state)
        assert low.dtype == h16.dtype == c16.dtype == torch.float32
        assert not torch.equal(low, ref) and (low - ref).abs().max() < 0.05 and (h16 - h32).abs().max() < 0.02
        assert torch.equal(again, ref)
    m64 = ShowAndTell(DecoderConfig(50, 12, 16, 32)).double().eval()
    set_precision(m64, torch.bfloat16)  # only float32 weights are lowered: float64 stays exact
    st = m64.init_state(torch.randn(6, 12, dtype=torch.float64))
    with torch.inference_mode():
        torch.testing.assert_close(_step(m64, tokens, st)[0], m64.step(tokens, st)[0])


@pytest.mark.skipif(not int8_is_available(), reason="this torch has no x86 int8 matrix kernels (torch.ao, deprecated)")
def test_int8_step_is_close_to_float32_for_every_decoder_kind():
    """int8 decoder weights (the default on x86 CPUs) move log-probabilities by rounding only,
    with attention and a second layer too; the state stays float32; weights stored as
    int8 are packed as the very same integers, so storage and arithmetic round once, not twice."""
    from captioner.checkpoint import pack_weights, unpack_weights
    from captioner.decoding import INT8, _int8_pack, _step, set_precision
    from captioner.model import DecoderConfig, Ensemble, ShowAndTell
    torch.manual_seed(0)
    plain = [ShowAndTell(DecoderConfig(50, 12, 16, 32)).eval() for _ in range(2)]
    kinds = [plain[0], Ensemble(plain), _attending(), _attending(layers=2)]
    for model in kinds:
        B = 6
        feats = torch.randn(B, model.cfg.feature_dim)
        tokens = torch.randint(4, model.cfg.vocab_size, (B,))
        state = model.init_state(feats)
        with torch.inference_mode():
            ref, (h32, *_) = _step(model, tokens, state)
            set_precision(model, INT8)
            low, (h8, c8, *_) = _step(model, tokens, state)
            set_precision(model, torch.float32)
            again, _ = _step(model, tokens, state)
        assert low.dtype == h8.dtype == c8.dtype == torch.float32
        assert not torch.equal(low, ref) and (low - ref).abs().max() < 0.05 and (h8 - h32).abs().max() < 0.02
        assert torch.equal(again, ref)
    w = torch.randn(40, 24)
    stored = pack_weights({"m.weight": w}, "int8")
    packed = _int8_pack(unpack_weights(stored, "f")["m.weight"])
    assert torch.equal(torch.ops.quantized.linear_unpack(packed)[0].int_repr(), stored["m.weight"])


def _attending(layers: int = 1, regions: int = 4, channels: int = 6, seed: int = 0) -> ShowAndTell:
    torch.manual_seed(seed)
    return ShowAndTell(DecoderConfig(30, channels * (regions + 1), 8, 16, num_layers=layers, dropout=0.0,
                                     regions=regions, att_dim=5)).eval()


def test_attention_step_by_step_equals_the_teacher_forced_pass():
    """The decoding step (model.step and the fast decoding._step) reads the regions exactly as the
    training pass does, and the regions matter: other regions, other words' scores."""
    from captioner.decoding import _step
    for layers in (1, 2):
        m = _attending(layers)
        feats = torch.randn(3, 30)
        caps = torch.randint(4, 30, (3, 7))
        caps[:, 0] = Vocabulary.build([], 1).start_id
        lens = torch.tensor([7, 5, 6])
        with torch.inference_mode():
            logits, _ = m(feats, caps, lens)
            for step in (m.step, lambda t, s: _step(m, t, s)):
                state, rows = m.init_state(feats), []
                assert len(state) == 3 and state[2].shape == (4, 3, 32)
                for t in range(6):
                    logp, state = step(caps[:, t], state)
                    rows.append(logp)
                order = lens.argsort(descending=True)  # packed: time-major, longest caption first
                steps, left = torch.stack(rows, 1)[order], lens[order] - 1
                packed = torch.cat([steps[left > t, t] for t in range(6)])
                torch.testing.assert_close(packed, torch.log_softmax(logits, -1), rtol=1e-5, atol=1e-5)
            other = feats.clone()
            other[:, 6:] = torch.randn(3, 24)  # the same global vector, other regions
            assert not torch.allclose(m(other, caps, lens)[0], logits, atol=1e-3)


def test_attention_beam_search_equals_reference_and_ensembles_vote():
    """Attending decoders, fed back or not, and an ensemble of both kinds: the batched beam search (which
    keeps one region memory per image) equals the one-beam-at-a-time reference, and the ensemble's step is
    the average of its members' next-word probabilities."""
    import pytest
    from captioner.decoding import _step, beam_search_reference
    from captioner.model import Ensemble
    vocab = Vocabulary([*Vocabulary.SPECIALS, *(f"w{i}" for i in range(30 - len(Vocabulary.SPECIALS)))])
    feats = torch.randn(4, 30) * 3
    members = [_attending(seed=1), _attending(seed=2)]
    for m in (_attending(), Ensemble(members)):
        for k in (1, 3):
            fast = beam_search(m, feats, vocab, beam_size=k, max_len=8, n_best=k)
            ref = beam_search_reference(m, feats, vocab, beam_size=k, max_len=8, n_best=k)
            assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in ref]
        assert [h.tokens for h in greedy(m, feats, vocab, 8)] == [hs[0].tokens for hs in beam_search(m, feats, vocab, 1, 8)]
    tokens = torch.randint(4, 30, (4,))
    with torch.inference_mode():
        ens = Ensemble(members)
        state = ens.init_state(feats)
        for _ in range(2):  # the second step reads the state the first one stacked
            logp, state = _step(ens, tokens, state)
        probs = []
        for m in members:
            st = m.init_state(feats)
            for _ in range(2):
                lp, st = _step(m, tokens, st)
            probs.append(lp.exp())
    torch.testing.assert_close(logp.exp(), torch.stack(probs).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="regions"):
        Ensemble([_attending(), ShowAndTell(DecoderConfig(30, 30, 8, 16))])


def test_unrolled_lstm_equals_nn_lstm_and_scheduled_sampling_feeds_own_words():
    """The word-by-word unroll is nn.LSTM's function; scheduled sampling changes a training pass only from the
    first word the model itself predicted (outputs for <start> stay), and never an eval-mode pass."""
    from torch.nn.utils.rnn import pack_padded_sequence
    m = _attending().train()
    m.cfg.att_dropout = 0.0  # no dropout anywhere: the passes compare exactly
    feats, caps, lens = torch.randn(3, 30), torch.randint(4, 30, (3, 7)), torch.tensor([7, 5, 6])
    inputs = torch.cat([m.embed_image(feats).unsqueeze(1), m.word_embed(caps[:, :-1])], 1)
    packed = pack_padded_sequence(inputs, lens, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        torch.testing.assert_close(m._unroll(packed, None, 0.0).data, m.lstm(packed)[0].data, rtol=1e-5, atol=1e-6)
        forced = m(feats, caps, lens)[0]
        torch.manual_seed(1)
        sampled = m(feats, caps, lens, sample_prob=0.9)[0]
        torch.testing.assert_close(sampled[:3], forced[:3])  # packed time-major: the first 3 rows follow <start>
        assert not torch.allclose(sampled[3:], forced[3:], atol=1e-4)
        torch.testing.assert_close(m.eval()(feats, caps, lens, sample_prob=0.9)[0], forced)
    with pytest.raises(ValueError, match="one-layer"):
        _attending(layers=2).train()(feats, caps, lens, sample_prob=0.5)


@pytest.mark.parametrize("layers", [1, 2])
def test_image_step_equals_nn_lstm_from_a_zero_state(layers):
    """init_state computes the image step itself (an nn.LSTM call costs ~5 ms on CPU for one row); it must
    be nn.LSTM's function, in eval mode and in training (where two layers keep nn.LSTM for its dropout)."""
    torch.manual_seed(0)
    m = ShowAndTell(DecoderConfig(20, feature_dim=5 * 8, embed_dim=12, hidden_dim=16, num_layers=layers,
                                  dropout=0.0))
    feats = torch.randn(3, 5 * 8)
    for mode in (False, True):
        m.train(mode)
        image = m.embed_image(feats).unsqueeze(1)
        _, (h, c) = m.lstm(image)
        state = m.init_state(feats)
        torch.testing.assert_close(state[0], h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[1], c, rtol=1e-5, atol=1e-6)
        state[0].sum().backward()  # SCST samples from it with gradients
        assert m.lstm.weight_ih_l0.grad is not None
        m.zero_grad()


