"""The `captioner` command: caption, evaluate, train, demo, info, last-epoch, export.

Plain argparse; the options of `train`, and the decoding options of `caption` and `evaluate`, are generated
from the dataclasses in config.py, so each is defined once. Parsing and --help import no torch: each command
imports what it needs when it runs. Every failure the user can fix is one line, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import MISSING, fields
from typing import Callable

from .config import MAX_BEAM, PRECISIONS, Decoding, RecipeConfig, ScstConfig, TrainConfig
from .errors import CaptionerError


# ------------------------------------------------------------------------------------- option parsing
def _number(kind: type, lo: float | None = None, hi: float | None = None):
    """argparse type: a whole or finite number within [lo, hi], with a one-line message otherwise."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {s!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if kind is float and lo is not None and hi is not None:
                want = f"from {lo:g} to {hi:g}"
            else:
                want = " and ".join(f"{op} {b:g}" for op, b in ((">=", lo), ("<=", hi)) if b is not None)
            raise argparse.ArgumentTypeError(f"expected a number {want}, got {s}")
        return v
    return parse


def _default_text(default) -> str:
    if default is None or default == "" or isinstance(default, bool):
        return ""
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def add_options(parser: argparse.ArgumentParser, cls, typed_only: bool = False) -> None:
    """One flag per field of the dataclass `cls` that has help text. With `typed_only` each flag's default is
    None, so the command can tell what was typed (it overrides a --config file) from what was not."""
    for f in fields(cls):
        help_text = f.metadata.get("help")
        if not help_text:
            continue
        default = f.default if f.default is not MISSING else None
        kw = dict(f.metadata.get("flag", {}))
        bounds = kw.pop("lo", None), kw.pop("hi", None)
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
            help_text += " (default: on)" if default else ""
        elif kw.get("action") != "append":
            kw.setdefault("type", _number(float, *bounds) if isinstance(default, float) or kw.get("nargs") else
                          _number(int, *bounds) if isinstance(default, int) else str)
        if "choices" in kw:
            kw["type"] = type(kw["choices"][0])
        parser.add_argument("--" + f.name.replace("_", "-"), default=None if typed_only else default,
                            help=help_text + _default_text(default), **kw)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that were typed on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def decoding_from(args: argparse.Namespace) -> Decoding:
    return Decoding(**{f.name: getattr(args, f.name) for f in fields(Decoding)}).validate()


# ------------------------------------------------------------------------------------------- commands
def cmd_caption(args: argparse.Namespace) -> int:
    from .images import ImageError
    from .inference import Captioner
    from .train import check_device
    check_device(args.device)
    decoding = decoding_from(args)
    cap = Captioner.load(args.model, device=args.device, precision=args.precision)
    results, failed = [], 0
    for path in args.images:
        try:
            c = cap.caption_full([path], decoding, n_best=args.n_best, attention=bool(args.attention))[0]
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
        if args.attention:
            from pathlib import Path
            from .attention import plot
            out = Path(args.attention)
            if len(args.images) > 1:  # one figure per image: the image's place in the list names it
                out = out.with_name(f"{out.stem}-{len(results) + failed}{out.suffix}")
            plot(path, c.attention, out)
            print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": p, "caption": c.text, "logprob": round(c.logprob, 4),
                           **({"alternatives": [{"caption": t, "logprob": round(lp, 4)} for t, lp in c.alternatives]}
                              if args.n_best > 1 else {})} for p, c in results], indent=2))
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .train import check_device
    check_device(args.device)
    decoding = decoding_from(args)
    res = evaluate(args.model, args.data, args.split, decoding, args.out, args.images, args.cache_dir, args.limit,
                   args.workers, progress=not args.quiet, precision=args.precision, device=args.device,
                   results_file=args.results_file)
    s = res["settings"]
    print(f"{s['model_name']}: {s['images']} images, {s['split']} split, {decoding.describe()}, "
          f"{s['precision']} decoder weights (scores on the 0-100 scale used in papers)")
    for name, value in res["metrics"].items():
        print(f"  {name:<8} {value:6.2f}")
    r = res["repetition"]
    print(f"  captions repeating a content word: {r['repeats']:.1f}% (the references: {r['reference_repeats']:.1f}%); "
          f"degenerate (\"X on a X\", \"eating eating\"): {r['degenerate']}")
    for note in res["notes"]:
        print(f"  note: {note}")
    if args.out:
        print(f"wrote {args.out}/metrics.json, predictions.json, report.html")
    if args.results_file:
        print(f"appended a row to {args.results_file}")
    return 0


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            conf = json.load(f)
    except OSError as e:
        raise CaptionerError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CaptionerError(f"--config {path} is malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"--config {path} is not a UTF-8 text file") from None
    if not isinstance(conf, dict):
        raise CaptionerError(f"--config {path} must hold a JSON object of options, not a {type(conf).__name__}")
    return {k: v for k, v in conf.items() if k not in RecipeConfig.KEYS}  # a recipe file is a config too


def cmd_train(args: argparse.Namespace) -> int:
    from .memory import limit_onednn_cache
    limit_onednn_cache()  # first thing: oneDNN reads it once, when it makes its first kernel
    from .train import Interrupted, resume_config, train
    if args.scst:
        return cmd_scst(args)
    if args.resume:
        cfg = resume_config(args.resume)
    else:
        cfg = TrainConfig.from_dict({**(_read_config(args.config) if args.config else {}), **given(args, TrainConfig)})
        if not cfg.data:
            cfg.validate_options()
            raise CaptionerError("--data is required (or --resume RUN_DIR, or a --config that names it)")
        if os.path.isfile(os.path.join(cfg.out, "state.safetensors")) and not args.overwrite:
            raise CaptionerError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out}, "
                                 f"or pass --overwrite to start again")
    try:
        summary = train(cfg, resume=bool(args.resume), progress=not args.quiet)
    except Interrupted as e:
        print(f"captioner: {e}", file=sys.stderr)
        return 130
    print(f"best dev BLEU-4 {summary['best_dev_BLEU-4']:.2f} at epoch {summary['best_epoch']}; "
          f"model: {summary['checkpoint']} (whole run {summary['seconds']:.0f} s)")
    return 0


def cmd_scst(args: argparse.Namespace) -> int:
    """`train --scst`: the training flags it shares keep SCST's own defaults unless typed."""
    from .scst import train_scst
    from .train import check_device
    if not args.init or not args.data:
        raise CaptionerError("--scst needs --init CKPT (a cross-entropy model) and --data")
    check_device(args.device or "cpu")
    shared = {k: v for k, v in given(args, ScstConfig).items() if k in {f.name for f in fields(ScstConfig)}}
    cfg = ScstConfig(**{**shared, "init": args.init, "samples": args.samples})
    summary = train_scst(cfg, progress=not args.quiet)
    print(f"best dev BLEU-4 {summary['best_dev_BLEU-4']:.2f}; model: {summary['checkpoint']} ({summary['seconds']:.0f}s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .webapp import run_demo
    except ImportError as e:
        raise CaptionerError(f'the demo needs gradio: pip install "captioner[demo]" ({e})') from None
    return run_demo(args) or 0


def cmd_info(args: argparse.Namespace) -> int:
    from .card import describe
    print(describe(args.model))
    return 0


def cmd_last_epoch(args: argparse.Namespace) -> int:
    from .train import last_epoch_model
    out, epoch = last_epoch_model(args.run, args.out, args.raw)
    print(f"{out}: the weights after epoch {epoch}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx
    files = export_onnx(args.model, args.out_dir)
    print(f"wrote {len(files)} files to {args.out_dir}: {', '.join(f.name for f in files)}; caption with "
          f"python -m captioner.onnx_runtime {args.out_dir} IMAGE ...")
    return 0


# --------------------------------------------------------------------------------------------- parser
def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `captioner demo` and `python demo/app.py`, defined once."""
    parser.add_argument("--model", help="checkpoint (.safetensors) or run folder (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves other machines (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload in MB (default: 20)")
    parser.add_argument("--share", action="store_true", help="also serve it on a temporary public gradio.live link")
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint (.safetensors) or run folder (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="decoder weights while decoding: auto is int8 on x86 CPUs, else bfloat16 where the CPU "
                        "has it, else float32 (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioner", description="Show and Tell image captioning.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", help="caption images (with the bundled model by default)",
                       description="Print one caption per image.")
    c.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, WebP, ...)")
    _add_model_options(c)
    add_options(c, Decoding)
    c.add_argument("--n-best", type=_number(int, 1, MAX_BEAM), default=1, help="also list the N best captions with their "
                                                                  "log-probabilities (default: 1)")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.add_argument("--attention", metavar="PNG", help="also draw where the model looked for each word: the photo "
                   "and a heat map per word (models trained with --pool regions, as the bundled one); with "
                   "several images one file each, out.png becoming out-1.png, out-2.png, ... in their order")
    c.set_defaults(func=cmd_caption)

    e = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)",
                       description="Decode every image of a split and score the captions against the references "
                                   "(0-100 scale).")
    e.add_argument("--data", required=True, help="dataset path, as for train")
    e.add_argument("--split", default="test", help="train, dev (or val) or test (default: test)")
    e.add_argument("--images", help="images folder, where the annotations do not say")
    _add_model_options(e)
    add_options(e, Decoding)
    e.add_argument("--out", help="folder for metrics.json, predictions.json (COCO results format) and report.html")
    e.add_argument("--results-file", metavar="CSV", help="append one row (date, commit, model, data, settings, "
                                                         "metrics, images, seconds) to this CSV")
    e.add_argument("--limit", type=_number(int, 0), default=0, help="score only the first N images (default: all)")
    e.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
    e.add_argument("--workers", type=_number(int, 0), default=2, help="image decoding processes (default: 2)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train a model", description=(
        "Train a Show and Tell model. Encoder features are computed once and cached; after each epoch the dev "
        "split is decoded for real and scored, and the selected epoch is kept as RUN_DIR/best.safetensors. "
        "Ctrl-C saves the exact position and --resume continues from it with no batch repeated or skipped."))
    t.add_argument("--config", help="JSON file of training options (e.g. train/flickr8k.json); flags override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--scst", action="store_true", help="second stage: self-critical sequence training on CIDEr-D "
                   "from --init CKPT (its defaults: 5 epochs, lr 2e-5, 32 images x --samples a batch, dev beam 3)")
    t.add_argument("--init", help="with --scst: the cross-entropy checkpoint to start from")
    t.add_argument("--samples", type=_number(int, 1, MAX_BEAM), default=5, help="with --scst: captions sampled per image "
                                                                   "(default: 5)")
    add_options(t, TrainConfig, typed_only=True)
    t.set_defaults(func=cmd_train)

    w = sub.add_parser("demo", help="start the Gradio web demo (pip install \"captioner[demo]\")",
                       description="Start the Gradio web demo: upload a photo, get a caption.")
    add_demo_arguments(w)
    w.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="print a model's card: what it is, its data, recipe and scores",
                       description="Print a model's card (the bundled model by default), or for any checkpoint "
                                   "what it holds.")
    i.add_argument("model", nargs="?", help="checkpoint (.safetensors) or run folder (default: the bundled model)")
    i.set_defaults(func=cmd_info)

    le = sub.add_parser("last-epoch", help="write a run's last epoch as a model file",
                        description="Write the weights of a training run's last epoch (from its resumable "
                                    "state) as a model file beside best.safetensors, the selected epoch.")
    le.add_argument("run", help="a training run folder (best.safetensors and state.safetensors)")
    le.add_argument("--out", help="where to write it (default: RUN/last.safetensors)")
    le.add_argument("--raw", action="store_true", help="an --ema run: the trained weights, not their average")
    le.set_defaults(func=cmd_last_epoch)

    x = sub.add_parser("export", help="write a model as ONNX files that run without torch "
                                      "(pip install \"captioner[onnx]\")",
                       description="Write the model's CNN(s), its decoder's init-state and one-step functions "
                                   "(float32 ONNX), vocab.json and decoding.json (the shipped decoding settings "
                                   "and each CNN's preprocessing) to OUT_DIR; python -m captioner.onnx_runtime "
                                   "OUT_DIR IMAGE ... captions with onnxruntime alone.")
    x.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing; files are replaced)")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: onnx)")
    x.add_argument("--model", help="checkpoint (.safetensors) or run folder (default: the bundled model)")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


def run_reporting_errors(command: Callable[[], int], prog: str = "captioner") -> int:
    """`command()`'s exit status; a failure the user can fix is one line on stderr, never a traceback."""
    try:
        return command()
    except CaptionerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`captioner info | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # e.g. a full disk while writing
        print(f"{prog}: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
