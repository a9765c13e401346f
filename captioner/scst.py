"""Self-critical sequence training (Rennie et al. 2017) as a second stage after cross-entropy training.

The model samples several captions per image; each is rewarded with its CIDEr-D against the image's
references, minus the mean reward of the image's other samples (the baseline), and the policy gradient
raises the log-probability of better-than-average captions. This optimises the test metric directly
instead of next-word likelihood. CIDEr-D is the COCO toolkit's scorer, with document frequencies taken
once from all training references (as the SCST paper does), not from each batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

from .checkpoint import atomic_write_text, check_out_dir, prepare_out_dir
from .config import ScstConfig
from .data import load_sources
from .decoding import beam_search
from .distributed import features_on_device
from .errors import CaptionerError
from .features import model_features
from .inference import load_model, save_model
from .memory import trim_if_due
from .metrics import bleu
from .model import ShowAndTell
from .vocab import Vocabulary, tokenize

# The dev check that decides whether an epoch's weights are kept: beam search with the length penalty that
# was shipped when the recipe's runs were made (0.5), so that a later change to the shipped decoding does
# not change which weights the recipe keeps.
CHECK_LENGTH_PENALTY = 0.5


class _Corpus(list):
    """A list whose len() is the training corpus size, so the scorer's idf uses corpus statistics."""

    corpus_size = 1

    def __len__(self) -> int:
        return self.corpus_size


class CiderD:
    """pycocoevalcap's CIDEr-D with document frequencies fixed from a reference corpus."""

    def __init__(self, references: list[list[str]]):
        try:
            from pycocoevalcap.cider.cider_scorer import CiderScorer
        except ImportError:
            raise CaptionerError('SCST needs pycocoevalcap for CIDEr-D: pip install "captioner[coco]"') from None
        self._cls = CiderScorer
        scorer = CiderScorer(n=4, sigma=6.0)
        for refs in references:
            scorer.cook_append(None, [" ".join(tokenize(r)) for r in refs])
        scorer.compute_doc_freq()
        self.df = scorer.document_frequency
        self.n_docs = len(references)

    def __call__(self, hyps: list[str], refs: list[list[str]]) -> np.ndarray:
        s = self._cls(n=4, sigma=6.0)
        for h, rs in zip(hyps, refs):
            s.cook_append(h, rs)
        s.document_frequency = self.df
        crefs = _Corpus(s.crefs)
        crefs.corpus_size = self.n_docs
        s.crefs = crefs
        return np.array(s.compute_cider())


def sample(model: ShowAndTell, features: torch.Tensor, vocab: Vocabulary, n: int, max_len: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sampled captions per image: ids [B*n, T] as `<start> w.. <end> <pad>..` and lengths incl. start/end.

    `generator` lives on the features' device (torch.multinomial draws there)."""
    feats = features.repeat_interleave(n, dim=0)
    state = model.init_state(feats)
    N, dev = feats.shape[0], feats.device
    tokens = torch.full((N,), vocab.start_id, dtype=torch.long, device=dev)
    seqs = [tokens]
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    lengths = torch.full((N,), max_len + 2, dtype=torch.long, device=dev)
    for t in range(max_len + 1):
        logp, state = model.step(tokens, state)
        logp[:, vocab.pad_id] = logp[:, vocab.start_id] = logp[:, vocab.unk_id] = -float("inf")
        if t == 0:
            logp[:, vocab.end_id] = -float("inf")
        if t == max_len:  # force an end
            tokens = torch.full((N,), vocab.end_id, dtype=torch.long, device=dev)
        else:
            tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        tokens = torch.where(done, torch.full_like(tokens, vocab.pad_id), tokens)
        seqs.append(tokens)
        newly = ~done & (tokens == vocab.end_id)
        lengths[newly] = t + 2
        done |= newly
        if bool(done.all()):
            break
    return torch.stack(seqs, 1), lengths.cpu()  # packing wants the lengths on the host


def _policy_mask(logits: torch.Tensor, n_seqs: int, vocab: Vocabulary) -> torch.Tensor:
    """Bar the tokens `sample` never draws, so the gradient is that of the policy actually sampled.

    Without it, pushing down bad samples' words raises the never-sampled <unk> every step: after a few
    epochs at lr 5e-5 it held most of the mass and beam search wrote runs of <unk>. `logits` are packed
    time-major, so the first `n_seqs` rows are every caption's first word, where <end> is barred too.
    """
    logits = logits.clone()
    logits[:, [vocab.pad_id, vocab.start_id, vocab.unk_id]] = -float("inf")
    logits[:n_seqs, vocab.end_id] = -float("inf")
    return logits


@contextlib.contextmanager
def without_dropout(model: ShowAndTell):
    """Training mode with every dropout off: the update scores the policy that was sampled (dropout off),
    and cuDNN's LSTM has a backward pass only in training mode."""
    was = model.training
    model.train()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    lstm_p = model.lstm.dropout
    for m in drops:
        m.eval()
    model.lstm.dropout = 0.0
    try:
        yield
    finally:
        model.lstm.dropout = lstm_p
        model.train(was)


def policy_step(model: ShowAndTell, optim: torch.optim.Optimizer, features: torch.Tensor, caps: torch.Tensor,
                lengths: torch.Tensor, rewards: torch.Tensor, vocab: Vocabulary) -> None:
    """One REINFORCE update from `sample`'s captions and their rewards [B, n].

    Each caption's baseline is the mean reward of the image's other samples (no greedy decode needed).
    """
    n = rewards.shape[1]
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    adv = (rewards - baseline).view(-1).to(features.device)
    with without_dropout(model):
        logits, targets = model(features.repeat_interleave(n, 0), caps.to(features.device), lengths)
    tok_lp = -torch.nn.functional.cross_entropy(_policy_mask(logits, len(lengths), vocab), targets, reduction="none")
    # sum per sequence: packed order is time-major, so rebuild with the per-sequence lengths
    packed = pack_padded_sequence(torch.zeros(len(lengths), int(lengths.max()) - 1, device=tok_lp.device),
                                  lengths - 1, batch_first=True, enforce_sorted=False)
    seq_lp = pad_packed_sequence(PackedSequence(tok_lp, packed.batch_sizes, packed.sorted_indices,
                                                packed.unsorted_indices), batch_first=True)[0].sum(1)
    loss = -(adv * seq_lp).mean()
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optim.step()


def train_scst(cfg: ScstConfig, progress: bool = True) -> dict:
    """Fine-tune a cross-entropy model with SCST; keeps the checkpoint with the best dev BLEU-4 (beam search)."""
    torch.manual_seed(cfg.seed)
    model, vocab, encoder, meta = load_model(cfg.init)
    if "ensemble" in meta:
        raise CaptionerError(f"{cfg.init} is an ensemble; run SCST on each member's checkpoint, then combine "
                             f"them (train/bundle.py CKPT CKPT ...)")
    out = check_out_dir(cfg.out)
    ds = load_sources(cfg.data, images=cfg.images)
    train_recs = [r for r in ds.records if r.split == "train"]
    dev_recs = [r for r in ds.records if r.split == "dev"]
    if not train_recs or not dev_recs:
        raise CaptionerError("SCST needs a train and a dev split in --data")
    prepare_out_dir(out)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    fs = model_features(encoder, [r.image for r in train_recs + dev_recs], cfg.cache_dir, workers=cfg.workers,
                        progress=progress)
    valid = fs.valid_mask()
    feats = torch.from_numpy(np.asarray(fs.features, dtype=np.float32))
    feats = features_on_device(feats, cfg.device)
    n_train = len(train_recs)
    train_rows = [i for i in range(n_train) if valid[i]]
    dev_rows = [n_train + i for i in range(len(dev_recs)) if valid[n_train + i]]
    tok_refs = {i: [" ".join(tokenize(c)) for c in train_recs[i].captions] for i in train_rows}
    cider = CiderD([train_recs[i].captions for i in train_rows])
    dev_refs = [dev_recs[r - n_train].captions for r in dev_rows]
    dev_cider = CiderD(dev_refs)  # document frequencies from the dev references, as the COCO evaluation does
    dev_tok_refs = [[" ".join(tokenize(c)) for c in refs] for refs in dev_refs]
    model = model.to(cfg.device)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    @torch.inference_mode()
    def dev_scores() -> dict:
        model.eval()
        hyps = []
        for i in range(0, len(dev_rows), 200):
            hs = beam_search(model, feats[dev_rows[i:i + 200]].to(cfg.device), vocab, cfg.eval_beam, 20,
                             length_penalty=CHECK_LENGTH_PENALTY, suppress_unk=True)  # no rerank or blocking
            hyps += [vocab.decode(h[0].tokens) for h in hs]
        cider_dev = float(dev_cider([" ".join(tokenize(h)) for h in hyps], dev_tok_refs).mean()) * 100
        return {**bleu(hyps, dev_refs), "CIDEr-D": cider_dev, "example": hyps[0]}

    best = dev_scores()
    history = [{"epoch": 0, **best}]
    best_score = best["BLEU-4"]
    print(f"start: dev BLEU-4 {best_score:.2f}, CIDEr-D {best['CIDEr-D']:.2f} (beam {cfg.eval_beam})", flush=True)
    save_model(out / "best.safetensors", model, vocab, encoder, extra={"train": meta.get("train", {}), "scst": {
        "epoch": 0, "dev": {k: v for k, v in best.items() if k != "example"}, "config": asdict(cfg)}})
    t0 = time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        steps = math.ceil(len(order) / cfg.batch_size)
        bar = tqdm(range(steps), desc=f"scst {epoch}/{cfg.epochs}", disable=not progress, dynamic_ncols=True)
        rewards = []
        for b in bar:
            rows = [train_rows[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()]
            f = feats[rows].to(cfg.device)
            model.eval()  # sample and score without dropout, so the policy is the one we ship
            with torch.no_grad():
                caps, lens = sample(model, f, vocab, cfg.samples, cfg.max_len, gen)
            hyps = [" ".join(tokenize(vocab.decode(c))) for c in caps.tolist()]
            refs = [tok_refs[r] for r in rows for _ in range(cfg.samples)]
            r = torch.from_numpy(cider(hyps, refs)).float().view(len(rows), cfg.samples)
            policy_step(model, optim, f, caps, lens, r, vocab)
            if cfg.device == "cpu":
                trim_if_due(b + 1)
            rewards.append(float(r.mean()))
            bar.set_postfix(cider=f"{np.mean(rewards[-20:]):.3f}")
        bar.close()
        sc = dev_scores()
        history.append({"epoch": epoch, "train_cider": float(np.mean(rewards)), **sc})
        improved = sc["BLEU-4"] > best_score
        print(f"scst epoch {epoch}: train CIDEr-D {np.mean(rewards):.3f}, dev BLEU-4 {sc['BLEU-4']:.2f}, "
              f"CIDEr-D {sc['CIDEr-D']:.2f}"
              f"{' (best)' if improved else ''}; e.g. \"{sc['example']}\"", flush=True)
        if improved:
            best_score = sc["BLEU-4"]
            save_model(out / "best.safetensors", model, vocab, encoder, extra={"train": meta.get("train", {}), "scst": {
                "epoch": epoch, "dev": {k: v for k, v in sc.items() if k != "example"}, "config": asdict(cfg)}})
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return {"best_dev_BLEU-4": best_score, "seconds": round(time.time() - t0, 1),
            "checkpoint": str(out / "best.safetensors")}
