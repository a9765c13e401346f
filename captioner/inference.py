"""`Captioner`: load a checkpoint once, caption paths or PIL images in batches."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .checkpoint import (DELTA_SCALE_SUFFIX, DELTA_SUFFIX, first_problem, load_tensors, pack_delta4, pack_weights,
                         prefixed, save_tensors, unpack_delta4, unpack_weights)
from .attention import WordAttention, word_attention
from .decoding import Hypothesis, beam_search, greedy, int8_is_available, precision_dtype, set_precision
from .distributed import bfloat16_is_native
from .consensus import rerank as consensus_order
from .config import MAX_BEAM, PRECISIONS, STORAGES, Decoding
from .encoders import (Encoder, EncoderStack, Preprocess, SharedTrunk, average_views, create_encoder, parts_of,
                       test_views)
from .errors import CaptionerError
from .images import ImageSource, load_image
from .model import Decoder, DecoderConfig, Ensemble, ShowAndTell
from .vocab import Vocabulary

BUNDLED_MODEL = Path(__file__).parent / "assets" / "captioner-flickr8k-coco.safetensors"
BUNDLE_STORAGES = STORAGES  # what a file to ship may use (checkpoint.STORAGES less float32)


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """What "auto" means here (int8 where x86 kernels exist, as fast as bfloat16 batched even where bfloat16
    is native and faster for one image; eval/RESULTS.md), and a clear error for what cannot run."""
    if precision not in PRECISIONS:
        raise CaptionerError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "int8" if int8_is_available(device) else "bfloat16" if bfloat16_is_native(device) else "float32"
    if precision == "int8" and not int8_is_available(device):
        raise CaptionerError(f"int8 decoding runs on CPUs with torch's x86 quantized kernels, not on {device} "
                             "with this torch; use --precision float32")
    return precision


@dataclass
class Caption:
    text: str
    logprob: float
    alternatives: list[tuple[str, float]]  # n-best (text, logprob), best first (after reranking); `text` first
    attention: list[WordAttention] | None = None  # `text`'s words and where each looked (attention=True)


def save_model(path: str | Path, decoder: Decoder, vocab: Vocabulary, encoder: Encoder,
               extra: dict | None = None, storage: str = "float32") -> None:
    """Self-contained model checkpoint (see checkpoint.py), its weights stored as checkpoint.STORAGES says;
    an encoder's fine-tuned stages travel with it, its pretrained rest does not."""
    tensors = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    tuned = encoder.tuned_state_dict()
    # int8: kernels as 4-bit differences from the package's weights
    kernels = {k: v for k, v in tuned.items() if v.dim() >= 2} if storage == "int8" and encoder.tuned_alone else {}
    tensors.update({f"encoder.{k}": v for k, v in tuned.items() if k not in kernels})
    tensors = pack_weights(tensors, storage)
    base = encoder.package_state_dict() if kernels else {}
    for k, v in kernels.items():
        tensors[f"encoder.{k}{DELTA_SUFFIX}"], tensors[f"encoder.{k}{DELTA_SCALE_SUFFIX}"] = pack_delta4(v, base[k])
    split = isinstance(decoder, Ensemble) and decoder.split_features
    if split != (encoder.parts > 1):
        raise CaptionerError("an ensemble splits its features exactly when its encoder is a SharedTrunk or a stack")
    stack = isinstance(encoder, EncoderStack)
    meta = {"decoder": decoder.cfg.to_dict(), "vocab": vocab.to_list(),
            **({"ensemble": [m.cfg.to_dict() for m in decoder.members]} if isinstance(decoder, Ensemble) else {}),
            "encoder": {"name": encoder.name, "dim": encoder.dim,
                        **({"stack": [{"name": m.name, "preprocess": m.preprocess.to_dict()} for m in encoder.members]}
                           if stack else {"preprocess": encoder.preprocess.to_dict()}),
                        **({"pool": encoder.pool} if encoder.pool != "avg" else {}),
                        "weights_included": bool(tuned),
                        **({"tuned_stages": encoder.tuned_alone} if encoder.tuned_alone else {}),
                        **({"parts": encoder.parts} if split else {})},
            **(extra or {}), "storage": storage}
    save_tensors(path, tensors, meta)


def load_model(path: str | Path) -> tuple[Decoder, Vocabulary, Encoder, dict]:
    """Everything is checked against the metadata before the encoder is built (which may download weights)."""
    from .encoders import ENCODER_DIMS, ENCODERS, POOLS
    tensors, meta = load_tensors(path)
    tensors = unpack_weights(tensors, path)
    try:
        vocab = Vocabulary(meta["vocab"])
        cfg = DecoderConfig.from_dict(meta["decoder"])
        enc_meta = meta["encoder"]
        enc_name = enc_meta["name"]
        with_encoder = bool(enc_meta.get("weights_included"))
        tuned = int(enc_meta.get("tuned_stages", 0))  # 0 with weights: an older checkpoint holding the whole CNN
        parts = int(enc_meta.get("parts", 1))  # > 1: members fine-tuned their own top stages (SharedTrunk)
        saved_pre = Preprocess.from_dict(enc_meta["preprocess"]) if "preprocess" in enc_meta else None
        stack = enc_meta.get("stack")  # members that read different CNNs (EncoderStack), one each
        if stack is not None:
            if not isinstance(stack, list) or len(stack) != parts or tuned or with_encoder:
                raise ValueError(f"'stack' must list {parts} pretrained encoders, one per encoder part")
            stack = [(m["name"], Preprocess.from_dict(m["preprocess"])) for m in stack]
        if "ensemble" in meta:
            members = meta["ensemble"]
            if not isinstance(members, list) or not members:
                raise ValueError("'ensemble' must list the members' decoder configs")
            if parts > 1 and (len(members) != parts or not (tuned or stack)):
                raise ValueError(f"{parts} encoder parts need as many members, each with tuned stages or its own CNN")
            decoder = Ensemble([ShowAndTell(DecoderConfig.from_dict(d)) for d in members], split_features=parts > 1)
        elif parts != 1:
            raise ValueError("encoder parts without an ensemble")
        else:
            decoder = ShowAndTell(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CaptionerError(f"{path}: checkpoint metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    if cfg.vocab_size != len(vocab):
        raise CaptionerError(f"{path}: decoder expects {cfg.vocab_size} words but the vocabulary has {len(vocab)}")
    names = [name for name, _ in stack] if stack else [enc_name]
    for name in names:
        if name not in ENCODERS:
            raise CaptionerError(f"{path}: unknown encoder {name!r} (known: {', '.join(ENCODERS)})")
    pool = enc_meta.get("pool", "avg")
    if pool not in POOLS:
        raise CaptionerError(f"{path}: unknown pooling {pool!r} (known: {', '.join(POOLS)})")
    want_dim = decoder.feature_dim if isinstance(decoder, Ensemble) else cfg.feature_dim
    native = sum(ENCODER_DIMS.get(n, 0) for n in names) * POOLS[pool] * (1 if stack else parts)
    for dim in (native or None, enc_meta.get("dim")):
        if dim is not None and dim != want_dim:
            raise CaptionerError(f"{path}: decoder expects {want_dim}-d features but encoder {enc_name} "
                                 f"gives {dim}-d ones")
    dec_sd = prefixed(tensors, "decoder.")
    try:
        decoder.load_state_dict(dec_sd)
    except RuntimeError as e:
        raise CaptionerError(f"{path}: weights do not match the config ({first_problem(e)})") from None
    enc_sd = prefixed(tensors, "encoder.")
    if stack:
        encoder = EncoderStack([_build_encoder(path, name, pool, 0, pre, None) for name, pre in stack])
    elif parts > 1:
        encoder = SharedTrunk([_build_encoder(path, enc_name, pool, tuned, saved_pre, prefixed(enc_sd, f"m{i}."))
                               for i in range(parts)])
    else:
        encoder = _build_encoder(path, enc_name, pool, tuned, saved_pre, enc_sd if with_encoder else None)
    if encoder.dim != want_dim:
        raise CaptionerError(f"{path}: decoder expects {want_dim}-d features but encoder {enc_name} gives {encoder.dim}")
    return decoder.eval(), vocab, encoder.eval(), meta


def _build_encoder(path: str | Path, enc_name: str, pool: str, tuned: int, saved_pre: Preprocess | None,
                   enc_sd: dict[str, torch.Tensor] | None) -> Encoder:
    """The checkpoint's encoder: pretrained, with its fine-tuned stages' weights (`enc_sd`) when it carries them."""
    encoder = create_encoder(enc_name, pretrained=enc_sd is None or tuned > 0, pool=pool)
    if saved_pre is not None:
        encoder.preprocess = saved_pre
    if enc_sd is None:
        return encoder
    if not 0 <= tuned <= len(encoder.stages):
        raise CaptionerError(f"{path}: {enc_name} has {len(encoder.stages)} stages, not {tuned} to fine-tune")
    enc_sd = dict(enc_sd)
    pretrained = encoder.state_dict()
    for k in [k for k in enc_sd if k.endswith(DELTA_SUFFIX)]:  # int8 files: differences from the package's weights
        name = k[: -len(DELTA_SUFFIX)]
        w = unpack_delta4(enc_sd.pop(k), enc_sd.pop(name + DELTA_SCALE_SUFFIX, torch.empty(0)),
                          pretrained.get(name, torch.empty(0))) if tuned else None
        if w is None:
            raise CaptionerError(f"{path}: 4-bit weight difference {k} does not fit {enc_name}'s pretrained {name}")
        enc_sd[name] = w
    encoder.tuned = tuned or len(encoder.stages)
    want = set(encoder.tuned_state_dict())
    if set(enc_sd) != want:  # strict=False below would let a missing or stray tensor pass
        odd = sorted(set(enc_sd) ^ want)[0]
        raise CaptionerError(f"{path}: encoder weights do not fit {enc_name} "
                             f"({'Unexpected' if odd in enc_sd else 'Missing'} key(s) in state_dict: {odd})")
    try:
        encoder.load_state_dict(enc_sd, strict=False)
    except RuntimeError as e:
        raise CaptionerError(f"{path}: encoder weights do not fit {enc_name} ({first_problem(e)})") from None
    return encoder


def save_ensemble(path: str | Path, checkpoints: Sequence[str | Path], storage: str = "float32") -> int:
    """One checkpoint holding the decoders of several runs (same data and vocabulary), which then decode
    together (model.Ensemble). Members that read different pretrained CNNs keep them (EncoderStack); members
    that fine-tuned the same CNN's top stages share its trunk (SharedTrunk). Returns the number of members."""
    decoders: list[ShowAndTell] = []
    encoders: list[Encoder] = []  # one per member
    first = None
    for ckpt in checkpoints:
        decoder, vocab, encoder, meta = load_model(ckpt)
        if meta["encoder"].get("weights_included") and not encoder.tuned_alone:
            raise CaptionerError(f"{ckpt}: carries a whole fine-tuned CNN; an ensemble can share only a pretrained "
                                 f"one whose members tuned their top stages (--fine-tune-blocks)")
        if first is None:
            first = (vocab, encoder)
        elif vocab.to_list() != first[0].to_list():
            raise CaptionerError(f"{ckpt}: vocabulary differs from {checkpoints[0]}'s; ensemble members must be "
                                 f"trained on the same data with the same --min-count")
        members = list(decoder.members) if isinstance(decoder, Ensemble) else [decoder]
        decoders += members
        encoders += list(encoder.members) if encoder.parts > 1 else [encoder] * len(members)
    if first is None:
        raise CaptionerError("no checkpoints to combine")
    kinds = {(e.name, e.preprocess, e.pool, e.tuned_alone) for e in encoders}
    tuned = any(e.tuned_alone for e in encoders)  # each member then brings its own tuned stages
    if tuned and len(kinds) > 1:
        raise CaptionerError("encoder differs between members: members that fine-tuned their encoder's top stages "
                             "combine only with members that tuned the same stages of the same CNN")
    stacked = not tuned and len(kinds) > 1  # members that read different CNNs
    try:
        ensemble = Ensemble(decoders, split_features=tuned or stacked)
        encoder = SharedTrunk(encoders) if tuned else EncoderStack(encoders) if stacked else first[1]
    except ValueError as e:
        raise CaptionerError(str(e)) from None
    save_model(path, ensemble, first[0], encoder, storage=storage)
    return len(decoders)


def bundle(path: str | Path, checkpoints: Sequence[str | Path], storage: str = "float16") -> str:
    """Runs' best checkpoints as one file to ship (float16 or int8 weights): one model alone, several as an
    ensemble. Returns what was written, in words."""
    if len(checkpoints) > 1:
        return f"ensemble of {save_ensemble(path, checkpoints, storage=storage)}"
    if not checkpoints:
        raise CaptionerError("no checkpoints to bundle")
    decoder, vocab, encoder, meta = load_model(checkpoints[0])
    save_model(path, decoder, vocab, encoder, storage=storage)  # no run folders' paths in a file to ship
    return "one model"


class Captioner:
    """A trained captioning model ready for inference.

    >>> cap = Captioner.load()          # the bundled model (`captioner info` prints its card)
    >>> cap.caption(["dog.jpg"])        # ['a brown dog is running through the grass']
    """

    def __init__(self, decoder: Decoder, vocab: Vocabulary, encoder: Encoder, meta: dict | None = None,
                 device: str = "cpu", precision: str = "auto"):
        self.decoder, self.vocab, self.encoder = decoder.to(device).eval(), vocab, encoder.to(device).eval()
        self.meta, self.device = meta or {}, device
        self.precision = precision = resolve_precision(precision, device)
        set_precision(self.decoder, precision_dtype(precision))

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu", precision: str = "auto") -> "Captioner":
        """From a checkpoint file (or run folder); the bundled model when `path` is None."""
        if path is None:
            if not BUNDLED_MODEL.is_file():
                raise CaptionerError(f"bundled model missing at {BUNDLED_MODEL}; pass --model CKPT")
            path = BUNDLED_MODEL
        return cls(*load_model(path), device=device, precision=precision)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageSource], batch_size: int = 4, views: int = 1) -> torch.Tensor:
        """Pooled features [N, D], averaged over `views` (encoders.test_views); small encoder batches are
        fastest on CPU."""
        return torch.cat([self._encode_with(enc, images, batch_size, views) for enc in parts_of(self.encoder)], -1)

    def _encode_with(self, encoder: Encoder | SharedTrunk, images: Sequence[ImageSource], batch_size: int,
                     views: int) -> torch.Tensor:
        pres = [encoder.preprocess] if views == 1 else test_views(encoder.preprocess, views)
        feats = []
        for i in range(0, len(images), batch_size):  # each image read once (per CNN), then cut into its views
            imgs = [load_image(im, draft_size=pres[0].size) for im in images[i:i + batch_size]]
            x = torch.stack([p.to_tensor(img) for img in imgs for p in pres])
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            f = encoder(x).float().view(-1, views, encoder.dim)
            feats.append(average_views(f.unbind(1), encoder.pool, pres, encoder.parts))
        return torch.cat(feats)

    def decode(self, features: torch.Tensor, decoding: Decoding | None = None, n_best: int = 1,
               suppress_unk: bool = True, attention: bool = False, **settings) -> list[Caption]:
        """Captions for encoded images, decoded as `decoding` says (config.Decoding; the shipped settings
        when None), any of its fields overridden by keyword (`beam_size=1`). With rerank R > 1 the caption is
        the one of the beam's R best that agrees most with all its results (consensus.py). `attention`: each
        caption also gets, per word, the attention the decoder ran with on that caption's own beam."""
        d = self._settings(decoding, settings)
        if not 1 <= n_best <= MAX_BEAM:
            raise CaptionerError(f"n-best must be 1 to {MAX_BEAM}")
        if attention and not self.decoder.cfg.regions:
            raise CaptionerError("this model does not attend over image regions (its encoder pools 'avg'); "
                                 "attention needs a model trained with --pool regions")
        rerank = min(d.rerank, d.beam_size)
        if d.beam_size == 1 and n_best == 1:
            hyps: list[list[Hypothesis]] = [[h] for h in greedy(self.decoder, features, self.vocab, d.max_len,
                                                                  suppress_unk, d.block_repeats, attention)]
        else:
            keep = max(d.beam_size, n_best) if rerank > 1 else n_best  # every finished beam votes
            hyps = beam_search(self.decoder, features, self.vocab, max(d.beam_size, n_best), d.max_len,
                               d.length_penalty, keep, suppress_unk, d.block_trigrams, d.block_repeats, attention)
        out = []
        for hs in hyps:
            if rerank > 1:
                hs = [hs[i] for i in consensus_order([h.tokens for h in hs], rerank, len(hs), d.rerank_fmean)][:n_best]
            alts = [(self.vocab.decode(h.tokens), h.logprob) for h in hs]
            words = word_attention([self.vocab.itos[i] for i in hs[0].tokens], hs[0].attention) if attention else None
            out.append(Caption(alts[0][0], alts[0][1], alts, words))
        return out

    @staticmethod
    def _settings(decoding: Decoding | None, settings: dict) -> Decoding:
        try:
            return replace(decoding or Decoding(), **settings).validate()
        except TypeError as e:  # an unknown keyword
            raise CaptionerError(f"unknown decoding setting ({e})") from None

    def caption_full(self, images: Iterable[ImageSource], decoding: Decoding | None = None, n_best: int = 1,
                     batch_size: int = 32, attention: bool = False, **settings) -> list[Caption]:
        """Captions with log-probabilities and n-best alternatives; `decoding`, `attention` and keywords as
        for `decode` (`attention.plot` draws a caption's attention over its photo)."""
        d = self._settings(decoding, settings)
        images = list(images)
        out: list[Caption] = []
        for i in range(0, len(images), batch_size):
            feats = self.encode(images[i:i + batch_size], views=d.views)
            out += self.decode(feats, d, n_best, attention=attention)
        return out

    def caption(self, images: ImageSource | Iterable[ImageSource], decoding: Decoding | None = None,
                batch_size: int = 32, **settings) -> list[str] | str:
        """One caption per image; a single path/PIL image gives a single string."""
        single = isinstance(images, (str, Path, bytes)) or hasattr(images, "size") and hasattr(images, "mode")
        caps = self.caption_full([images] if single else images, decoding, batch_size=batch_size, **settings)
        texts = [c.text for c in caps]
        return texts[0] if single else texts
