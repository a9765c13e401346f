"""Training loop, readable top to bottom: data -> vocabulary -> cached features -> epochs -> best checkpoint.

The run folder holds everything: config.json (to repeat the run), metrics.jsonl and curves.png, best.safetensors
(the model with the best dev BLEU-4, from real greedy decoding), state.safetensors (model, optimizer, RNG and
position, for --resume) and bad_images.txt when some images could not be read. With --ema, best.safetensors is
the weights' moving average and best_raw.safetensors the trained weights' own best epoch.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .checkpoint import (atomic_write_bytes, atomic_write_text, first_problem, load_tensors, prefixed,
                         prepare_out_dir, remove_stale_temp_files, save_tensors)
from .data import Dataset, Record, load_dataset, load_sources
from .decoding import greedy, beam_search
from .defaults import MAX_BEAM
from .distributed import autocast, ddp_loss, features_on_device, setup as dist_setup, to_device
from .encoders import CROPS, DEFAULT_ENCODER, Encoder, Trunk, TunedTop, attended_regions, create_encoder
from .errors import CaptionerError
from .features import FeatureRows, FeatureSet, extract_features
from .inference import save_model
from .memory import trim_if_due
from .metrics import bleu
from .model import NO_CONCEPT, DecoderConfig, ShowAndTell
from .vocab import Vocabulary


# Keys of a recipe config (train/recipe.py) that are not options of one run; `--config` passes over them.
RECIPE_KEYS = ("seeds", "encoders", "scst", "keep", "storage")
# Which epoch best.safetensors keeps (and early stopping watches): the best greedy dev BLEU-4, the lowest dev
# loss, or simply the last. Greedy BLEU-4 on 1000 images moves 1-2 points between epochs: it twice picked
# epoch 3-4 of 10, and SCST from there scored 0.5 METEOR and 3-4.5 CIDEr below SCST from the last epoch; but
# the bundled recipe's epoch-8 pick beat its last epoch by 0.7 BLEU-4 after SCST (eval/RESULTS.md).
SELECT = ("bleu", "loss", "last")


@dataclass
class TrainConfig:
    data: list[str] | str = ""  # one dataset, or several read as one (data.load_sources)
    source_weights: list[float] | None = None  # each source's share of an epoch's captions; None: by size
    out: str = "runs/default"
    images: str | None = None
    dev_data: str | None = None
    encoder: str = DEFAULT_ENCODER
    encoder_weights: str | None = None
    fine_tune_blocks: int = 0
    image_size: int = 0  # 0: the encoder's own input size
    pool: str = "avg"  # encoders.POOLS: "grid" adds the 2x2 quadrants to the global average, "regions" a 3x3
    # grid that the decoder attends over, "regions7" a 7x7 one
    flip_augment: bool = False  # train on mirrored images' features too, picked at random per caption
    crop_augment: bool = False  # and on the four corner crops' features
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    att_dropout: float = 0.5  # on the region vectors (--pool regions)
    att_positions: bool = False  # learned position keys for the regions (--pool regions)
    att_feed: bool = False  # the attended context is the LSTM's next input too (--pool regions)
    tie_words: bool = False  # the output layer scores words against the input embeddings (model.py)
    min_count: int = 5
    max_len: int = 20
    batch_size: int = 64
    epochs: int = 20
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    sample_prob: float = 0.0  # scheduled sampling: chance of feeding the model's own word, ramped up to this
    concept_weight: float = 0.0  # > 0: the image step also reads predicted concepts (words of the image's
    # captions), trained by a bag-of-words loss of this weight beside the captions' (model.py, concept_logits)
    grad_clip: float = 5.0
    patience: int = 4
    select: str = "bleu"  # the epoch kept in best.safetensors: SELECT
    ema: float = 0.0  # > 0: score, select and save an exponential moving average of the decoder's weights (this
    # decay per step); the raw weights' dev scores are logged beside it and their best kept as best_raw.safetensors
    seed: int = 0
    workers: int = 2
    cache_dir: str | None = None
    dev_images: int = 0  # 0 = all dev images for the per-epoch BLEU
    eval_beam: int = 1
    save_every: int = 0  # also save resumable state every N steps (0 = only at epoch ends and on Ctrl-C)
    stop_after_steps: int = 0  # testing aid: behave as if interrupted after N steps in total
    device: str = "cpu"
    amp: bool = False  # mixed precision: bf16 autocast where supported, else fp16 + GradScaler (CUDA)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CaptionerError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> None:
        names = {type(None): "a string or null", bool: "true or false", float: "a number", int: "a whole number",
                 str: "a string"}
        if isinstance(self.data, list) and len(self.data) == 1:
            self.data = self.data[0]
        sources = self.data if isinstance(self.data, list) else [self.data]
        if not all(isinstance(x, str) and x for x in sources):
            raise CaptionerError(f"option data must be a dataset path or a list of them, got {self.data!r}")
        if self.source_weights is not None:
            w = self.source_weights
            if not (isinstance(w, list) and len(w) == len(sources) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf for x in w)
                    and sum(w) > 0):
                raise CaptionerError(f"source weights must be {len(sources)} number(s) >= 0, one per --data, "
                                     f"not all 0; got {w!r}")
        for f in fields(self):  # a config.json can hold anything: types first, so the checks below can compare
            if f.name in ("data", "source_weights"):
                continue
            v, d = getattr(self, f.name), f.default
            ok = ((v is None or isinstance(v, str)) if d is None else isinstance(v, bool) if isinstance(d, bool)
                  else isinstance(v, type(d)) and not isinstance(v, bool) if not isinstance(d, float)
                  else isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok and d is not MISSING:
                raise CaptionerError(f"option {f.name} must be {names.get(type(d), type(d).__name__)}, got {v!r}")
        checks = [(self.batch_size >= 1, "batch size must be >= 1"), (self.epochs >= 1, "epochs must be >= 1"),
                  (self.lr > 0, "learning rate must be > 0"), (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
                  (0 <= self.att_dropout < 1, "attention dropout must be in [0, 1)"),
                  (not self.att_feed or (attended_regions(self.pool) > 0 and self.num_layers == 1),
                   "att_feed needs pool \"regions\" and one LSTM layer"),
                  (self.select in SELECT, f"select must be one of {', '.join(SELECT)}, got {self.select!r}"),
                  (self.min_count >= 1, "min count must be >= 1"), (self.max_len >= 2, "max length must be >= 2"),
                  (self.embed_dim >= 1 and self.hidden_dim >= 1, "sizes must be >= 1"),
                  (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
                  (0 <= self.sample_prob < 1, "sample prob must be in [0, 1)"),
                  (0 <= self.concept_weight < math.inf, "concept weight must be >= 0 (0 = off)"),
                  (0 <= self.ema < 1, "ema must be in [0, 1) (0 = off)"),
                  (not (self.ema and self.fine_tune_blocks), "ema averages the decoder only; it cannot be combined "
                   "with fine_tune_blocks"),
                  (not self.sample_prob or self.num_layers == 1, "scheduled sampling needs one LSTM layer"),
                  (self.fine_tune_blocks >= 0, "fine-tune blocks must be >= 0"), (self.workers >= 0, "workers must be >= 0"),
                  (self.image_size == 0 or 32 <= self.image_size <= 1024, "image size must be 0 or 32..1024"),
                  (math.isfinite(self.lr), "learning rate must be finite"),
                  (0 <= self.weight_decay < math.inf, "weight decay must be >= 0"),
                  (0 <= self.grad_clip < math.inf, "grad clip must be >= 0 (0 = off)"),
                  (0 <= self.min_lr_ratio <= 1, "min lr ratio must be in [0, 1]"),
                  (self.num_layers >= 1 and self.patience >= 1 and self.eval_beam >= 1,
                   "layers, patience and eval beam must be >= 1"),
                  (self.eval_beam <= MAX_BEAM, f"eval beam must be <= {MAX_BEAM}"),
                  (min(self.warmup_steps, self.save_every, self.dev_images, self.stop_after_steps) >= 0,
                   "warmup steps, save every, dev images and stop after steps must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise CaptionerError(msg)
        check_device(self.device)


def check_device(device: str) -> None:
    """One line for a device this machine lacks (torch would fail deep inside training with a traceback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CaptionerError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CaptionerError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CaptionerError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CaptionerError(f"--device {device}: Apple MPS is not available here (use --device cpu)")
    elif dev.type != "cpu":
        raise CaptionerError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")


class Interrupted(Exception):
    pass


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last planned step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _holdout(records: list[Record], seed: int, frac: float = 0.05) -> tuple[list[Record], list[Record]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    n_dev = max(1, int(len(records) * frac))
    dev = {int(i) for i in order[:n_dev]}
    return [r for i, r in enumerate(records) if i not in dev], [r for i, r in enumerate(records) if i in dev]


def epoch_order(sources: list[int], weights: list[float] | None, g: torch.Generator) -> list[int]:
    """One epoch's caption indices: a shuffle of all of them, or with per-source weights that many captions
    of each source (a smaller source's captions repeated, a larger one's cut), shuffled together; an epoch
    keeps its length either way."""
    n = len(sources)
    if not weights:
        return torch.randperm(n, generator=g).tolist()
    by_source: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    total = sum(weights[s] for s in by_source)
    wants = {s: round(n * weights[s] / total) for s in sorted(by_source)}
    wants[max(wants)] += n - sum(wants.values())  # rounding: the epoch keeps exactly n captions
    picked: list[int] = []
    for s, idx in sorted(by_source.items()):
        want = max(0, wants[s])
        reps = [idx[j] for _ in range(-(-want // len(idx))) for j in torch.randperm(len(idx), generator=g).tolist()]
        picked += reps[:want]
    return [picked[j] for j in torch.randperm(len(picked), generator=g).tolist()]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, lengths


def _selection_score(scores: dict, epoch: int, select: str) -> float:
    """What --select compares between epochs: higher is better."""
    return {"bleu": scores["dev_BLEU-4"], "loss": -scores["dev_loss"], "last": epoch}[select]


def _state_tensors(model: ShowAndTell, encoder, optim: torch.optim.Optimizer, fine_tune: bool) -> dict:
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    if fine_tune:
        t.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    for i, st in optim.state_dict()["state"].items():
        for name, v in st.items():
            t[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["rng.torch"] = torch.get_rng_state()
    return t


def _restore_optim(optim: torch.optim.Optimizer, tensors: dict, groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd = optim.state_dict()
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    sd["state"] = state
    optim.load_state_dict(sd)


def optimizer_step(loss: torch.Tensor, optim: torch.optim.Optimizer, params: list[torch.Tensor],
                   scaler=None, grad_clip: float = 0.0) -> None:
    """Backward and one update, shared with eval/gpu_bench.py so that it times the loop we ship."""
    optim.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optim.step()
    else:  # fp16: scaled gradients, unscaled before clipping; steps with inf/nan are skipped
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optim)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optim)
        scaler.update()


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["dev_loss"] for h in history], "o-", label="dev loss")
    a.set_xlabel("epoch"), a.legend(), a.set_title("cross-entropy")
    for n in (1, 4):
        b.plot(ep, [h[f"dev_BLEU-{n}"] for h in history], "o-", label=f"dev BLEU-{n}")
    b.set_xlabel("epoch"), b.legend(), b.set_title("dev BLEU (0-100, real decoding)")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def training_records(cfg: TrainConfig, log=print) -> tuple[Dataset, list[Record], list[Record]]:
    """The dataset, its training records and the dev records that select checkpoints."""
    full = load_sources(cfg.data, images=cfg.images)
    train_recs = [r for r in full.records if r.split == "train"]
    if cfg.dev_data:
        dev_ds = load_sources(cfg.dev_data, images=cfg.images)
        dev_recs = [r for r in dev_ds.records if r.split == "dev"] or dev_ds.records
    else:
        dev_recs = [r for r in full.records if r.split == "dev"]
        if not dev_recs:
            train_recs, dev_recs = _holdout(train_recs, cfg.seed)
            log(f"no dev split in {cfg.data}: holding out {len(dev_recs)} training images for selection")
    if not train_recs:
        raise CaptionerError(f"{cfg.data} has no training images")
    log(full.summary())
    return full, train_recs, dev_recs


def training_encoder(cfg: TrainConfig) -> Encoder:
    encoder = create_encoder(cfg.encoder, weights=cfg.encoder_weights, pool=cfg.pool)
    if cfg.image_size:  # the size travels in the checkpoint with the rest of the preprocessing
        encoder.preprocess = replace(encoder.preprocess, size=cfg.image_size)
    return encoder


def cache_features(cfg: TrainConfig, encoder: Encoder, paths: list[Path], progress: bool = True) -> list[FeatureSet]:
    """Encoder features of `paths` from the disk cache, computing what is missing (see features.py): the
    images as they are, then with --flip-augment their mirror images and with --crop-augment their four corner
    crops (training draws one view per caption and epoch; the checkpoint keeps the plain one). With
    --fine-tune-blocks N the cache holds the maps below the last N stages instead (encoders.Trunk)."""
    plain = encoder.preprocess
    views = [plain] + ([replace(plain, hflip=True)] if cfg.flip_augment else []) + \
        ([replace(plain, crop=c) for c in CROPS] if cfg.crop_augment else [])
    source = Trunk(encoder, cfg.fine_tune_blocks) if cfg.fine_tune_blocks else encoder
    return [extract_features(source, paths, cfg.cache_dir, workers=cfg.workers, progress=progress,
                             weights_tag=str(cfg.encoder_weights or ""), device=cfg.device, preprocess=pre)
            for pre in views]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) training; returns the final summary (best epoch and its dev scores)."""
    cfg.validate()
    out = Path(cfg.out)
    dctx = dist_setup(cfg.device)  # one process, or this rank of a torchrun job (see distributed.py)
    progress = progress and dctx.is_main
    def log(*a) -> None:  # progress bars off (--quiet) still leaves one line per event
        if not dctx.is_main:
            return
        msg = " ".join(str(x) for x in a)
        tqdm.write(msg) if progress else print(msg, flush=True)

    # --- data ---
    full, train_recs, dev_recs = training_records(cfg, log)
    prepare_out_dir(out, "run folder")
    if dctx.is_main:  # a process killed mid-save leaves its temporary file; the real one is intact
        remove_stale_temp_files(out)

    # --- vocabulary (from training captions only; a resumed run keeps its own) ---
    if resume:
        vocab = Vocabulary.load(out / "vocab.json")
    else:
        vocab = Vocabulary.build((c for r in train_recs for c in r.captions), cfg.min_count)
        if len(vocab) == len(Vocabulary.SPECIALS):
            raise CaptionerError(f"no word occurs {cfg.min_count} times in the training captions; lower --min-count")
    if not resume and dctx.is_main:
        atomic_write_text(out / "vocab.json", json.dumps(vocab.to_list()))
        atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    log(f"vocabulary: {len(vocab)} words (min count {cfg.min_count})")

    # --- encoder and cached features ---
    encoder = training_encoder(cfg)
    fine_tune = cfg.fine_tune_blocks > 0
    paths = [r.image for r in train_recs + dev_recs]
    if fine_tune and cfg.fine_tune_blocks > len(encoder.stages):
        raise CaptionerError(f"--fine-tune-blocks {cfg.fine_tune_blocks}: {cfg.encoder} has {len(encoder.stages)} stages")
    with dctx.local_main_first():  # one process per machine fills the cache, the others then read it
        fs, *others = cache_features(cfg, encoder, paths, progress)
    if fs.bad and dctx.is_main:
        lines = [f"{len(fs.bad)} images could not be read and were skipped:"] + [f"{p}\t{m}" for p, m in fs.bad.items()]
        atomic_write_text(out / "bad_images.txt", "\n".join(lines) + "\n")
        log(f"skipped {len(fs.bad)} unreadable images (listed in {out / 'bad_images.txt'})")
    # View v's rows start at v * len(paths); an image unreadable in any view is left out of all. Rows stay
    # float16 as cached, widened batch by batch. On the CPU they are read from the cache files as needed
    # (FeatureRows); a GPU gets the whole table. Fine-tuning caches the maps below its stages instead.
    if cfg.device != "cpu":
        feats = torch.from_numpy(np.concatenate([np.asarray(v.features) for v in (fs, *others)]))
    else:
        feats = FeatureRows([fs, *others])
    valid = np.logical_and.reduce([v.valid_mask() for v in (fs, *others)])
    n_train = len(train_recs)
    train_rows = [i for i in range(n_train) if valid[i]]
    dev_rows = [n_train + i for i in range(len(dev_recs)) if valid[n_train + i]]
    if cfg.dev_images:
        dev_rows = dev_rows[: cfg.dev_images]
    feats = features_on_device(feats, cfg.device, log)

    # Caption-level training items: (feature row, token ids); empty captions skipped, long ones cut.
    def items(rows: list[int], recs: list[Record], base: int) -> list[tuple[int, list[int]]]:
        out_items = []
        for row in rows:
            for c in recs[row - base].captions:
                ids = vocab.encode(c)
                if len(ids) > 2:
                    out_items.append((row, ids[: cfg.max_len + 1] + ([vocab.end_id] if len(ids) > cfg.max_len + 1 else [])))
        return out_items
    train_items = items(train_rows, train_recs, 0)
    item_sources = [train_recs[row].source for row, _ in train_items]
    # --concept-weight: each training image's bag of words (every caption's, specials aside), as column ids
    bags = {row: sorted({i - NO_CONCEPT for c in train_recs[row].captions for i in vocab.encode(c) if i >= NO_CONCEPT})
            for row in train_rows} if cfg.concept_weight else {}
    dev_items = items(dev_rows, dev_recs, n_train)
    dev_refs = [dev_recs[r - n_train].captions for r in dev_rows]
    if not train_items:
        raise CaptionerError("no usable training captions")

    # --- model and optimiser ---
    torch.manual_seed(cfg.seed)  # here, not earlier: building the feature cache draws from the global RNG
    model = ShowAndTell(DecoderConfig(len(vocab), encoder.dim, cfg.embed_dim, cfg.hidden_dim, cfg.num_layers,
                                      cfg.dropout, attended_regions(cfg.pool),
                                      att_dropout=cfg.att_dropout, att_positions=cfg.att_positions,
                                      att_feed=cfg.att_feed, concepts=cfg.concept_weight > 0,
                                      tie_words=cfg.tie_words)).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr_scale": 1.0}]
    if fine_tune:  # the CNN's top stages learn too, 10x more gently than the fresh decoder
        encoder.to(cfg.device).freeze(cfg.fine_tune_blocks)
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
        groups.append({"params": enc_params, "lr_scale": 0.1})
        params = params + enc_params
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    top = TunedTop(Trunk(encoder, cfg.fine_tune_blocks)) if fine_tune else None
    # --ema: a copy of the decoder that trails the trained weights, updated after every step; it is what the dev
    # split scores and best.safetensors keeps, because it averages out the last epochs' noise
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None

    def feature_batch(rows: list[int]) -> torch.Tensor:  # cached rows (float16) on the device, widened
        return to_device(feats[rows], cfg.device).float()

    def bag_batch(items_: list[int]) -> torch.Tensor | None:
        if not bags:
            return None
        out_bags = torch.zeros(len(items_), len(vocab) - NO_CONCEPT)
        for j, i in enumerate(items_):
            out_bags[j, bags[train_items[i][0]]] = 1.0
        return to_device(out_bags, cfg.device)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    st = {"epoch": 0, "batch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0,
          "history": [], "train_loss_sum": 0.0, "train_loss_n": 0}
    if resume:
        tensors, meta = load_tensors(out / "state.safetensors")
        try:
            model.load_state_dict(prefixed(tensors, "model."))
            if fine_tune:
                encoder.load_state_dict(prefixed(tensors, "encoder."))
            _restore_optim(optim, tensors, meta["param_groups"])
            torch.set_rng_state(tensors["rng.torch"])
            st = meta["progress"]
            ema_saved = prefixed(tensors, "ema.")
            if averaged is not None and ema_saved:
                averaged.load_state_dict(ema_saved)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CaptionerError(f"{out / 'state.safetensors'} does not fit this run's vocab.json and config.json "
                                 f"({first_problem(e)})") from None
        log(f"resuming at epoch {st['epoch'] + 1}, batch {st['batch']} (step {st['step']})")
        if averaged is not None and not ema_saved:
            log("--ema: the saved state has no average yet; it starts from the weights as they are now")
    ddp = dctx.wrap(model, cfg.device)  # the model itself with one process
    top_fwd = dctx.wrap(top, cfg.device) if fine_tune else None
    amp, scaler = autocast(cfg.device, cfg.amp)  # a null context and no scaler unless --amp
    if cfg.amp and not isinstance(amp, torch.autocast):  # autocast's one fallback: a CPU that emulates bf16
        log("--amp: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX) and would emulate it, about 20x "
            "slower than float32 a step, so training runs in float32")

    def save_state() -> None:
        if not dctx.is_main:
            return
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim.state_dict()["param_groups"]]
        tensors = _state_tensors(model, encoder, optim, fine_tune)
        if averaged is not None:
            tensors.update({f"ema.{k}": v for k, v in averaged.state_dict().items()})
        save_tensors(out / "state.safetensors", tensors, {"progress": st, "param_groups": groups, "config": asdict(cfg)})

    def save_pick(m: ShowAndTell, name: str, epoch: int, scores: dict) -> None:
        save_model(out / name, m, vocab, encoder, extra={"train": {
            "epoch": epoch, "dev": {k: v for k, v in scores.items() if k.startswith("dev_BLEU")}, "config": asdict(cfg)}})

    @torch.inference_mode()
    def evaluate(m: ShowAndTell) -> dict:
        was_training = m.training
        m.eval()
        dev_batch = feature_batch
        if fine_tune:  # the tuned stages changed: the dev images' features, once
            encoder.eval()
            pooled = torch.cat([top(feature_batch(dev_rows[i:i + 64])) for i in range(0, len(dev_rows), 64)])
            at = {r: j for j, r in enumerate(dev_rows)}
            dev_batch = lambda rows: pooled[[at[r] for r in rows]]  # noqa: E731
        losses, n = 0.0, 0
        for i in range(0, len(dev_items), 256):
            rows, seqs = zip(*dev_items[i:i + 256])
            caps, lens = _pad(list(seqs))
            logits, targets = m(dev_batch(list(rows)), caps.to(cfg.device), lens)
            losses += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n += targets.numel()
        hyps = []
        for i in range(0, len(dev_rows), 256):
            f = dev_batch(dev_rows[i:i + 256])
            if cfg.eval_beam > 1:
                hs = [h[0] for h in beam_search(m, f, vocab, cfg.eval_beam, cfg.max_len)]
            else:
                hs = greedy(m, f, vocab, cfg.max_len)
            hyps += [vocab.decode(h.tokens) for h in hs]
        m.train(was_training)
        encoder.train(fine_tune)
        return {"dev_loss": losses / max(n, 1), **{f"dev_{k}": v for k, v in bleu(hyps, dev_refs).items()},
                "dev_example": hyps[0] if hyps else ""}

    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up at once (the last saved state stays valid)
            raise KeyboardInterrupt
        stop["flag"] = True
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    model.train()
    encoder.train(fine_tune)
    t_start = time.time()
    finished = False
    try:
        while st["epoch"] < cfg.epochs:
            epoch = st["epoch"]
            g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            order = epoch_order(item_sources, cfg.source_weights, g)
            views = torch.randint(0, len(others) + 1, (len(train_items),), generator=g).tolist() if others else None
            bar = tqdm(total=steps_per_epoch, initial=st["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not progress, dynamic_ncols=True)
            t_epoch, n_caps = time.time(), 0
            sample_prob = cfg.sample_prob * epoch / max(cfg.epochs - 1, 1)  # 0 in the first epoch, full in the last
            for b in range(st["batch"], steps_per_epoch):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                mine = dctx.shard(idx) or idx[:1]  # DDP: a rank left out of a short last batch adds 0 x one item
                rows = [train_items[i][0] + (views[i] * len(paths) if views else 0) for i in mine]
                caps, lens = _pad([train_items[i][1] for i in mine])
                for grp in optim.param_groups:
                    grp["lr"] = _lr_at(cfg, st["step"], total_steps) * grp["lr_scale"]
                with amp:
                    f = top_fwd(feature_batch(rows)).float() if fine_tune else feature_batch(rows)
                    if dctx.enabled:
                        loss = ddp_loss(ddp, f, to_device(caps, cfg.device), lens, cfg.label_smoothing,
                                        sum(len(train_items[i][1]) - 1 for i in idx), dctx.world,
                                        weight=float(bool(dctx.shard(idx))), sample_prob=sample_prob,
                                        bags=bag_batch(mine), concept_weight=cfg.concept_weight)
                    else:
                        loss = model.loss(f, to_device(caps, cfg.device), lens, cfg.label_smoothing, sample_prob,
                                          bag_batch(mine), cfg.concept_weight)
                optimizer_step(loss, optim, params, scaler, cfg.grad_clip)
                if averaged is not None:
                    averaged.update_parameters(model)
                loss_value, halt = loss.item(), False
                if dctx.enabled:  # the global batch's mean loss; every rank stops when any one was interrupted
                    loss_value, halt = dctx.sum([loss_value, float(stop["flag"])], cfg.device)
                    loss_value, halt = loss_value / dctx.world, halt > 0
                st["batch"], st["step"] = b + 1, st["step"] + 1
                st["train_loss_sum"] += loss_value
                st["train_loss_n"] += 1
                n_caps += len(idx)
                bar.update(1)
                if cfg.device == "cpu":
                    trim_if_due(st["step"])
                bar.set_postfix(loss=f"{loss_value:.3f}", caps_s=f"{n_caps / max(time.time() - t_epoch, 1e-9):.0f}")
                if cfg.save_every and st["step"] % cfg.save_every == 0:
                    save_state()
                if cfg.stop_after_steps and st["step"] >= cfg.stop_after_steps:
                    stop["flag"] = halt = True
                if halt if dctx.enabled else stop["flag"]:
                    raise Interrupted
            bar.close()
            # --- end of epoch: evaluate with real decoding, keep the best, maybe stop early ---
            kept_model = averaged.module if averaged is not None else model
            scores = dctx.broadcast(evaluate(kept_model) if dctx.is_main else None)  # DDP: rank 0 decodes the dev split
            raw = dctx.broadcast(evaluate(model) if dctx.is_main else None) if averaged is not None else {}
            row = {"epoch": epoch + 1, "step": st["step"], "lr": optim.param_groups[0]["lr"],
                   "train_loss": st["train_loss_sum"] / max(st["train_loss_n"], 1),
                   **({"sample_prob": sample_prob} if cfg.sample_prob else {}),
                   "epoch_seconds": round(time.time() - t_epoch, 1), **scores,
                   **{f"raw_{k}": v for k, v in raw.items() if k != "dev_example"}}
            st["history"].append(row)
            score = _selection_score(scores, epoch + 1, cfg.select)
            improved = st["best_epoch"] == 0 or score > st["best_score"]
            if improved:
                st["best_score"], st["best_epoch"], st["bad_epochs"] = score, epoch + 1, 0
                if dctx.is_main:
                    save_pick(kept_model, "best.safetensors", epoch + 1, scores)
            else:
                st["bad_epochs"] += 1
            if raw:  # the raw weights' own pick, for comparison with the average
                raw_score = _selection_score(raw, epoch + 1, cfg.select)
                if "best_raw_score" not in st or raw_score > st["best_raw_score"]:
                    st["best_raw_score"] = raw_score
                    if dctx.is_main:
                        save_pick(model, "best_raw.safetensors", epoch + 1, raw)
            log(f"epoch {epoch + 1}: train loss {row['train_loss']:.3f}, dev loss {row['dev_loss']:.3f}, "
                f"dev BLEU-4 {scores['dev_BLEU-4']:.2f}{' (best)' if improved else ''}"
                + (f" (raw weights: {raw['dev_loss']:.3f}, {raw['dev_BLEU-4']:.2f})" if raw else "")
                + f"; e.g. \"{scores['dev_example']}\"")
            st.update(epoch=epoch + 1, batch=0, train_loss_sum=0.0, train_loss_n=0)
            if dctx.is_main:
                atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in st["history"]))
                plot_curves(st["history"], out / "curves.png")
            if st["bad_epochs"] >= cfg.patience:
                log(f"early stop: dev {'loss' if cfg.select == 'loss' else 'BLEU-4'} has not improved for "
                    f"{cfg.patience} epochs")
                st["epoch"] = cfg.epochs
            save_state()
        finished = True
    except (Interrupted, KeyboardInterrupt):
        save_state()
        raise Interrupted(f"interrupted at epoch {st['epoch'] + 1}, batch {st['batch']}; state saved, continue "
                          f"with: captioner train --resume {out}") from None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        ddp = top_fwd = None  # the DDP wrappers hold the process group: release them before leaving it
        dctx.close(sync=finished)
        if isinstance(feats, FeatureRows):
            feats.close()
    kept = st["history"][st["best_epoch"] - 1] if st["best_epoch"] else {}
    summary = {"best_epoch": st["best_epoch"], "best_dev_BLEU-4": kept.get("dev_BLEU-4", -1.0), "select": cfg.select,
               "epochs_run": len(st["history"]), "seconds": round(time.time() - t_start, 1),
               "checkpoint": str(out / "best.safetensors")}
    if dctx.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def resume_config(run_dir: str | Path) -> TrainConfig:
    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "state.safetensors").is_file():
        raise CaptionerError(f"{run} is not a resumable run folder (needs config.json and state.safetensors)")
    try:
        d = json.loads((run / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{run / 'config.json'} is malformed JSON ({e.msg})") from None
    cfg = TrainConfig.from_dict(d)
    cfg.out = str(run)
    cfg.stop_after_steps = 0  # the simulated interruption happened; continuing must not stop there again
    return cfg
