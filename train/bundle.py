"""Turn a training run's best checkpoint into the bundled model (float16 weights, same metadata).

    python train/bundle.py runs/f8k/best.safetensors

float16 halves the file (the package ships it) and changes captions only where two words were
within float16 rounding of each other; eval/RESULTS.md scores the bundled file itself.
"""
import argparse
from pathlib import Path

from captioner.inference import BUNDLED_MODEL, load_model, save_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="best.safetensors of a run (or the run folder)")
    p.add_argument("--out", default=str(BUNDLED_MODEL), help="where to write (default: the package's bundled model)")
    args = p.parse_args()
    decoder, vocab, encoder, meta = load_model(args.checkpoint)
    extra = {k: v for k, v in meta.items() if k not in ("decoder", "vocab", "encoder")}
    extra["bundled_from"] = str(args.checkpoint)
    save_model(args.out, decoder, vocab, encoder, extra=extra,
               include_encoder=bool(meta["encoder"].get("weights_included")), half=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
