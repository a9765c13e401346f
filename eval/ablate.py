"""Ablations of the Flickr8k recipe under one short protocol: each variant changes one option of
train/flickr8k.json, trains for a fixed budget (seed 0, two runs side by side, one core each), and its
best checkpoint is scored on dev with the shipped decoding (beam 3, length penalty 0.5). Prints one markdown table (also OUT/ablations.md).

    python eval/ablate.py                                    # all variants, 8 epochs each, bf16 autocast
    python eval/ablate.py --only baseline label_smoothing    # some of them
    python eval/ablate.py --epochs 20 --no-amp               # the full budget (slow)

The short budget ranks options cheaply; it is not the recipe's final score (eval/RESULTS.md has that).
Finished runs are kept, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from captioner.evaluate import evaluate

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "label_smoothing": ["--label-smoothing", "0.1"],
    "dropout_0.3": ["--dropout", "0.3"],
    "hidden_1024": ["--hidden-dim", "1024"],
    "min_count_3": ["--min-count", "3"],
    "two_layers": ["--num-layers", "2"],
    "lr_2e-3": ["--lr", "0.002"],
    "batch_32": ["--batch-size", "32"],
}
METRICS = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="train/flickr8k.json")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--no-amp", action="store_true", help="train in float32 (about 2x slower on CPU)")
    p.add_argument("--parallel", type=int, default=2, help="runs side by side")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    budget = ["--epochs", str(args.epochs), "--patience", str(args.epochs), "--seed", "0"]
    budget += [] if args.no_amp else ["--amp"]
    commands = {n: ["captioner", "train", "--config", args.config, "--out", str(out / n), *budget, *VARIANTS[n],
                    "--quiet"] for n in names}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.parallel))}
    todo = [n for n in names if not (out / n / "summary.json").is_file()]
    while todo:
        batch, todo = todo[:args.parallel], todo[args.parallel:]
        procs = {n: subprocess.Popen(commands[n] + ["--overwrite"], stdout=open(out / f"{n}.log", "w"),
                                     stderr=subprocess.STDOUT, env=env) for n in batch}
        for n, proc in procs.items():
            if proc.wait() != 0:
                sys.exit(f"ablate: {n} failed; see {out / (n + '.log')}")
    data = json.loads(Path(args.config).read_text())["data"]
    rows = []
    for n in names:
        ev = out / n / "eval-dev-b3" / "metrics.json"
        if not ev.is_file():  # the decoding shipped when these ablations ran: beam 3, length penalty 0.5
            evaluate(out / n / "best.safetensors", data, "dev", beam_size=3, rerank=0, out_dir=ev.parent, progress=False)
        m = json.loads(ev.read_text())
        summary = json.loads((out / n / "summary.json").read_text())
        rows.append((n, " ".join(VARIANTS[n]) or "(train/flickr8k.json as is)", summary["best_epoch"],
                     summary["best_dev_BLEU-4"], [m[k] for k in METRICS]))
    base = {r[0]: r for r in rows}.get("baseline")
    lines = [f"Protocol: `{' '.join(commands[names[0]][:6])} ... {' '.join(budget)}` + the option below; "
             f"{args.parallel} runs side by side; scores: `captioner evaluate --split dev --beam-size 3 --rerank 0` (length penalty 0.5) of the best "
             f"epoch (chosen by greedy dev BLEU-4).", "",
             "| variant | option | best epoch | greedy dev BLEU-4 | " + " | ".join(f"{k} (beam 3)" for k in METRICS)
             + (" | BLEU-4 vs baseline |" if base else " |"),
             "| --- " * (4 + len(METRICS) + (1 if base else 0)) + "|"]
    for n, opt, ep, g, ms in rows:
        delta = f" | {ms[1] - base[4][1]:+.2f} |" if base else " |"
        lines.append(f"| {n} | `{opt}` | {ep} | {g:.2f} | " + " | ".join(f"{v:.2f}" for v in ms) + delta)
    table = "\n".join(lines)
    (out / "ablations.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
