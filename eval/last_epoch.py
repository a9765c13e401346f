"""Write a finished cross-entropy run's last-epoch model as a checkpoint, beside the best-epoch one.

`captioner train` keeps the epoch with the best greedy dev BLEU-4 (best.safetensors); its resumable state
(state.safetensors) holds the last epoch's weights, a fine-tuned encoder's included. This turns them into
a model checkpoint that `captioner evaluate` and `captioner train --scst --init` take, to compare the two
picks. A run trained with --ema writes its average's last epoch (what the run scores and keeps), or with --raw
the trained weights'.

    python eval/last_epoch.py RUN [--out RUN/last.safetensors] [--raw]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.checkpoint import load_tensors, prefixed
from captioner.errors import CaptionerError
from captioner.inference import load_model, save_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a cross-entropy run folder (best.safetensors and state.safetensors)")
    p.add_argument("--out", help="where to write it (default: RUN/last.safetensors)")
    p.add_argument("--raw", action="store_true", help="an --ema run: the trained weights, not their average")
    args = p.parse_args()
    run = Path(args.run)
    try:
        model, vocab, encoder, meta = load_model(run / "best.safetensors")
        tensors, state_meta = load_tensors(run / "state.safetensors")
        averaged = prefixed(tensors, "ema.module.")
        model.load_state_dict(averaged if averaged and not args.raw else prefixed(tensors, "model."))
        tuned = prefixed(tensors, "encoder.")
        if tuned:  # a --fine-tune-blocks run: its encoder's last epoch too (save_model ships what it must)
            encoder.load_state_dict(tuned)
        epoch = state_meta.get("progress", {}).get("epoch", "?")
        out = Path(args.out or run / "last.safetensors")
        save_model(out, model, vocab, encoder, extra={"train": meta.get("train", {}), "last_epoch": epoch})
    except (CaptionerError, RuntimeError) as e:
        print(f"last_epoch: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{out}: the weights after epoch {epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
