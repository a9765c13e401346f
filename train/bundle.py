"""Turn training runs' best checkpoints into the bundled model (float16 weights, same metadata).

    python train/bundle.py runs/f8k/best.safetensors                      # one model
    python train/bundle.py runs/s0/best.safetensors runs/s1/best.safetensors  # an ensemble of two

Several checkpoints (same data, vocabulary and encoder; different seeds) become one ensemble that
averages their next-word probabilities. float16 halves the file (the package ships it) and changes
captions only where two words were within float16 rounding of each other; eval/RESULTS.md scores the
bundled file itself.
"""
import argparse
import sys
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.inference import BUNDLED_MODEL, load_model, save_ensemble, save_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="best.safetensors of a run (or the run folder); several = ensemble")
    p.add_argument("--out", default=str(BUNDLED_MODEL), help="where to write (default: the package's bundled model)")
    args = p.parse_args()
    try:
        if len(args.checkpoints) > 1:
            n = save_ensemble(args.out, args.checkpoints, half=True)
            what = f"ensemble of {n}"
        else:
            decoder, vocab, encoder, meta = load_model(args.checkpoints[0])
            extra = {k: v for k, v in meta.items() if k not in ("decoder", "vocab", "encoder")}
            extra["bundled_from"] = str(args.checkpoints[0])
            save_model(args.out, decoder, vocab, encoder, extra=extra,
                       include_encoder=bool(meta["encoder"].get("weights_included")), half=True)
            what = "one model"
    except CaptionerError as e:
        sys.exit(f"bundle: {e}")
    print(f"wrote {args.out} ({what}, {Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
