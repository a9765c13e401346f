"""Every setting in one place: how captions are decoded (`Decoding`), how a model is trained (`TrainConfig`),
and what a whole recipe adds on top (`RecipeConfig`).

Each field's help text lives in its metadata; the CLI builds its flags from these dataclasses, so a setting
is defined, documented and defaulted once. This module imports no torch, so `captioner --help` stays fast.
Why each shipped default was chosen is recorded in eval/RESULTS.md ("Levers tried").
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from .errors import CaptionerError

# Upper bounds for beam size, n-best and caption length anywhere: beam search holds beam x images rows, and an
# unbounded n-best can ask for more memory than the machine has (the demo's own limits are lower).
MAX_BEAM = 100
MAX_LEN = 100
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
VIEWS = (1, 2, 6)  # test-time views: the image; and its mirror image; and its four corner crops
POOLS = ("avg", "regions")  # global average (Show and Tell); and a 3x3 grid of regions attended over per word
ENCODER_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101",
                 "resnet152", "inception_v3")
SELECT = ("bleu", "loss", "last")  # which epoch best.safetensors keeps
STORAGES = ("float16", "int8")  # what a model file to ship may use


def option(default, help: str, **flag):
    """A dataclass field that is also a command-line option: `help` is its --help line, `flag` extra
    argparse settings (choices, metavar, nargs)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded, shared by `captioner caption`, `captioner evaluate`, `Captioner` and the demo."""

    beam_size: int = option(10, f"beam width, 1 to {MAX_BEAM}; 1 is greedy decoding, the fastest", lo=1, hi=MAX_BEAM)
    max_len: int = option(20, f"longest caption in words, 1 to {MAX_LEN}", lo=1, hi=MAX_LEN)
    length_penalty: float = option(0.7, "rank the beam's captions by log-probability / length**this "
                                        "(0: raw log-probability, as the paper)")
    rerank: int = option(3, "pick the caption among the beam's N best by its agreement with all the beam's "
                            "captions (consensus reranking); 0 or 1 keeps the most probable one", lo=0, hi=MAX_BEAM)
    rerank_fmean: float = option(0.5, "METEOR's unigram F-mean's share, 0 to 1, of that agreement; the rest "
                                      "is BLEU+1", metavar="W", lo=0.0, hi=1.0)
    block_trigrams: bool = option(True, "never repeat a word trigram within a caption (beam search)")
    block_repeats: bool = option(True, "never repeat a content word within a caption, in the singular or the "
                                        "plural: nouns, verbs, adjectives, not articles, prepositions, colours or "
                                        "numbers (captioner/vocab.py)")
    views: int = option(1, "average the features of N views of each image: 1 the image, 2 and its mirror image, "
                           "6 and its four corner crops (the encoder runs N times)", choices=VIEWS)

    def validate(self) -> "Decoding":
        checks = [(1 <= self.beam_size <= MAX_BEAM, f"beam size must be 1 to {MAX_BEAM}"),
                  (1 <= self.max_len <= MAX_LEN, f"max length must be 1 to {MAX_LEN} words"),
                  (0 <= self.rerank <= MAX_BEAM, f"rerank must be 0 to {MAX_BEAM}"),
                  (math.isfinite(self.length_penalty), "length penalty must be a finite number"),
                  (0.0 <= self.rerank_fmean <= 1.0, "the F-mean's share of the rerank agreement must be 0 to 1"),
                  (self.views in VIEWS, f"views must be one of {', '.join(map(str, VIEWS))}")]
        _check(self, checks)
        return self

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.beam_size == 1:
            how = "greedy"
        else:
            how = f"beam {self.beam_size}, length penalty {self.length_penalty:g}"
            if self.rerank > 1:
                how += f", {min(self.rerank, self.beam_size)} best reranked (F-mean share {self.rerank_fmean:g})"
            how += ", trigram blocking" if self.block_trigrams else ", no trigram blocking"
            how += ", no repeated content word" if self.block_repeats else ""
        return how + (f", {self.views} views" if self.views > 1 else "")


@dataclass
class TrainConfig:
    """One training run (cross-entropy, teacher forcing). `captioner train --help` shows these fields."""

    # data
    data: list[str] | str = option("", "dataset: COCO captions_*.json, Karpathy dataset_*.json, Flickr folder, "
                                       ".csv or .jsonl; repeat it to train on several at once", action="append")
    source_weights: list[float] | None = option(None, "with several --data: each source's share of an epoch's "
                                                      "captions (1 1: balanced); unset: in proportion to their sizes",
                                                nargs="+", metavar="W")
    images: str | None = option(None, "images folder, where the annotations do not say")
    dev_data: str | None = option(None, "separate dataset for the dev split (default: the dev split of --data, "
                                        "else 5%% of training images)")
    limit: int = option(0, "train on the first N training images only, for a quick try (0: all)", lo=0)
    out: str = option("runs/default", "run folder for checkpoints, logs and plots")
    # encoder
    encoder: str = option("efficientnet_lite0", "image encoder", choices=ENCODER_NAMES)
    encoder_weights: str | None = option(None, "local weights file for the encoder (.safetensors or weights-only "
                                               ".pth), for encoders whose weights would otherwise be downloaded")
    fine_tune_blocks: int = option(0, "also train the encoder's last N stages (the maps below them are cached)")
    image_size: int = option(0, "square input size for the encoder (0: its own)")
    pool: str = option("avg", "avg: the feature map's global average (Show and Tell); regions: that and a 3x3 grid "
                              "of regions the decoder attends over at every word", choices=POOLS)
    flip_augment: bool = option(False, "also cache the mirror images' features; training draws a view per caption")
    crop_augment: bool = option(False, "also cache the four corner crops' features (7/8 of each side)")
    # decoder
    embed_dim: int = option(512, "word and image embedding size")
    hidden_dim: int = option(512, "LSTM state size")
    num_layers: int = option(1, "LSTM layers")
    dropout: float = option(0.5, "dropout on embeddings and LSTM outputs")
    att_dropout: float = option(0.5, "dropout on the region vectors attended over (--pool regions)")
    min_count: int = option(5, "words seen fewer times in the training captions become <unk>")
    max_len: int = option(20, "training captions are cut to this many words")
    # optimisation
    batch_size: int = option(64, "captions per training step", lo=1)
    epochs: int = option(20, "most epochs to train", lo=1)
    lr: float = option(1e-3, "peak learning rate (AdamW; linear warmup, then cosine decay)")
    min_lr_ratio: float = option(0.05, "the learning rate at the last step, as a share of the peak")
    warmup_steps: int = option(200, "steps of linear learning-rate warmup", lo=0)
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(5.0, "largest gradient norm (0: no clipping)")
    sample_prob: float = option(0.0, "scheduled sampling: the chance, ramped up from 0 over the epochs, that a "
                                     "word's input is the model's own sampled word (one LSTM layer)")
    ema: float = option(0.0, "keep an exponential moving average of the decoder's weights with this decay per "
                             "step (e.g. 0.999) and score, select and save it (0: off)", metavar="DECAY")
    amp: bool = option(False, "mixed precision: bf16 autocast (fp16 + GradScaler on GPUs without bf16); CPUs "
                              "without bf16 arithmetic train in float32")
    seed: int = option(0, "random seed: initial weights, batch order and views")
    # selection and logging
    select: str = option("bleu", "the epoch kept as best.safetensors: best greedy dev BLEU-4, lowest dev loss, "
                                 "or the last", choices=SELECT)
    patience: int = option(4, "stop after this many epochs without a better selection score")
    dev_images: int = option(0, "dev images scored after each epoch (0: all)", lo=0)
    eval_beam: int = option(1, "beam size of the per-epoch dev scoring", lo=1, hi=MAX_BEAM)
    save_every: int = option(0, "also save resumable state every N steps (0: at epoch ends and on Ctrl-C)", lo=0)
    # machine
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    workers: int = option(2, "image decoding processes", lo=0)
    cache_dir: str | None = option(None, "feature cache folder (default: ~/.cache/captioner/features)")
    stop_after_steps: int = option(0, "stop as if interrupted (Ctrl-C) after N steps in total, state saved, to try "
                                      "--resume (0: never)", lo=0)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise CaptionerError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def sources(self) -> list[str]:
        return self.data if isinstance(self.data, list) else [self.data]

    def validate(self) -> "TrainConfig":
        self.validate_options()
        if isinstance(self.data, list) and len(self.data) == 1:
            self.data = self.data[0]
        if not all(isinstance(x, str) and x for x in self.sources):
            raise CaptionerError(f"option data must be a dataset path or a list of them, got {self.data!r}")
        w = self.source_weights
        if w is not None and not (isinstance(w, list) and len(w) == len(self.sources) and sum(w) > 0 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf for x in w)):
            raise CaptionerError(f"source weights must be {len(self.sources)} number(s) >= 0, one per --data, "
                                 f"not all 0; got {w!r}")
        return self

    def validate_options(self) -> "TrainConfig":
        """Every check but the data's, so that a bad option is named even before the data is given."""
        _check_types(self, skip=("data", "source_weights"))
        checks = [(self.batch_size >= 1, "batch size must be >= 1"), (self.epochs >= 1, "epochs must be >= 1"),
                  (0 < self.lr < math.inf, "learning rate must be > 0"),
                  (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
                  (0 <= self.att_dropout < 1, "attention dropout must be in [0, 1)"),
                  (self.select in SELECT, f"select must be one of {', '.join(SELECT)}, got {self.select!r}"),
                  (self.pool in POOLS, f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}"),
                  (self.encoder in ENCODER_NAMES, f"unknown encoder {self.encoder!r}; choose one of: "
                                                  f"{', '.join(ENCODER_NAMES)}"),
                  (self.min_count >= 1, "min count must be >= 1"), (self.max_len >= 2, "max length must be >= 2"),
                  (self.embed_dim >= 1 and self.hidden_dim >= 1, "sizes must be >= 1"),
                  (0 <= self.sample_prob < 1, "sample prob must be in [0, 1)"),
                  (0 <= self.ema < 1, "ema must be in [0, 1) (0 = off)"),
                  (not (self.ema and self.fine_tune_blocks), "ema averages the decoder only; it cannot be combined "
                                                             "with fine_tune_blocks"),
                  (not self.sample_prob or self.num_layers == 1, "scheduled sampling needs one LSTM layer"),
                  (self.fine_tune_blocks >= 0, "fine-tune blocks must be >= 0"),
                  (self.workers >= 0, "workers must be >= 0"), (self.limit >= 0, "limit must be >= 0"),
                  (self.image_size == 0 or 32 <= self.image_size <= 1024, "image size must be 0 or 32..1024"),
                  (0 <= self.weight_decay < math.inf, "weight decay must be >= 0"),
                  (0 <= self.grad_clip < math.inf, "grad clip must be >= 0 (0 = off)"),
                  (0 <= self.min_lr_ratio <= 1, "min lr ratio must be in [0, 1]"),
                  (self.num_layers >= 1 and self.patience >= 1 and self.eval_beam >= 1,
                   "layers, patience and eval beam must be >= 1"),
                  (self.eval_beam <= MAX_BEAM, f"eval beam must be <= {MAX_BEAM}"),
                  (min(self.warmup_steps, self.save_every, self.dev_images, self.stop_after_steps) >= 0,
                   "warmup steps, save every, dev images and stop after steps must be >= 0")]
        _check(self, checks)
        return self


@dataclass
class ScstConfig:
    """Self-critical sequence training (Rennie et al. 2017) from a cross-entropy checkpoint, rewarded by CIDEr-D."""

    init: str = ""  # cross-entropy checkpoint to start from
    data: list[str] | str = ""
    out: str = "runs/scst"
    images: str | None = None
    epochs: int = 5
    batch_size: int = 32  # images per batch
    samples: int = 5  # captions sampled per image
    lr: float = 2e-5
    max_len: int = 16
    eval_beam: int = 3
    seed: int = 0
    cache_dir: str | None = None
    workers: int = 2
    device: str = "cpu"


@dataclass
class RecipeConfig:
    """What a recipe file (train/*.json) adds to the training options: several seeds, SCST, one bundle."""

    seeds: list[int] = field(default_factory=lambda: [0])  # one cross-entropy run per seed, side by side
    encoders: list[str] | None = None  # one CNN per seed; members reading different CNNs ship as one stack
    scst: dict = field(default_factory=dict)  # ScstConfig fields for the second stage; empty: no SCST
    keep: str = "ensemble"  # "ensemble": all seeds vote; "best": the best seed alone
    storage: str = "float16"  # STORAGES
    name: str = ""  # the bundled model's name, e.g. "captioner-flickr8k-coco"

    KEYS = ("seeds", "encoders", "scst", "keep", "storage", "name")

    @classmethod
    def split(cls, conf: dict, where: str) -> tuple["RecipeConfig", dict]:
        """A recipe file's own keys, and the training options that remain."""
        own = {k: conf[k] for k in cls.KEYS if k in conf}
        if "seeds" not in own:
            own["seeds"] = [conf.get("seed", 0)]
        recipe = cls(**own)
        scst_keys = {f.name for f in fields(ScstConfig)} - {"init", "data", "out", "images", "cache_dir", "workers",
                                                             "device", "seed"}
        checks = [(recipe.keep in ("ensemble", "best"), f'"keep" in {where} must be "ensemble" or "best"'),
                  (recipe.storage in STORAGES, f'"storage" in {where} must be one of {", ".join(STORAGES)}'),
                  (isinstance(recipe.seeds, list) and recipe.seeds and all(isinstance(s, int) for s in recipe.seeds),
                   f'"seeds" in {where} must be a list of whole numbers'),
                  (not set(recipe.scst) - scst_keys, f"unknown scst option(s) in {where}: "
                                                     f"{', '.join(sorted(set(recipe.scst) - scst_keys))}"),
                  (recipe.encoders is None or (isinstance(recipe.encoders, list) and len(recipe.encoders) ==
                                               len(recipe.seeds) and all(e in ENCODER_NAMES for e in recipe.encoders)),
                   f'"encoders" in {where} must name one of {", ".join(ENCODER_NAMES)} per seed')]
        _check(recipe, checks)
        return recipe, {k: v for k, v in conf.items() if k not in cls.KEYS}


def _check(obj, checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise CaptionerError(msg)


def _check_types(obj, skip: tuple[str, ...] = ()) -> None:
    """A config.json can hold anything: each field must have its default's type before values are compared."""
    names = {bool: "true or false", float: "a number", int: "a whole number", str: "a string"}
    for f in fields(obj):
        if f.name in skip or f.default is MISSING:
            continue
        v, d = getattr(obj, f.name), f.default
        if d is None:
            ok = v is None or isinstance(v, str)
        elif isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, type(d)) and not isinstance(v, bool)
        if not ok:
            raise CaptionerError(f"option {f.name} must be {names.get(type(d), 'a string or null')}, got {v!r}")
