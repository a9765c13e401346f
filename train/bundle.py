"""Turn training runs' best checkpoints into the bundled model (float16 or int8 weights, same metadata).

    python train/bundle.py runs/f8k/best.safetensors                      # one model
    python train/bundle.py runs/s0/best.safetensors runs/s1/best.safetensors  # an ensemble of two

Several checkpoints (same data, vocabulary and encoder; different seeds) become one ensemble that
averages their next-word probabilities. float16 halves the file (the package ships it) and changes
captions only where two words were within float16 rounding of each other; --storage int8 halves it
again (each matrix row scaled to 8-bit integers). eval/RESULTS.md scores the bundled file itself.
"""
import argparse
import sys
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.inference import BUNDLE_STORAGES, BUNDLED_MODEL, bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="best.safetensors of a run (or the run folder); several = ensemble")
    p.add_argument("--out", default=str(BUNDLED_MODEL), help="where to write (default: the package's bundled model)")
    p.add_argument("--storage", choices=BUNDLE_STORAGES, default="float16",
                   help="float16 (default), or int8: each weight matrix's rows scaled to 8-bit integers, about half "
                        "the float16 file; eval/RESULTS.md scores both")
    args = p.parse_args()
    try:
        what = bundle(args.out, args.checkpoints, storage=args.storage)
    except CaptionerError as e:
        sys.exit(f"bundle: {e}")
    print(f"wrote {args.out} ({what}, {Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
