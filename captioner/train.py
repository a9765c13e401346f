"""Training, read top to bottom: data -> vocabulary -> cached features -> model -> epochs -> best checkpoint.

`train(cfg)` is the whole run; its pieces are `prepare_data` (records, vocabulary, cached encoder features,
caption items), `train_one_epoch`, `evaluate` (real decoding of the dev split) and the checkpoint functions.
The run folder holds everything: config.json (to repeat the run), vocab.json, metrics.jsonl and curves.png,
best.safetensors (the selected epoch's model), state.safetensors (model, optimizer, RNG and position, for
--resume) and bad_images.txt when some images could not be read. With --ema, best.safetensors is the
weights' moving average and best_raw.safetensors the trained weights' own best epoch.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .checkpoint import (atomic_write_bytes, atomic_write_text, first_problem, load_tensors, prefixed,
                         prepare_out_dir, remove_stale_temp_files, save_tensors)
from .config import TrainConfig
from .data import Dataset, Record, load_sources
from .decoding import beam_search, greedy
from .distributed import DistContext, autocast, ddp_loss, features_on_device, setup as dist_setup, to_device
from .encoders import CROPS, Encoder, Trunk, TunedTop, attended_regions, create_encoder
from .errors import CaptionerError
from .features import FeatureRows, FeatureSet, extract_features
from .inference import save_model
from .memory import trim_if_due
from .metrics import bleu
from .model import DecoderConfig, ShowAndTell
from .vocab import Vocabulary


class Interrupted(Exception):
    pass


# --------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Cached features and the caption items that index them. Row r of view v is r + v * rows_per_view;
    training rows come first, then the dev rows."""

    feats: FeatureRows | torch.Tensor
    views: int  # cached views per image (the image, its mirror image, its corner crops)
    rows_per_view: int
    train_items: list[tuple[int, list[int]]]  # (feature row, token ids) per caption
    item_sources: list[int]  # which --data source each training item came from
    dev_rows: list[int]
    dev_items: list[tuple[int, list[int]]]
    dev_refs: list[list[str]]
    bad: dict[str, str]  # unreadable images and why

    def batch(self, rows: list[int], device: str) -> torch.Tensor:
        """Cached rows (float16) on the device, widened."""
        return to_device(self.feats[rows], device).float()


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
    if cfg.limit and cfg.limit < len(train_recs):  # a seeded sample, so that every source is represented
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(train_recs), cfg.limit, replace=False))
        train_recs = [train_recs[i] for i in keep]
        log(f"--limit: training on {len(train_recs)} of the training images")
    if cfg.dev_images:
        dev_recs = dev_recs[: cfg.dev_images]
    log(full.summary())
    return full, train_recs, dev_recs


def _holdout(records: list[Record], seed: int, frac: float = 0.05) -> tuple[list[Record], list[Record]]:
    order = np.random.default_rng(seed).permutation(len(records))
    dev = {int(i) for i in order[: max(1, int(len(records) * frac))]}
    return [r for i, r in enumerate(records) if i not in dev], [r for i, r in enumerate(records) if i in dev]


def training_encoder(cfg: TrainConfig) -> Encoder:
    encoder = create_encoder(cfg.encoder, weights=cfg.encoder_weights, pool=cfg.pool)
    if cfg.image_size:  # the size travels in the checkpoint with the rest of the preprocessing
        encoder.preprocess = replace(encoder.preprocess, size=cfg.image_size)
    return encoder


def cache_features(cfg: TrainConfig, encoder: Encoder, paths: list[Path], progress: bool = True) -> list[FeatureSet]:
    """Encoder features of `paths` from the disk cache, computing what is missing (features.py): the images
    as they are, then with --flip-augment their mirror images and with --crop-augment their four corner crops.
    With --fine-tune-blocks N the cache holds the maps below the last N stages instead (encoders.Trunk)."""
    plain = encoder.preprocess
    views = [plain] + ([replace(plain, hflip=True)] if cfg.flip_augment else []) + \
        ([replace(plain, crop=c) for c in CROPS] if cfg.crop_augment else [])
    source = Trunk(encoder, cfg.fine_tune_blocks) if cfg.fine_tune_blocks else encoder
    return [extract_features(source, paths, cfg.cache_dir, workers=cfg.workers, progress=progress,
                             weights_tag=str(cfg.encoder_weights or ""), device=cfg.device, preprocess=pre)
            for pre in views]


def caption_items(rows: list[int], recs: list[Record], base: int, vocab: Vocabulary,
                  max_len: int) -> list[tuple[int, list[int]]]:
    """(feature row, token ids) for each caption of each row's image; empty captions skipped, long ones cut."""
    items = []
    for row in rows:
        for c in recs[row - base].captions:
            ids = vocab.encode(c)
            if len(ids) > 2:
                items.append((row, ids[: max_len + 1] + ([vocab.end_id] if len(ids) > max_len + 1 else [])))
    return items


def prepare_data(cfg: TrainConfig, train_recs: list[Record], dev_recs: list[Record], vocab: Vocabulary,
                 encoder: Encoder, dctx: DistContext, progress: bool, log) -> TrainData:
    paths = [r.image for r in train_recs + dev_recs]
    with dctx.local_main_first():  # one process per machine fills the cache, the others then read it
        sets = cache_features(cfg, encoder, paths, progress)
    bad = sets[0].bad
    # An image unreadable in any view is left out of all. On the CPU rows are read from the cache files as
    # needed (FeatureRows); a GPU gets the whole table.
    if cfg.device != "cpu":
        feats = torch.from_numpy(np.concatenate([np.asarray(v.features) for v in sets]))
    else:
        feats = FeatureRows(sets)
    valid = np.logical_and.reduce([v.valid_mask() for v in sets])
    n_train = len(train_recs)
    train_rows = [i for i in range(n_train) if valid[i]]
    dev_rows = [n_train + i for i in range(len(dev_recs)) if valid[n_train + i]]
    train_items = caption_items(train_rows, train_recs, 0, vocab, cfg.max_len)
    if not train_items:
        raise CaptionerError("no usable training captions")
    return TrainData(features_on_device(feats, cfg.device, log), len(sets), len(paths), train_items,
                     [train_recs[row].source for row, _ in train_items], dev_rows,
                     caption_items(dev_rows, dev_recs, n_train, vocab, cfg.max_len),
                     [dev_recs[r - n_train].captions for r in dev_rows], bad)


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


# -------------------------------------------------------------------------------------------- the run
@dataclass
class Progress:
    """Where the run is; saved in state.safetensors so that --resume continues with no batch repeated."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_raw_score: float | None = None
    history: list[dict] = field(default_factory=list)  # one row per epoch (metrics.jsonl)
    steps: list[list[float]] = field(default_factory=list)  # [step, mean training loss] every few steps
    train_loss_sum: float = 0.0
    train_loss_n: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Run:
    """What one training run holds while it runs: the pieces below read and update it."""

    cfg: TrainConfig
    out: Path
    dctx: DistContext
    data: TrainData
    vocab: Vocabulary
    encoder: Encoder
    model: ShowAndTell
    optim: torch.optim.Optimizer
    params: list[torch.Tensor]
    averaged: AveragedModel | None  # --ema
    top: TunedTop | None  # --fine-tune-blocks: the encoder's trained stages
    progress: Progress
    log: Callable[..., None]
    show_bars: bool
    stop_requested: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train_items) / self.cfg.batch_size)

    @property
    def kept_model(self) -> ShowAndTell:
        """The weights that are scored and saved: the moving average with --ema."""
        return self.averaged.module if self.averaged is not None else self.model


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last planned step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer_step(loss: torch.Tensor, optim: torch.optim.Optimizer, params: list[torch.Tensor],
                   scaler=None, grad_clip: float = 0.0) -> None:
    """Backward and one update (eval/bench.py times this same function on a GPU)."""
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


def train_one_epoch(run: Run, ddp: torch.nn.Module, top_fwd: torch.nn.Module | None, amp, scaler) -> None:
    """The epoch `run.progress.epoch`, from its batch `run.progress.batch` on (a resumed run starts mid-epoch).
    Raises Interrupted after saving nothing: the caller saves the state."""
    cfg, st, data, dctx = run.cfg, run.progress, run.data, run.dctx
    epoch, steps = st.epoch, run.steps_per_epoch
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    order = epoch_order(data.item_sources, cfg.source_weights, g)
    views = torch.randint(0, data.views, (len(data.train_items),), generator=g).tolist() if data.views > 1 else None
    sample_prob = cfg.sample_prob * epoch / max(cfg.epochs - 1, 1)  # 0 in the first epoch, full in the last
    log_every = max(1, steps // 50)
    t0, n_caps = time.time(), 0
    bar = tqdm(total=steps, initial=st.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not run.show_bars, dynamic_ncols=True)
    try:
        for b in range(st.batch, steps):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            mine = dctx.shard(idx) or idx[:1]  # DDP: a rank left out of a short last batch adds 0 x one item
            rows = [data.train_items[i][0] + (views[i] * data.rows_per_view if views else 0) for i in mine]
            caps, lens = _pad([data.train_items[i][1] for i in mine])
            for grp in run.optim.param_groups:
                grp["lr"] = lr_at(cfg, st.step, steps * cfg.epochs) * grp["lr_scale"]
            with amp:
                f = data.batch(rows, cfg.device)
                if top_fwd is not None:
                    f = top_fwd(f).float()
                if dctx.enabled:
                    loss = ddp_loss(ddp, f, to_device(caps, cfg.device), lens,
                                    sum(len(data.train_items[i][1]) - 1 for i in idx), dctx.world,
                                    weight=float(bool(dctx.shard(idx))), sample_prob=sample_prob)
                else:
                    loss = run.model.loss(f, to_device(caps, cfg.device), lens, sample_prob)
            optimizer_step(loss, run.optim, run.params, scaler, cfg.grad_clip)
            if run.averaged is not None:
                run.averaged.update_parameters(run.model)
            loss_value, halt = loss.item(), False
            if dctx.enabled:  # the global batch's mean loss; every rank stops when any one was interrupted
                loss_value, halt = dctx.sum([loss_value, float(run.stop_requested)], cfg.device)
                loss_value, halt = loss_value / dctx.world, halt > 0
            st.batch, st.step = b + 1, st.step + 1
            st.train_loss_sum += loss_value
            st.train_loss_n += 1
            if st.step % log_every == 0:
                st.steps.append([st.step, round(st.train_loss_sum / st.train_loss_n, 4)])
            n_caps += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", caps_s=f"{n_caps / max(time.time() - t0, 1e-9):.0f}")
            if cfg.device == "cpu":
                trim_if_due(st.step)
            if cfg.save_every and st.step % cfg.save_every == 0:
                save_state(run)
            if cfg.stop_after_steps and st.step >= cfg.stop_after_steps:
                run.stop_requested = halt = True
            if halt if dctx.enabled else run.stop_requested:
                raise Interrupted
    finally:
        bar.close()  # before any message: Ctrl-C's line must not land on the bar's


@torch.inference_mode()
def evaluate(run: Run, model: ShowAndTell) -> dict:
    """Dev loss (teacher forcing) and dev BLEU from real decoding (greedy, or --eval-beam)."""
    cfg, data = run.cfg, run.data
    was_training = model.training
    model.eval()
    dev_batch = lambda rows: data.batch(rows, cfg.device)  # noqa: E731
    if run.top is not None:  # the tuned stages changed: the dev images' features, once
        run.encoder.eval()
        pooled = torch.cat([run.top(dev_batch(data.dev_rows[i:i + 64])) for i in range(0, len(data.dev_rows), 64)])
        at = {r: j for j, r in enumerate(data.dev_rows)}
        dev_batch = lambda rows: pooled[[at[r] for r in rows]]  # noqa: E731
    losses, n = 0.0, 0
    for i in range(0, len(data.dev_items), 256):
        rows, seqs = zip(*data.dev_items[i:i + 256])
        caps, lens = _pad(list(seqs))
        logits, targets = model(dev_batch(list(rows)), caps.to(cfg.device), lens)
        losses += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        n += targets.numel()
    hyps = []
    for i in range(0, len(data.dev_rows), 256):
        f = dev_batch(data.dev_rows[i:i + 256])
        if cfg.eval_beam > 1:
            hs = [h[0] for h in beam_search(model, f, run.vocab, cfg.eval_beam, cfg.max_len)]
        else:
            hs = greedy(model, f, run.vocab, cfg.max_len)
        hyps += [run.vocab.decode(h.tokens) for h in hs]
    model.train(was_training)
    run.encoder.train(run.top is not None)
    return {"dev_loss": losses / max(n, 1), **{f"dev_{k}": v for k, v in bleu(hyps, data.dev_refs).items()},
            "dev_example": hyps[0] if hyps else ""}


def selection_score(scores: dict, epoch: int, select: str) -> float:
    """What --select compares between epochs: higher is better."""
    return {"bleu": scores["dev_BLEU-4"], "loss": -scores["dev_loss"], "last": epoch}[select]


def end_of_epoch(run: Run, t_epoch: float) -> None:
    """Score the dev split, keep the selected model, log, and decide on early stopping."""
    cfg, st, dctx = run.cfg, run.progress, run.dctx
    epoch = st.epoch + 1
    scores = dctx.broadcast(evaluate(run, run.kept_model) if dctx.is_main else None)  # rank 0 decodes
    raw = dctx.broadcast(evaluate(run, run.model) if dctx.is_main else None) if run.averaged is not None else {}
    row = {"epoch": epoch, "step": st.step, "lr": run.optim.param_groups[0]["lr"],
           "train_loss": st.train_loss_sum / max(st.train_loss_n, 1),
           **({"sample_prob": cfg.sample_prob * st.epoch / max(cfg.epochs - 1, 1)} if cfg.sample_prob else {}),
           "epoch_seconds": round(time.time() - t_epoch, 1), **scores,
           **{f"raw_{k}": v for k, v in raw.items() if k != "dev_example"}}
    st.history.append(row)
    score = selection_score(scores, epoch, cfg.select)
    improved = st.best_epoch == 0 or score > st.best_score
    if improved:
        st.best_score, st.best_epoch, st.bad_epochs = score, epoch, 0
        save_pick(run, run.kept_model, "best.safetensors", epoch, scores)
    else:
        st.bad_epochs += 1
    if raw:  # the raw weights' own pick, for comparison with the average
        raw_score = selection_score(raw, epoch, cfg.select)
        if st.best_raw_score is None or raw_score > st.best_raw_score:
            st.best_raw_score = raw_score
            save_pick(run, run.model, "best_raw.safetensors", epoch, raw)
    run.log(f"epoch {epoch}: train loss {row['train_loss']:.3f}, dev loss {row['dev_loss']:.3f}, "
            f"dev BLEU-4 {scores['dev_BLEU-4']:.2f}{' (best)' if improved else ''}"
            + (f" (raw weights: {raw['dev_loss']:.3f}, {raw['dev_BLEU-4']:.2f})" if raw else "")
            + f"; e.g. \"{scores['dev_example']}\"")
    st.epoch, st.batch, st.train_loss_sum, st.train_loss_n = epoch, 0, 0.0, 0
    if dctx.is_main:
        atomic_write_text(run.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in st.history))
        plot_curves(st, run.steps_per_epoch, run.out / "curves.png")
    if st.bad_epochs >= cfg.patience:
        run.log(f"early stop: dev {'loss' if cfg.select == 'loss' else 'BLEU-4'} has not improved for "
                f"{cfg.patience} epochs")
        st.epoch = cfg.epochs


# ------------------------------------------------------------------------------------------ checkpoints
def save_pick(run: Run, model: ShowAndTell, name: str, epoch: int, scores: dict) -> None:
    """A model file of one epoch's weights (inference.py reads it)."""
    if run.dctx.is_main:
        save_model(run.out / name, model, run.vocab, run.encoder, extra={"train": {
            "epoch": epoch, "dev": {k: v for k, v in scores.items() if k.startswith("dev_BLEU")},
            "config": asdict(run.cfg)}})


def save_state(run: Run) -> None:
    """Everything --resume needs, written atomically: weights, optimizer, RNG, average and position."""
    if not run.dctx.is_main:
        return
    t = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    if run.top is not None:
        t.update({f"encoder.{k}": v for k, v in run.encoder.state_dict().items()})
    for i, state in run.optim.state_dict()["state"].items():
        for name, v in state.items():
            t[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["rng.torch"] = torch.get_rng_state()
    if run.averaged is not None:
        t.update({f"ema.{k}": v for k, v in run.averaged.state_dict().items()})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optim.state_dict()["param_groups"]]
    save_tensors(run.out / "state.safetensors", t, {"progress": asdict(run.progress), "param_groups": groups,
                                                    "config": asdict(run.cfg)})


def load_state(run: Run) -> None:
    """The inverse of save_state, with a one-line error when the state does not fit this run."""
    path = run.out / "state.safetensors"
    tensors, meta = load_tensors(path)
    try:
        run.model.load_state_dict(prefixed(tensors, "model."))
        if run.top is not None:
            run.encoder.load_state_dict(prefixed(tensors, "encoder."))
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd = run.optim.state_dict()
        for g, saved in zip(sd["param_groups"], meta["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        sd["state"] = state
        run.optim.load_state_dict(sd)
        torch.set_rng_state(tensors["rng.torch"])
        run.progress = Progress.from_dict(meta["progress"])
        ema_saved = prefixed(tensors, "ema.")
        if run.averaged is not None and ema_saved:
            run.averaged.load_state_dict(ema_saved)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CaptionerError(f"{path} does not fit this run's vocab.json and config.json ({first_problem(e)})") from None
    st = run.progress
    run.log(f"resuming at epoch {st.epoch + 1}, batch {st.batch} (step {st.step})")
    if run.averaged is not None and not ema_saved:
        run.log("--ema: the saved state has no average yet; it starts from the weights as they are now")


def last_epoch_model(run_dir: str | Path, out: str | Path | None = None, raw: bool = False) -> tuple[Path, int]:
    """The weights a run's state.safetensors holds after its last epoch as a model file (default
    RUN/last.safetensors), beside best.safetensors, the selected epoch: with --ema the moving average unless
    `raw`, and a fine-tuned encoder's stages too. Returns the file and the epoch."""
    from .inference import load_model
    run_dir = Path(run_dir)
    model, vocab, encoder, meta = load_model(run_dir / "best.safetensors")
    tensors, state_meta = load_tensors(run_dir / "state.safetensors")
    averaged = prefixed(tensors, "ema.module.")
    try:
        model.load_state_dict(averaged if averaged and not raw else prefixed(tensors, "model."))
        tuned = prefixed(tensors, "encoder.")
        if tuned:  # a --fine-tune-blocks run: its encoder's last epoch too (save_model ships what it must)
            encoder.load_state_dict(tuned)
    except RuntimeError as e:
        raise CaptionerError(f"{run_dir / 'state.safetensors'} does not fit its best.safetensors "
                             f"({first_problem(e)})") from None
    epoch = int(state_meta.get("progress", {}).get("epoch", 0))
    out = Path(out or run_dir / "last.safetensors")
    save_model(out, model, vocab, encoder, extra={"train": meta.get("train", {}), "last_epoch": epoch})
    return out, epoch


def plot_curves(st: Progress, steps_per_epoch: int, path: Path) -> None:
    """Training loss every few steps and per epoch, dev loss and dev BLEU per epoch; readable from one epoch on."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    ep = [h["epoch"] for h in st.history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if st.steps:
        a.plot([s / steps_per_epoch for s, _ in st.steps], [v for _, v in st.steps], "-", lw=1, alpha=0.6,
               label="train loss (running mean)")
    a.plot(ep, [h["train_loss"] for h in st.history], "o-", label="train loss (epoch)")
    a.plot(ep, [h["dev_loss"] for h in st.history], "o-", label="dev loss")
    a.set_title("cross-entropy")
    for n in (1, 4):
        b.plot(ep, [h[f"dev_BLEU-{n}"] for h in st.history], "o-", label=f"dev BLEU-{n}")
    b.set_title("dev BLEU (0-100, real decoding)")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.set_xlim(0, max(ep[-1], 1) + 0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ train
def build_model(cfg: TrainConfig, vocab_size: int, encoder: Encoder) -> ShowAndTell:
    return ShowAndTell(DecoderConfig(vocab_size, encoder.dim, cfg.embed_dim, cfg.hidden_dim, cfg.num_layers,
                                     cfg.dropout, attended_regions(cfg.pool), att_dropout=cfg.att_dropout))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) training; returns the summary (selected epoch, its dev BLEU-4, the whole run's time)."""
    t_start = time.time()
    cfg.validate()
    check_device(cfg.device)
    out = Path(cfg.out)
    dctx = dist_setup(cfg.device)  # one process, or this rank of a torchrun job (see distributed.py)
    show_bars = progress and dctx.is_main

    def log(*a) -> None:  # progress bars off (--quiet) still leaves one line per event
        if dctx.is_main:
            msg = " ".join(str(x) for x in a)
            tqdm.write(msg) if show_bars else print(msg, flush=True)

    # data and vocabulary (from training captions only; a resumed run keeps its own)
    _, train_recs, dev_recs = training_records(cfg, log)
    prepare_out_dir(out, "run folder")
    if dctx.is_main:  # a process killed mid-save leaves its temporary file; the real one is intact
        remove_stale_temp_files(out)
    if resume:
        vocab = Vocabulary.load(out / "vocab.json")
    else:
        vocab = Vocabulary.build((c for r in train_recs for c in r.captions), cfg.min_count)
        if len(vocab) == len(Vocabulary.SPECIALS):
            raise CaptionerError(f"no word occurs {cfg.min_count} times in the training captions; lower --min-count")
        if dctx.is_main:
            atomic_write_text(out / "vocab.json", json.dumps(vocab.to_list()))
            atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    log(f"vocabulary: {len(vocab)} words (min count {cfg.min_count})")

    # encoder and cached features
    encoder = training_encoder(cfg)
    if cfg.fine_tune_blocks > len(encoder.stages):
        raise CaptionerError(f"--fine-tune-blocks {cfg.fine_tune_blocks}: {cfg.encoder} has {len(encoder.stages)} stages")
    data = prepare_data(cfg, train_recs, dev_recs, vocab, encoder, dctx, show_bars, log)
    if data.bad and dctx.is_main:
        lines = [f"{len(data.bad)} images could not be read and were skipped:"] + [f"{p}\t{m}" for p, m in data.bad.items()]
        atomic_write_text(out / "bad_images.txt", "\n".join(lines) + "\n")
        log(f"skipped {len(data.bad)} unreadable images (listed in {out / 'bad_images.txt'})")

    # model and optimiser
    torch.manual_seed(cfg.seed)  # here, not earlier: building the feature cache draws from the global RNG
    model = build_model(cfg, len(vocab), encoder).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr_scale": 1.0}]
    top = None
    if cfg.fine_tune_blocks:  # the CNN's top stages learn too, 10x more gently than the fresh decoder
        encoder.to(cfg.device).freeze(cfg.fine_tune_blocks)
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
        groups.append({"params": enc_params, "lr_scale": 0.1})
        params = params + enc_params
        top = TunedTop(Trunk(encoder, cfg.fine_tune_blocks))
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # --ema: a copy of the decoder that trails the trained weights; it averages out the last epochs' noise
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    run = Run(cfg, out, dctx, data, vocab, encoder, model, optim, params, averaged, top, Progress(), log, show_bars)
    if resume:
        load_state(run)
    ddp = dctx.wrap(model, cfg.device)  # the model itself with one process
    top_fwd = dctx.wrap(top, cfg.device) if top is not None else None
    amp, scaler = autocast(cfg.device, cfg.amp)  # a null context and no scaler unless --amp
    if cfg.amp and not isinstance(amp, torch.autocast):  # autocast's one fallback: a CPU that emulates bf16
        log("--amp: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX) and would emulate it, about 20x "
            "slower than float32 a step, so training runs in float32")

    def on_signal(signum, frame):
        if run.stop_requested:  # second Ctrl-C: give up at once (the last saved state stays valid)
            raise KeyboardInterrupt
        run.stop_requested = True
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    model.train()
    encoder.train(top is not None)
    finished = False
    try:
        while run.progress.epoch < cfg.epochs:
            t_epoch = time.time()
            train_one_epoch(run, ddp, top_fwd, amp, scaler)
            end_of_epoch(run, t_epoch)
            save_state(run)
        finished = True
    except (Interrupted, KeyboardInterrupt):
        save_state(run)
        st = run.progress
        raise Interrupted(f"interrupted at epoch {st.epoch + 1}, batch {st.batch}; state saved, continue "
                          f"with: captioner train --resume {out}") from None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        ddp = top_fwd = None  # the DDP wrappers hold the process group: release them before leaving it
        dctx.close(sync=finished)
        if isinstance(data.feats, FeatureRows):
            data.feats.close()
    st = run.progress
    kept = st.history[st.best_epoch - 1] if st.best_epoch else {}
    summary = {"best_epoch": st.best_epoch, "best_dev_BLEU-4": kept.get("dev_BLEU-4", -1.0), "select": cfg.select,
               "epochs_run": len(st.history), "seconds": round(time.time() - t_start, 1),
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


