"""The `captioner` command: caption, train. Plain argparse, sensible defaults, one-line errors."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields

from .defaults import (BEAM_SIZE, BLOCK_TRIGRAMS, LENGTH_PENALTY, MAX_BEAM, MAX_LEN, PRECISION, PRECISIONS, RERANK,
                       RERANK_FMEAN)

PRECISION_HELP = ("decoder weights in the decoding step: auto = int8 on x86 CPUs (1.9-2.4x the captions/s "
                  "batched and 2.6-2.9x faster one-image captioning than float32, BLEU-4 within 0.1), else bfloat16 "
                  "where the CPU has it in hardware, else float32, as on GPUs (default: auto)")
VIEWS_HELP = ("average the features of N views of each image: 1 the image, 2 and its mirror image, 6 and its four "
              "corner crops (the encoder runs N times; for models trained with --flip-augment --crop-augment, "
              "such as the bundled one; default: 1)")
RERANK_HELP = (f"pick the caption among the beam's N best by its agreement (BLEU+1 and METEOR's unigram F-mean) "
               f"with all the beam's results, "
               f"not by probability alone; 0 or 1 = off (default: {RERANK}, chosen on Flickr8k dev)")
RERANK_FMEAN_HELP = ("the share, 0 to 1, of METEOR's unigram F-mean in that agreement, the rest BLEU+1: a larger "
                     f"share picks captions that cover more of the words the beam's results share (default: "
                     f"{RERANK_FMEAN:g}, chosen on Flickr8k dev)")
BLOCK_HELP = ("no caption repeats a word trigram, as in 'a man in a cowboy hat and a cowboy hat' (beam search; "
              f"--no-block-trigrams allows it; default: {'on' if BLOCK_TRIGRAMS else 'off'}, chosen on Flickr8k dev)")
from .errors import CaptionerError


def _int_at_least(low: int, high: int | None = None):
    """argparse type: a whole number >= low (and <= high), with a one-line message otherwise."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if v < low or high is not None and v > high:
            bound = f">= {low}" if high is None else f">= {low} and <= {high}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {v}")
        return v
    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)
_beam_int, _rerank_int, _len_int = _int_at_least(1, MAX_BEAM), _int_at_least(0, MAX_BEAM), _int_at_least(1, MAX_LEN)


def _finite_float_at_least(low: float | None = None):
    """argparse type: a finite number (>= low), with a one-line message otherwise."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or low is not None and v < low:
            raise argparse.ArgumentTypeError(f"expected a finite number{'' if low is None else f' >= {low:g}'}, got {s}")
        return v
    return parse


_finite_float, _nonneg_float = _finite_float_at_least(), _finite_float_at_least(0)


def _share(s: str) -> float:
    """argparse type: a number from 0 to 1."""
    v = _nonneg_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {s}")
    return v


def cmd_caption(args: argparse.Namespace) -> int:
    from .images import ImageError
    from .inference import Captioner
    from .train import check_device
    check_device(args.device)
    cap = Captioner.load(args.model, device=args.device, precision=args.precision)
    results, failed = [], 0
    for path in args.images:
        try:
            c = cap.caption_full([path], beam_size=args.beam_size, max_len=args.max_len, n_best=args.n_best,
                                 length_penalty=args.length_penalty, views=args.views, rerank=args.rerank,
                                 block_trigrams=args.block_trigrams, rerank_fmean=args.rerank_fmean)[0]
        except ImageError as e:
            failed += 1
            print(f"captioner: error: {e}", file=sys.stderr)
            continue
        results.append((path, c))
        if not args.json:
            print(f"{path}\t{c.text}" if len(args.images) > 1 else c.text)
            if args.n_best > 1:
                for text, lp in c.alternatives:
                    print(f"    {lp:8.3f}  {text}")
    if args.json:
        print(json.dumps([{"image": p, "caption": c.text, "logprob": round(c.logprob, 4),
                           **({"alternatives": [{"caption": t, "logprob": round(lp, 4)} for t, lp in c.alternatives]}
                              if args.n_best > 1 else {})} for p, c in results], indent=2))
    return 1 if failed else 0


def _given(args: argparse.Namespace, flag: str) -> bool:
    """Was this flag typed (so it overrides --config / stage defaults)?"""
    return any(a == flag or a.startswith(flag + "=") for a in args.argv)


def cmd_scst(args: argparse.Namespace) -> int:
    from .scst import ScstConfig, train_scst
    if not args.init or not args.data:
        raise CaptionerError("--scst needs --init CKPT (a cross-entropy model) and --data")
    from .train import check_device
    check_device(args.device)
    d = ScstConfig()
    cfg = ScstConfig(init=args.init, data=args.data, out=args.out, images=args.images,
                     epochs=args.epochs if _given(args, "--epochs") else d.epochs,
                     batch_size=args.batch_size if _given(args, "--batch-size") else d.batch_size,
                     lr=args.lr if _given(args, "--lr") else d.lr, samples=args.samples,
                     eval_beam=args.eval_beam if _given(args, "--eval-beam") else d.eval_beam, seed=args.seed,
                     meteor_weight=args.meteor_weight, xe_weight=args.xe_weight,
                     cache_dir=args.cache_dir, workers=args.workers, device=args.device)
    summary = train_scst(cfg, progress=not args.quiet)
    print(f"best dev BLEU-4 {summary['best_dev_BLEU-4']:.2f}; model: {summary['checkpoint']} ({summary['seconds']:.0f}s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .memory import limit_onednn_cache
    limit_onednn_cache()  # first thing: oneDNN reads it once, when it makes its first kernel
    from .train import RECIPE_KEYS, Interrupted, TrainConfig, resume_config, train
    if args.scst:
        return cmd_scst(args)
    if args.resume:
        cfg = resume_config(args.resume)
    else:
        d = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
        if args.config:
            try:
                with open(args.config, encoding="utf-8") as f:
                    base = json.load(f)
            except OSError as e:
                raise CaptionerError(f"cannot read --config {args.config}: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise CaptionerError(f"--config {args.config} is malformed JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise CaptionerError(f"--config {args.config} is not a UTF-8 text file") from None
            if not isinstance(base, dict):
                raise CaptionerError(f"--config {args.config} must hold a JSON object of options, "
                                     f"not a {type(base).__name__}")
            base = {k: v for k, v in base.items() if k not in RECIPE_KEYS}
            explicit = {k: v for k, v in d.items() if _given(args, f"--{k.replace('_', '-')}")}
            if args.data:
                explicit["data"] = args.data
            d = {**d, **base, **explicit}
        if not d.get("data"):
            raise CaptionerError("--data is required (or --resume RUN_DIR, or a --config that names it)")
        cfg = TrainConfig.from_dict(d)
        if os.path.isfile(os.path.join(cfg.out, "state.safetensors")) and not args.overwrite:
            raise CaptionerError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out}, "
                                 f"or pass --overwrite to start again")
    try:
        summary = train(cfg, resume=bool(args.resume), progress=not args.quiet)
    except Interrupted as e:
        print(f"captioner: {e}", file=sys.stderr)
        return 130
    print(f"best dev BLEU-4 {summary['best_dev_BLEU-4']:.2f} at epoch {summary['best_epoch']}; "
          f"model: {summary['checkpoint']} ({summary['seconds']:.0f}s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .train import check_device
    check_device(args.device)
    res = evaluate(args.model, args.data, args.split, args.beam_size, args.max_len, args.length_penalty,
                   args.out, args.images, args.cache_dir, args.limit, args.workers, progress=not args.quiet,
                   precision=args.precision, device=args.device, views=args.views, rerank=args.rerank,
                   block_trigrams=args.block_trigrams, rerank_fmean=args.rerank_fmean)
    s = res["settings"]
    print(f"{s['images']} images, {s['split']} split, beam {s['beam_size']}, length penalty {s['length_penalty']:g}, "
          f"reranked {s['rerank']} (F-mean share {s['rerank_fmean']:g}), "
          f"{'' if s['block_trigrams'] else 'no '}trigram blocking, "
          f"{s['precision']} decoder weights "
          f"(scores on the 0-100 scale used in papers)")
    for name, value in res["metrics"].items():
        print(f"  {name:<8} {value:6.2f}")
    for note in res["notes"]:
        print(f"  note: {note}")
    if args.out:
        print(f"wrote {args.out}/metrics.json, predictions.json, report.html")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .webapp import run_demo
    return run_demo(args) or 0


def build_parser() -> argparse.ArgumentParser:
    from .encoders import ENCODERS, POOLS, VIEWS
    from .train import SELECT, TrainConfig
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="captioner", description="Show and Tell image captioning.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", help="caption images with a trained model (the bundled one by default)",
                       description="Print one caption per image.")
    c.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, WebP, ...)")
    c.add_argument("--model", help="checkpoint (.safetensors) or run folder; default: the bundled Flickr8k model")
    c.add_argument("--beam-size", type=_beam_int, default=BEAM_SIZE, help=f"beam width, 1 to {MAX_BEAM}; 1 = greedy (default: {BEAM_SIZE})")
    c.add_argument("--n-best", type=_beam_int, default=1, help=f"also list the N best captions, up to {MAX_BEAM} (default: 1)")
    c.add_argument("--max-len", type=_len_int, default=20, help=f"maximum caption length in words, up to {MAX_LEN} (default: 20)")
    c.add_argument("--length-penalty", type=_finite_float, default=LENGTH_PENALTY,
                   help=f"rank beam results by logprob / length**alpha (0 = raw logprob, as the paper; default: "
                        f"{LENGTH_PENALTY}, chosen on Flickr8k dev)")
    c.add_argument("--rerank", type=_rerank_int, default=RERANK, help=RERANK_HELP)
    c.add_argument("--rerank-fmean", type=_share, default=RERANK_FMEAN, metavar="W", help=RERANK_FMEAN_HELP)
    c.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=BLOCK_TRIGRAMS, help=BLOCK_HELP)
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    c.add_argument("--views", type=int, choices=VIEWS, default=1, help=VIEWS_HELP)
    c.add_argument("--precision", choices=PRECISIONS, default=PRECISION, help=PRECISION_HELP)
    c.set_defaults(func=cmd_caption)

    e = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)",
                       description="Decode every image of a split and score the captions against the references "
                                   "(0-100 scale). With --out, also write metrics.json, predictions.json (COCO "
                                   "results format) and report.html.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", help="checkpoint or run folder (default: the bundled model)")
    e.add_argument("--data", required=True, help="dataset path, as for train")
    e.add_argument("--split", default="test", help="train, dev (val) or test")
    e.add_argument("--images", help="images folder, where the annotations do not say")
    e.add_argument("--beam-size", type=_beam_int, default=BEAM_SIZE, help="as for caption")
    e.add_argument("--max-len", type=_len_int, default=20)
    e.add_argument("--length-penalty", type=_finite_float, default=LENGTH_PENALTY, help="as for caption")
    e.add_argument("--rerank", type=_rerank_int, default=RERANK, help="as for caption")
    e.add_argument("--rerank-fmean", type=_share, default=RERANK_FMEAN, metavar="W", help="as for caption")
    e.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=BLOCK_TRIGRAMS,
                   help="as for caption")
    e.add_argument("--precision", choices=PRECISIONS, default=PRECISION, help="as for caption")
    e.add_argument("--out", help="folder for metrics.json, predictions.json and report.html")
    e.add_argument("--limit", type=_nonneg_int, default=0, help="score only the first N images (0 = all)")
    e.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
    e.add_argument("--workers", type=_nonneg_int, default=2, help="image decoding processes")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    e.add_argument("--views", type=int, choices=VIEWS, default=1, help=VIEWS_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    try:
        from .webapp import add_demo_arguments
    except ImportError:
        add_demo_arguments = None
    if add_demo_arguments is not None:
        w = sub.add_parser("demo", help="start the Gradio web demo",
                           description="Start the Gradio web demo: upload a photo, get a caption.")
        add_demo_arguments(w)
        w.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model", description=(
        "Train a Show and Tell model. Encoder features are computed once and cached; after each epoch the dev "
        "split is decoded for real and scored with BLEU-4, the best model is kept as RUN_DIR/best.safetensors. "
        "Ctrl-C saves the exact position (mid-epoch) and --resume continues from it with no batch repeated "
        "or skipped."), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", action="append", help="dataset: COCO captions_*.json, Karpathy dataset_*.json, Flickr "
                   "folder, .csv or .jsonl; repeat it to train on several at once")
    t.add_argument("--source-weights", type=_nonneg_float, nargs="+", metavar="W",
                   help="with several --data: each source's share of an epoch's captions (e.g. 1 1: balanced); "
                        "default: in proportion to their sizes")
    t.add_argument("--out", default=d.out, help="run folder for checkpoints, logs and plots")
    t.add_argument("--images", help="images folder, where the annotations do not say")
    t.add_argument("--dev-data", help="separate dataset for the dev split (default: the dev split of --data, "
                                      "else 5%% of training images)")
    t.add_argument("--config", help="JSON file of training options (e.g. train/flickr8k.json); flags override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run")
    t.add_argument("--scst", action="store_true", help="second stage: self-critical sequence training on CIDEr-D "
                   "from --init CKPT (defaults then: 5 epochs, lr 2e-5, 32 images x --samples per batch, dev beam 3)")
    t.add_argument("--init", help="with --scst: the cross-entropy checkpoint to start from")
    t.add_argument("--samples", type=_beam_int, default=5, help="with --scst: captions sampled per image")
    t.add_argument("--meteor-weight", type=_nonneg_float, default=0.0,
                   help="with --scst: reward CIDEr-D + this x METEOR (needs Java; default 0: CIDEr-D alone)")
    t.add_argument("--xe-weight", type=_nonneg_float, default=0.0,
                   help="with --scst: add this x the references' cross-entropy (summed per caption) to the "
                        "policy loss, which keeps the captions' length (default 0: the policy loss alone)")
    t.add_argument("--encoder", choices=list(ENCODERS), default=d.encoder, help="image encoder")
    t.add_argument("--encoder-weights", help="local weights file for the encoder (.safetensors or weights-only .pth)")
    t.add_argument("--fine-tune-blocks", type=_nonneg_int, default=d.fine_tune_blocks,
                   help="also train the encoder's last N stages: the maps below them are cached once per view, "
                        "and the checkpoint carries the N stages' weights")
    t.add_argument("--image-size", type=_nonneg_int, default=d.image_size,
                   help="square input size for the encoder (default 0: its own, 224 for efficientnet_lite0)")
    t.add_argument("--pool", choices=list(POOLS), default=d.pool,
                   help="avg: the feature map's global average (Show and Tell); grid: that, then its 2x2 quadrants' "
                        "averages (5x the features); regions: the average, then a 3x3 grid of region averages that "
                        "the decoder attends over at every word (10x the features); regions7: the same with a 7x7 grid "
                        "(50x the features)")
    t.add_argument("--flip-augment", action="store_true",
                   help="also cache mirrored images' features and train on either view at random (extraction 2x)")
    t.add_argument("--crop-augment", action="store_true",
                   help="also cache the four corner crops' features (7/8 of each side) and train on any view at random "
                        "(extraction 5x, or 6x with --flip-augment)")
    t.add_argument("--embed-dim", type=_positive_int, default=d.embed_dim)
    t.add_argument("--hidden-dim", type=_positive_int, default=d.hidden_dim)
    t.add_argument("--num-layers", type=_positive_int, default=d.num_layers)
    t.add_argument("--dropout", type=float, default=d.dropout)
    t.add_argument("--att-dropout", type=float, default=d.att_dropout,
                   help="dropout on the region vectors the decoder attends over (--pool regions)")
    t.add_argument("--att-positions", action="store_true",
                   help="learn a position key for each grid cell, so attention knows where a region is (--pool regions)")
    t.add_argument("--att-feed", action="store_true",
                   help="feed what attention read back into the LSTM as its next input (--pool regions; one layer; "
                        "training unrolls the LSTM step by step)")
    t.add_argument("--tie-words", action="store_true",
                   help="score words against their input embeddings, through a hidden-to-embedding projection "
                        "(Press & Wolf 2017): fewer weights, one table for reading and writing words")
    t.add_argument("--min-count", type=_positive_int, default=d.min_count, help="words seen fewer times become <unk>")
    t.add_argument("--max-len", type=_positive_int, default=d.max_len, help="captions are cut to this many words")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help="maximum epochs")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW; warmup then cosine decay)")
    t.add_argument("--warmup-steps", type=_nonneg_int, default=d.warmup_steps)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--sample-prob", type=float, default=d.sample_prob,
                   help="scheduled sampling: the chance that a word's input is the model's own sampled word instead of "
                        "the caption's, ramped from 0 in the first epoch to this in the last (one LSTM layer; training "
                        "then unrolls the LSTM word by word)")
    t.add_argument("--concept-weight", type=_nonneg_float, default=d.concept_weight,
                   help="the image step also reads the words its captions are likely to hold, predicted from the image "
                        "embedding against the word embeddings and trained by a bag-of-words loss of this weight "
                        "beside the captions' (0 = off)")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 = off)")
    t.add_argument("--select", choices=SELECT, default=d.select,
                   help="the epoch kept as best.safetensors: best greedy dev BLEU-4, lowest dev loss, or the last")
    t.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                   help="keep an exponential moving average of the decoder's weights (e.g. 0.999 per step) and score, "
                        "select and save it; the raw weights' dev scores are logged beside it and their best kept as "
                        "RUN_DIR/best_raw.safetensors (0 = off)")
    t.add_argument("--patience", type=_positive_int, default=d.patience,
                   help="stop after this many epochs without a better dev BLEU-4")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--workers", type=_nonneg_int, default=d.workers, help="image decoding processes")
    t.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
    t.add_argument("--dev-images", type=_nonneg_int, default=d.dev_images, help="dev images scored per epoch (0 = all)")
    t.add_argument("--eval-beam", type=_beam_int, default=d.eval_beam, help="beam size for the per-epoch dev BLEU")
    t.add_argument("--save-every", type=_nonneg_int, default=d.save_every, help="also save resumable state every N steps")
    t.add_argument("--stop-after-steps", type=_nonneg_int, default=d.stop_after_steps, help=argparse.SUPPRESS)
    t.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    t.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast (fp16 + GradScaler on GPUs "
                   "without bf16); about 2x faster training steps on CPUs with AVX512-BF16 or AMX; on other "
                   "CPUs, which only emulate bf16, training stays float32")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except CaptionerError as e:
        print(f"captioner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("captioner: error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk while writing
        print(f"captioner: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
