"""Caption images with an exported model (`captioner export --format onnx OUT_DIR`) on onnxruntime, numpy and
Pillow alone: no torch, so the model runs wherever onnxruntime does.

It repeats the torch path step for step, so that both write the same captions: images are loaded and
preprocessed as encoders.Preprocess does (images.load_image, bicubic square resize, per-channel
normalisation; mirrored and cropped views), and greedy and beam search are decoding.py's (masks, length
penalty, trigram and repeated-content-word blocking), ranked and then reranked by consensus.py.

    python -m captioner.onnx_runtime OUT_DIR photo.jpg [more.jpg ...] [--beam-size 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .config import MAX_BEAM, Decoding
from .consensus import rerank as consensus_order
from .errors import CaptionerError
from .images import ImageError, ImageSource, load_image
from .vocab import Vocabulary

FORMAT = "captioner-onnx-1"  # what onnx_export.py writes in decoding.json
CROPS = ("tl", "tr", "bl", "br")
NEG_INF = -np.inf


@dataclass
class Hypothesis:
    tokens: list[int]
    logprob: float  # sum of token log-probabilities, <end> included when it was produced
    score: float  # logprob, length-normalised when asked


@dataclass
class Caption:
    text: str
    logprob: float
    alternatives: list[tuple[str, float]]  # n-best (text, logprob), best first (after reranking); `text` first


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise CaptionerError(f"missing {path}: not a folder written by `captioner export --format onnx`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionerError(f"cannot read {path} ({getattr(e, 'msg', None) or e})") from None


def _load_net(path: Path, threads: int):
    """One ONNX file ready to run on the CPU; a missing or unreadable file is a one-line error."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaptionerError('running exported models needs onnxruntime: pip install "captioner[onnx]"') from None
    if not path.is_file():
        raise CaptionerError(f"missing {path}: export the model again (captioner export --format onnx)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # onnxruntime's warnings are about its own graph rewrites
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime's pybind errors share no base class worth naming)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptionerError(f"cannot load {path}: {first[:200]}") from None


def to_array(img: Image.Image, pre: dict, hflip: bool = False, crop: str = "") -> np.ndarray:
    """encoders.Preprocess.to_tensor in numpy: the CNN's [3, S, S] float32 input from an upright RGB image."""
    if crop:
        w, h = img.size
        cw, ch = round(w * pre["crop_scale"]), round(h * pre["crop_scale"])
        left = w - cw if crop[1] == "r" else 0
        top = h - ch if crop[0] == "b" else 0
        img = img.crop((left, top, left + cw, top + ch))
    size = pre["size"]
    img = img.resize((size, size), Image.BICUBIC)
    if hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def views_of(n: int) -> list[tuple[bool, str]]:
    """encoders.test_views as (mirrored, corner crop) pairs: 1 the image, 2 and its mirror image, 6 and its
    four corner crops."""
    if n not in (1, 2, 6):
        raise CaptionerError(f"views must be one of 1, 2, 6, not {n}")
    return [(False, ""), (True, ""), *((False, c) for c in CROPS)][:n]


def align_view(features: np.ndarray, grid: int, parts: int) -> np.ndarray:
    """encoders.align_view for a mirrored view: each part's region grid [global | g x g cells, row-major]
    mirrored back, so that averaging views averages each region with itself."""
    if not grid:
        return features
    out = []
    for p in np.split(features, parts, -1):
        split = p.shape[-1] // (1 + grid * grid)
        cells = p[:, split:].reshape(-1, grid, grid, split)[:, :, ::-1].reshape(p.shape[0], -1)
        out.append(np.concatenate([p[:, :split], cells], -1))
    return np.concatenate(out, -1)


class OnnxCaptioner:
    """An exported model ready to caption, as inference.Captioner does with torch.

    >>> cap = OnnxCaptioner("model-onnx")      # a folder written by `captioner export --format onnx`
    >>> cap.caption("dog.jpg")                  # 'a brown dog is running through the grass'
    """

    def __init__(self, folder: str | Path, threads: int = 0):
        """`threads`: onnxruntime's threads per ONNX file (0: its default, one per core)."""
        self.folder = folder = Path(folder)
        if not folder.is_dir():
            raise CaptionerError(f"not a folder: {folder} (write one with `captioner export --format onnx`)")
        conf = _read_json(folder / "decoding.json")
        if not isinstance(conf, dict) or conf.get("format") != FORMAT:
            raise CaptionerError(f"{folder / 'decoding.json'}: not a {FORMAT} file; export the model again")
        try:
            self.decoding = Decoding(**conf["decoding"]).validate()
            self.suppress_unk = bool(conf.get("suppress_unk", True))
            self.encoders = [dict(e, net=_load_net(folder / e["file"], threads)) for e in conf["encoders"]]
            dec = conf["decoder"]
            self.init_net = _load_net(folder / dec["init_state"], threads)
            self.step_net = _load_net(folder / dec["step"], threads)
        except (KeyError, TypeError) as e:
            raise CaptionerError(f"{folder / 'decoding.json'} is incomplete ({type(e).__name__}: {e})") from None
        self.vocab = Vocabulary.load(folder / "vocab.json")
        self.step_inputs = [i.name for i in self.step_net.get_inputs()]
        self.state_names = [o.name for o in self.init_net.get_outputs()]  # h, c and, with attention, memory
        self.content = np.array(self.vocab.content_words())  # what block_repeats forbids saying twice
        self.groups = np.array(self.vocab.repeat_groups())  # a plural and its singular count as one word

    # --- encoding ---------------------------------------------------------------------------------------
    def encode(self, images: Sequence[ImageSource], views: int = 1, batch_size: int = 4) -> np.ndarray:
        """Pooled features [N, D] of every CNN side by side, averaged over `views`, as Captioner.encode."""
        return np.concatenate([self._encode_with(e, images, views, batch_size) for e in self.encoders], -1)

    def _encode_with(self, enc: dict, images: Sequence[ImageSource], views: int, batch_size: int) -> np.ndarray:
        pre, vs = enc["preprocess"], views_of(views)
        feats = []
        for i in range(0, len(images), batch_size):  # each image read once (per CNN), then cut into its views
            imgs = [load_image(im, draft_size=pre["size"]) for im in images[i:i + batch_size]]
            x = np.stack([to_array(img, pre, flip, crop) for img in imgs for flip, crop in vs])
            f = enc["net"].run(None, {"image": x})[0].reshape(len(imgs), views, -1)
            per_view = [align_view(f[:, v], enc["grid"], enc["parts"]) if flip else f[:, v]
                        for v, (flip, _) in enumerate(vs)]
            feats.append(np.stack(per_view).mean(0, dtype=np.float32) if views > 1 else per_view[0])
        return np.concatenate(feats).astype(np.float32, copy=False)

    # --- the decoder's two functions -------------------------------------------------------------------
    def init_state(self, features: np.ndarray) -> list[np.ndarray]:
        """h, c [layers, N, H] and, with attention, the region memory [R, N, M]."""
        return self.init_net.run(None, {"features": np.ascontiguousarray(features, dtype=np.float32)})

    def step(self, tokens: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Next-word log-probabilities [rows, V] (float32) and the new state; the memory passes through."""
        feed = dict(zip(self.step_inputs, [tokens.astype(np.int64), *state]))
        logp, h, c = self.step_net.run(None, feed)
        return logp, [h, c, *state[2:]]

    # --- decoding --------------------------------------------------------------------------------------
    def _settings(self, decoding: Decoding | None, settings: dict) -> Decoding:
        try:
            return replace(decoding or self.decoding, **settings).validate()
        except TypeError as e:  # an unknown keyword
            raise CaptionerError(f"unknown decoding setting ({e})") from None

    def decode(self, features: np.ndarray, decoding: Decoding | None = None, n_best: int = 1,
               **settings) -> list[Caption]:
        """Captions for encoded images, as Captioner.decode: decoding.json's settings unless `decoding` or
        keywords (`beam_size=1`) say otherwise; with rerank R > 1 the caption is the one of the beam's R best
        that agrees most with all its results (consensus.py)."""
        d = self._settings(decoding, settings)
        if not 1 <= n_best <= MAX_BEAM:
            raise CaptionerError(f"n-best must be 1 to {MAX_BEAM}")
        rerank = min(d.rerank, d.beam_size)
        if d.beam_size == 1 and n_best == 1:
            hyps = [[h] for h in greedy(self, features, d.max_len, self.suppress_unk, d.block_repeats)]
        else:
            keep = max(d.beam_size, n_best) if rerank > 1 else n_best  # every finished beam votes
            hyps = beam_search(self, features, max(d.beam_size, n_best), d.max_len, d.length_penalty, keep,
                               self.suppress_unk, d.block_trigrams, d.block_repeats)
        out = []
        for hs in hyps:
            if rerank > 1:
                hs = [hs[i] for i in consensus_order([h.tokens for h in hs], rerank, len(hs), d.rerank_fmean)][:n_best]
            alts = [(self.vocab.decode(h.tokens), h.logprob) for h in hs]
            out.append(Caption(alts[0][0], alts[0][1], alts))
        return out

    def caption_full(self, images: Iterable[ImageSource], decoding: Decoding | None = None, n_best: int = 1,
                     batch_size: int = 32, **settings) -> list[Caption]:
        """Captions with log-probabilities and n-best alternatives; `decoding` and keywords as for `decode`."""
        d = self._settings(decoding, settings)
        images = list(images)
        out: list[Caption] = []
        for i in range(0, len(images), batch_size):
            out += self.decode(self.encode(images[i:i + batch_size], views=d.views), d, n_best)
        return out

    def caption(self, images: ImageSource | Iterable[ImageSource], decoding: Decoding | None = None,
                **settings) -> list[str] | str:
        """One caption per image; a single path/PIL image gives a single string."""
        single = isinstance(images, (str, Path, bytes, Image.Image))
        caps = self.caption_full([images] if single else images, decoding, **settings)
        texts = [c.text for c in caps]
        return texts[0] if single else texts


def _mask(logp: np.ndarray, t: int, vocab: Vocabulary, suppress_unk: bool) -> None:
    """decoding._mask: <pad> and <start> never, <unk> not when suppressed, <end> not as the first word."""
    logp[:, [vocab.pad_id, vocab.start_id]] = NEG_INF
    if suppress_unk and logp.shape[-1] > len(vocab.SPECIALS):  # unless <unk> is the only word there is
        logp[:, vocab.unk_id] = NEG_INF
    if t == 0:
        logp[:, vocab.end_id] = NEG_INF


def _block_trigrams(logp: np.ndarray, prefix: np.ndarray, pad_id: int) -> None:
    """decoding._block_trigrams: no word that would repeat a trigram already in its row's words `prefix`."""
    if prefix.shape[1] < 3:
        return
    seen = (prefix[:, :-2] == prefix[:, -2:-1]) & (prefix[:, 1:-1] == prefix[:, -1:])
    logp[np.arange(len(prefix))[:, None], np.where(seen, prefix[:, 2:], pad_id)] = NEG_INF


def _block_repeats(logp: np.ndarray, prefix: np.ndarray, content: np.ndarray, groups: np.ndarray) -> None:
    """decoding._block_repeats: no content word that its row's words `prefix` hold already, in the singular
    or the plural."""
    if prefix.shape[1] == 0:
        return
    said = np.zeros(logp.shape, dtype=bool)
    said[np.arange(len(prefix))[:, None], groups[prefix]] = True
    logp[said[:, groups] & content] = NEG_INF


def greedy(cap: OnnxCaptioner, features: np.ndarray, max_len: int = 20, suppress_unk: bool = False,
           block_repeats: bool = False) -> list[Hypothesis]:
    """decoding.greedy: the most likely word at each step, for image features [B, D]."""
    vocab, B = cap.vocab, features.shape[0]
    state = cap.init_state(features)
    tokens = np.full(B, vocab.start_id, dtype=np.int64)
    out = np.zeros((B, max_len), dtype=np.int64)
    logprob = np.zeros(B, dtype=np.float64)
    lengths = np.full(B, max_len, dtype=np.int64)
    live = np.arange(B)  # captions still running: only their rows are computed
    for t in range(max_len):
        logp, state = cap.step(tokens, state)
        logp = logp.astype(np.float64)
        _mask(logp, t, vocab, suppress_unk)
        if block_repeats:
            _block_repeats(logp, out[live, :t], cap.content, cap.groups)
        tokens = logp.argmax(-1)
        logprob[live] += logp[np.arange(len(tokens)), tokens]
        out[live, t] = tokens
        ended = tokens == vocab.end_id
        lengths[live[ended]] = t  # words before <end>
        if ended.all():
            break
        live, tokens = live[~ended], tokens[~ended]
        state = [s[:, ~ended] for s in state]
    return [Hypothesis(out[b, :lengths[b]].tolist(), float(logprob[b]), float(logprob[b])) for b in range(B)]


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest values, largest first (torch.topk's order)."""
    if k < x.shape[1]:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    order = np.argsort(-np.take_along_axis(x, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def beam_search(cap: OnnxCaptioner, features: np.ndarray, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, n_best: int = 1, suppress_unk: bool = False,
                block_trigrams: bool = False, block_repeats: bool = False) -> list[list[Hypothesis]]:
    """decoding.beam_search: all B images x K beams advance as one batch of B*K rows; finished captions are
    ranked by logprob / length**length_penalty. Returns, per image, the `n_best` hypotheses, best first."""
    vocab = cap.vocab
    B, K, V = features.shape[0], beam_size, len(vocab)
    state = cap.init_state(features)  # (h, c) get K rows per image; a region memory stays one per image
    state = [*(np.repeat(s, K, axis=1) for s in state[:2]), *state[2:]]
    scores = np.full((B, K), NEG_INF)
    scores[:, 0] = 0.0  # only one live beam at the start
    tokens = np.full(B * K, vocab.start_id, dtype=np.int64)
    seqs = np.zeros((B, K, max_len), dtype=np.int64)  # <pad> after each caption's end
    finished = np.zeros((B, K), dtype=bool)
    lengths = np.zeros((B, K), dtype=np.int64)
    # The best K of K*V candidates are among each beam's own best K words; a finished beam only extends
    # with <pad> at no cost, so it keeps its score and place.
    W = min(K, V)
    frozen = np.full(W, NEG_INF)
    frozen[0] = 0.0
    live = np.arange(B)  # images with an unfinished beam: only their rows are computed
    for t in range(max_len):
        L = len(live)
        ar = np.arange(L)[:, None]
        logp, state = cap.step(tokens, state)
        _mask(logp, t, vocab, suppress_unk)
        prefix = seqs[live, :, :t].reshape(L * K, t)
        if block_trigrams:
            _block_trigrams(logp, prefix, vocab.pad_id)
        if block_repeats:
            _block_repeats(logp, prefix, cap.content, cap.groups)
        words = _topk(logp, W)
        best = np.take_along_axis(logp, words, 1).astype(np.float64)
        done_l = finished[live]
        best = np.where(done_l[..., None], frozen, best.reshape(L, K, W))
        words = np.where(done_l[..., None], vocab.pad_id, words.reshape(L, K, W))
        cand = (scores[live][..., None] + best).reshape(L, K * W)
        idx = _topk(cand, K)
        top = np.take_along_axis(cand, idx, 1)
        beam, word = idx // W, np.take_along_axis(words.reshape(L, K * W), idx, 1)
        prev = seqs[live][ar, beam]
        prev[:, :, t] = word
        seqs[live] = prev
        was_finished = done_l[ar, beam]
        lengths[live] = lengths[live][ar, beam] + (~was_finished & (word != vocab.end_id))
        finished[live] = was_finished | (word == vocab.end_id)
        scores[live] = top
        still = ~finished[live].all(1)
        if not still.any():
            break
        rows = (beam + ar * K)[still].reshape(-1)  # drop the rows of images whose beams have all ended
        memory = state[2:] if still.all() else [m[:, still] for m in state[2:]]
        state = [state[0][:, rows], state[1][:, rows], *memory]
        tokens = word[still].reshape(-1)
        live = live[still]
    with np.errstate(invalid="ignore"):
        ranked = scores / np.maximum(lengths, 1).astype(np.float64) ** length_penalty if length_penalty else scores
    ranked = np.where(np.isfinite(scores), ranked, NEG_INF)
    order = np.argsort(-ranked, axis=1, kind="stable")
    results = []
    for b in range(B):
        results.append([Hypothesis(seqs[b, k, :lengths[b, k]].tolist(), float(scores[b, k]), float(ranked[b, k]))
                        for k in order[b, :n_best].tolist() if np.isfinite(scores[b, k])])
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m captioner.onnx_runtime OUT_DIR image ...`: one caption per image, as `captioner caption`."""
    from .cli import add_options, given, run_reporting_errors  # argparse only: no torch
    p = argparse.ArgumentParser(prog="python -m captioner.onnx_runtime",
                                description="Caption images with a model exported by `captioner export --format "
                                            "onnx`, on onnxruntime (no torch). Decoding options default to the "
                                            "folder's decoding.json.")
    p.add_argument("folder", help="the export folder (OUT_DIR)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, WebP, ...)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: one per core)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_options(p, Decoding, typed_only=True)
    args = p.parse_args(argv)

    def caption_each() -> int:
        cap = OnnxCaptioner(args.folder, threads=args.threads)
        decoding = cap._settings(None, given(args, Decoding))
        results, failed = [], 0
        for path in args.images:
            try:
                c = cap.caption_full([path], decoding)[0]
            except ImageError as e:
                failed += 1
                print(f"captioner: error: {e}", file=sys.stderr)
                continue
            results.append({"image": path, "caption": c.text, "logprob": round(c.logprob, 4)})
            if not args.json:
                print(f"{path}\t{c.text}" if len(args.images) > 1 else c.text, flush=True)
        if args.json:
            print(json.dumps(results, indent=2))
        return 1 if failed else 0
    return run_reporting_errors(caption_each)

if __name__ == "__main__":
    sys.exit(main())
