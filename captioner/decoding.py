"""Greedy and beam-search decoding over a trained decoder's step function.

Both never return an empty caption (<end> is barred at the first step) and always stop at `max_len`.
`beam_search` advances every image and every beam of a batch together as one [B*K] batch;
`beam_search_reference` is the plain one-image-at-a-time version, kept as the tests' yardstick.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from .model import Decoder, Ensemble, ShowAndTell, lstm_update
from .vocab import Vocabulary


@dataclass
class Hypothesis:
    tokens: list[int]
    logprob: float  # sum of token log-probabilities, <end> included when it was produced
    score: float  # logprob, length-normalised when asked
    # with `attention=True`: [words, decoders, R + 1], each decoder's model.attention_record at each word
    attention: torch.Tensor | None = None


# The int8 step's marker dtype: weights as 8-bit integers with a scale per row, multiplied by fbgemm's
# dynamically quantized kernels (each product's input rounded to 7 bits with one scale per call).
INT8 = torch.qint8


def int8_is_available(device: str | torch.device = "cpu") -> bool:
    """True where torch still has the x86 int8 matrix kernels the int8 step uses (CPU only; torch.ao's
    quantized ops are deprecated upstream, so a later torch may drop them)."""
    return torch.device(device).type == "cpu" and _int8_kernels_work()


@functools.cache
def _int8_kernels_work() -> bool:
    """One tiny product through the kernels, once per process."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        _int8_mm(torch.ones(1, 1), _int8_pack(torch.ones(1, 1)))
    except (AttributeError, RuntimeError):
        return False
    return True


def precision_dtype(precision: str) -> torch.dtype:
    """The `set_precision` dtype for a resolved precision name ("float32", "bfloat16", "int8")."""
    return INT8 if precision == "int8" else getattr(torch, precision)


def _int8_pack(w: torch.Tensor, bias: torch.Tensor | None = None):
    """w [N, K] as int8 rows scaled by their largest magnitude / 127 (the int8 storage's own rule, so
    weights already stored that way come back as the same integers), packed for the kernel."""
    scale = (w.abs().amax(1).double() / 127).clamp_min(1e-12)
    with warnings.catch_warnings():  # quantize_per_channel warns that torch.ao is deprecated, at every call
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())


def _int8_mm(x: torch.Tensor, packed) -> torch.Tensor:
    # reduce_range: 7-bit activations, which the AVX2 kernels need to keep their int16 sums from overflowing
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def set_precision(model: Decoder, dtype: torch.dtype) -> None:
    """Weights' precision for the eval-mode decoding step: float32; bfloat16 (half the bytes read
    per step, which is what one image's decoding waits on; state and sums stay float32); or INT8 (a
    quarter of the bytes and integer arithmetic; the default on x86 CPUs: eval/RESULTS.md, "Int8 decoding")."""
    for m in model.members if isinstance(model, Ensemble) else [model]:
        m.__dict__["_decode_dtype"] = dtype


def _decode_dtype(model: ShowAndTell) -> torch.dtype:
    """The precision set by `set_precision`; only float32 weights are ever lowered."""
    dtype = model.word_embed.weight.dtype
    return model.__dict__.get("_decode_dtype", dtype) if dtype == torch.float32 else dtype


def _step_weights(model: ShowAndTell) -> tuple[torch.Tensor, ...]:
    """(input table, hidden-to-gates weight, output weight, output bias or None when int8's packed output
    weight holds it) in the model's decoding precision.

    The input table is every word's embedding already multiplied by the first layer's input weights
    (biases folded in): a step then multiplies only the hidden state, so the first layer's matrix work
    halves, and no nn.LSTM call is made (about 1 ms on CPU whatever the batch). Built once per set of
    weights (V x 4H: 21 MB for a 512-unit decoder in float32) and rebuilt when they change.
    """
    lstm, emb = model.lstm, model.word_embed.weight
    dtype = _decode_dtype(model)
    params = tuple(model.parameters())
    key = (dtype, tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
    cached = model.__dict__.get("_step_weights")
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            table = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, emb, lstm.weight_ih_l0.t())
            w_out, b_out = model.output_layer()
            if dtype == INT8:  # the output bias rides in the packed output weight
                cached = (key, (table, _int8_pack(lstm.weight_hh_l0), _int8_pack(w_out, b_out), None))
            else:
                cached = (key, (*(w.to(dtype) for w in (table, lstm.weight_hh_l0, w_out)), b_out))
        model.__dict__["_step_weights"] = cached
    return cached[1]


# From about this much work (rows x hidden units) on, nn.LSTM's oneDNN kernel beats the table path on CPU in
# float32, so large float32 batches go through it (eval/RESULTS.md, "Speed").
LARGE_WORK = 300 * 512


def _step(model: Decoder, tokens: torch.Tensor, state, record: list | None = None):
    """`model.step` for an eval-mode model, the first layer through `_step_weights`, members of an
    ensemble one by one. Same function as nn.LSTM; in float32 results differ by rounding (~1e-6) only.
    `record` gets the attention of the step that ran (model.ShowAndTell.attend), one entry per decoder."""
    if isinstance(model, Ensemble):
        return model.step(tokens, state, member_step=_step, record=record)
    lstm = model.lstm
    if lstm.training or not lstm.bias or lstm.proj_size:
        return model.step(tokens, state, record)
    h, c = state[:2]
    dtype = _decode_dtype(model)
    full = dtype == h.dtype
    if full and tokens.shape[0] * lstm.hidden_size >= LARGE_WORK and tokens.device.type == "cpu":
        return model.step(tokens, state, record)
    table, w_hh, w_out, b_out = _step_weights(model)
    if dtype == INT8:
        return _int8_step(model, tokens, state, table, w_hh, w_out, record)
    if full:
        gates = torch.addmm(table[tokens], h[0], w_hh.t())
    else:
        gates = table[tokens].to(h.dtype) + torch.mm(h[0].to(w_hh.dtype), w_hh.t()).to(h.dtype)
    hs, cs = model.upper_layers(*lstm_update(gates, c[0]), (h, c))
    x = hs[-1]
    if model.cfg.regions:
        x = model.attend(x, state[2], record)
    if full:
        logits = torch.addmm(b_out, x, w_out.t())
    else:
        logits = torch.mm(x.to(w_out.dtype), w_out.t()).to(x.dtype) + b_out
    return torch.log_softmax(logits, dim=-1), (hs, cs, *state[2:])


def _int8_step(model: ShowAndTell, tokens: torch.Tensor, state, table: torch.Tensor, w_hh, w_out,
               record: list | None = None):
    """`_step` with the first layer's hidden-to-gates and output products in int8; upper layers, attention
    and the state stay float32."""
    h, c = state[:2]
    gates = table[tokens] + _int8_mm(h[0], w_hh)
    hs, cs = model.upper_layers(*lstm_update(gates, c[0]), (h, c))
    x = hs[-1]
    if model.cfg.regions:
        x = model.attend(x, state[2], record)
    return torch.log_softmax(_int8_mm(x, w_out), dim=-1), (hs, cs, *state[2:])


def _mask(logp: torch.Tensor, t: int, vocab: Vocabulary, suppress_unk: bool) -> torch.Tensor:
    logp[:, vocab.pad_id] = -float("inf")
    logp[:, vocab.start_id] = -float("inf")
    if suppress_unk and logp.shape[-1] > len(vocab.SPECIALS):  # unless <unk> is the only word there is
        logp[:, vocab.unk_id] = -float("inf")
    if t == 0:
        logp[:, vocab.end_id] = -float("inf")
    return logp


def _block_trigrams(logp: torch.Tensor, prefix: torch.Tensor, pad_id: int) -> None:
    """No word that would repeat a trigram already in its caption ("a cowboy hat and a cowboy hat").

    prefix [N, t]: each row's words so far. Where nothing is seen the -inf goes to <pad>, which `_mask`
    has barred already."""
    if prefix.shape[1] < 3:
        return
    seen = (prefix[:, :-2] == prefix[:, -2:-1]) & (prefix[:, 1:-1] == prefix[:, -1:])
    logp.scatter_(1, torch.where(seen, prefix[:, 2:], pad_id), -float("inf"))


def _repeat_tables(vocab: Vocabulary, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(content_words, repeat_groups) of `vocab` as tensors on `device`, built once per vocabulary."""
    cached = vocab.__dict__.get("_repeats")
    if cached is None or cached[0].device != device:
        cached = (torch.tensor(vocab.content_words(), device=device), torch.tensor(vocab.repeat_groups(), device=device))
        vocab.__dict__["_repeats"] = cached
    return cached


def _block_repeats(logp: torch.Tensor, prefix: torch.Tensor, vocab: Vocabulary) -> None:
    """No content word that its caption has said already, in the singular or the plural. prefix [N, t]: each
    row's words so far."""
    if prefix.shape[1] == 0:
        return
    content, groups = _repeat_tables(vocab, logp.device)
    said = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter_(1, groups[prefix], True)
    logp.masked_fill_(said.index_select(1, groups) & content, -float("inf"))


def _attention_shape(model: Decoder) -> tuple[int, int]:
    """(decoders, R + 1): the width of one word's attention record (`Hypothesis.attention`)."""
    if not model.cfg.regions:
        raise ValueError("attention needs a decoder that attends over image regions (encoder pool 'regions')")
    return len(model.members) if isinstance(model, Ensemble) else 1, model.cfg.regions + 1


@torch.inference_mode()
def greedy(model: Decoder, features: torch.Tensor, vocab: Vocabulary, max_len: int = 20,
           suppress_unk: bool = False, block_repeats: bool = False, attention: bool = False) -> list[Hypothesis]:
    """Most likely word at each step, for a batch of image features [B, D]; `block_repeats` and `attention`
    as beam_search."""
    B = features.shape[0]
    att = torch.zeros(B, max_len, *_attention_shape(model)) if attention else None
    state = model.init_state(features)
    tokens = torch.full((B,), vocab.start_id, dtype=torch.long, device=features.device)
    out = torch.zeros(B, max_len, dtype=torch.long)
    logprob = torch.zeros(B, dtype=torch.float64)
    lengths = torch.full((B,), max_len, dtype=torch.long)
    live = torch.arange(B)  # captions still running: only their rows are computed (as in beam_search)
    for t in range(max_len):
        record = [] if attention else None
        logp, state = _step(model, tokens, state, record)
        if record is not None:
            att[live, t] = torch.stack(record, 1).cpu()
        logp = _mask(logp.double(), t, vocab, suppress_unk)
        if block_repeats:
            _block_repeats(logp, out[live, :t].to(logp.device), vocab)
        best, tokens = logp.max(-1)
        logprob[live] += best.cpu()
        out[live, t] = tokens.cpu()
        ended = tokens.cpu() == vocab.end_id
        lengths[live[ended]] = t  # words before <end>
        if bool(ended.all()):
            break
        keep = (~ended).to(tokens.device)
        live, tokens = live[~ended], tokens[keep]
        state = tuple(s[:, keep] for s in state)
    hyps = []
    for b in range(B):
        toks = out[b, : lengths[b]].tolist()
        hyps.append(Hypothesis(toks, float(logprob[b]), float(logprob[b]),
                               att[b, : lengths[b]] if att is not None else None))
    return hyps


def _normalise(logprob: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    return logprob / lengths.clamp(min=1).double() ** alpha if alpha else logprob


@torch.inference_mode()
def beam_search(model: Decoder, features: torch.Tensor, vocab: Vocabulary, beam_size: int = 3,
                max_len: int = 20, length_penalty: float = 0.0, n_best: int = 1,
                suppress_unk: bool = False, block_trigrams: bool = False,
                block_repeats: bool = False, attention: bool = False) -> list[list[Hypothesis]]:
    """Batched beam search: all B images x K beams advance as one batch of B*K sequences.

    `length_penalty` alpha ranks finished captions by logprob / length**alpha (0 = raw logprob, as the
    paper). `block_trigrams`: no caption repeats a word trigram (beams that would are cut off at once, which
    frees their places for others); `block_repeats`: no caption says a content word twice ("a man riding a
    bicycle on a bicycle"; vocab.FUNCTION_WORDS may repeat). `attention` (a decoder with regions): each
    hypothesis also carries the attention its own beam's steps ran with, word by word (`Hypothesis.attention`).
    Returns, per image, the `n_best` hypotheses, best first.
    """
    B, K, V = features.shape[0], beam_size, len(vocab)
    dev = features.device
    # each beam's attention so far, reordered with its words by the back-pointers
    att = torch.zeros(B, K, max_len, *_attention_shape(model), device=dev) if attention else None
    state = model.init_state(features)  # (h, c) get K rows per image; a region memory stays one per image
    state = (*(s.repeat_interleave(K, dim=1) for s in state[:2]), *state[2:])
    scores = torch.full((B, K), -float("inf"), dtype=torch.float64, device=dev)
    scores[:, 0] = 0.0  # only one live beam at the start
    tokens = torch.full((B * K,), vocab.start_id, dtype=torch.long, device=dev)
    seqs = torch.zeros(B, K, max_len, dtype=torch.long, device=dev)  # <pad> after each caption's end
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, K, dtype=torch.long, device=dev)
    # The best K of K*V candidates are among each beam's own best K words, so only those K*K are scored
    # in float64. A finished beam only extends with <pad> at no cost, so it keeps its score and place.
    W = min(K, V)
    frozen = torch.full((W,), -float("inf"), dtype=torch.float64, device=dev)
    frozen[0] = 0.0
    live = torch.arange(B, device=dev)  # images with an unfinished beam: only their rows are computed
    for t in range(max_len):
        L = live.shape[0]
        record = [] if attention else None
        logp, state = _step(model, tokens, state, record)
        logp = _mask(logp, t, vocab, suppress_unk)
        if block_trigrams:
            _block_trigrams(logp, seqs[live, :, :t].reshape(L * K, t), vocab.pad_id)
        if block_repeats:
            _block_repeats(logp, seqs[live, :, :t].reshape(L * K, t), vocab)
        best, words = logp.topk(W, dim=-1)
        done_l = finished[live]
        best = torch.where(done_l.unsqueeze(-1), frozen, best.double().view(L, K, W))
        words = torch.where(done_l.unsqueeze(-1), vocab.pad_id, words.view(L, K, W))
        cand = (scores[live].unsqueeze(-1) + best).view(L, K * W)
        top, idx = cand.topk(K, dim=-1)
        beam, word = idx // W, words.view(L, K * W).gather(1, idx)
        prev = seqs[live].gather(1, beam.unsqueeze(-1).expand(-1, -1, max_len))
        prev[:, :, t] = word
        seqs[live] = prev
        if record is not None:  # each new beam: its parent's history, then the step its parent's row ran
            ran = torch.stack(record, 1).view(L, K, *att.shape[3:])
            history = att[live].gather(1, beam[:, :, None, None, None].expand(-1, -1, *att.shape[2:]))
            history[:, :, t] = ran.gather(1, beam[:, :, None, None].expand(-1, -1, *ran.shape[2:]))
            att[live] = history
        was_finished = done_l.gather(1, beam)
        lengths[live] = lengths[live].gather(1, beam) + (~was_finished & (word != vocab.end_id)).long()
        finished[live] = was_finished | (word == vocab.end_id)
        scores[live] = top
        flat = (beam + torch.arange(L, device=dev).unsqueeze(1) * K).view(-1)
        still = ~finished[live].all(1)
        if not bool(still.any()):
            break
        rows = flat.view(L, K)[still].view(-1)  # drop the rows of images whose beams have all ended
        memory = state[2:] if len(rows) == L * K else tuple(m[:, still] for m in state[2:])  # images that go on
        state = (state[0][:, rows], state[1][:, rows], *memory)
        tokens = word[still].view(-1)
        live = live[still]
    ranked = _normalise(scores, lengths, length_penalty)
    ranked = torch.where(torch.isfinite(scores), ranked, torch.full_like(ranked, -float("inf")))
    order = ranked.argsort(dim=1, descending=True)
    results = []
    seqs, scores, ranked, lengths = seqs.cpu(), scores.cpu(), ranked.cpu(), lengths.cpu()
    att = att.cpu() if att is not None else None
    for b in range(B):
        hyps = []
        for k in order[b, :n_best].tolist():
            if not torch.isfinite(scores[b, k]):
                continue
            hyps.append(Hypothesis(seqs[b, k, : lengths[b, k]].tolist(), float(scores[b, k]), float(ranked[b, k]),
                                   att[b, k, : lengths[b, k]] if att is not None else None))
        results.append(hyps)
    return results


@torch.inference_mode()
def beam_search_reference(model: Decoder, features: torch.Tensor, vocab: Vocabulary, beam_size: int = 3,
                          max_len: int = 20, length_penalty: float = 0.0, n_best: int = 1,
                          suppress_unk: bool = False, block_trigrams: bool = False,
                          block_repeats: bool = False, attention: bool = False) -> list[list[Hypothesis]]:
    """Textbook beam search, one image and one beam at a time (slow; the tests' reference); with
    `attention`, each beam carries its own steps' attention as it goes."""
    if attention:
        _attention_shape(model)
    content, groups = _repeat_tables(vocab, features.device)
    results = []
    for b in range(features.shape[0]):
        beams = [([], 0.0, model.init_state(features[b:b + 1]), False, [])]
        for t in range(max_len):
            cands = []
            for toks, score, state, done, att in beams:
                if done:
                    cands.append((score, toks, state, True, att))
                    continue
                last = toks[-1] if toks else vocab.start_id
                record = [] if attention else None
                logp, new_state = _step(model, torch.tensor([last], device=features.device), state, record)
                ran = att + [torch.stack(record, 1)[0].cpu()] if attention else att
                logp = _mask(logp.double(), t, vocab, suppress_unk)[0]
                if block_trigrams:
                    for i in range(len(toks) - 2):
                        if toks[i:i + 2] == toks[-2:]:
                            logp[toks[i + 2]] = -float("inf")
                if block_repeats:
                    for w in toks:
                        if content[w]:
                            logp[groups == groups[w]] = -float("inf")
                top, ids = logp.topk(beam_size)
                for lp, w in zip(top.tolist(), ids.tolist()):
                    if lp == -float("inf"):
                        continue
                    cands.append((score + lp, toks + [w], new_state, w == vocab.end_id, ran))
            cands.sort(key=lambda c: -c[0])
            beams = [(toks, score, state, done, att) for score, toks, state, done, att in cands[:beam_size]]
            if all(b[3] for b in beams):
                break
        hyps = []
        for toks, score, _, done, att in beams:
            words = toks[:-1] if done else toks
            n = torch.tensor([len(words)])
            ranked = float(_normalise(torch.tensor([score], dtype=torch.float64), n, length_penalty))
            hyps.append(Hypothesis(words, score, ranked, torch.stack(att)[:len(words)] if attention else None))
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:n_best])
    return results
