"""`python demo/app.py [--model CKPT] [--host H] [--port P] [--max-upload-mb N] [--share]`: the web demo.

The same app as `captioner demo`; this file exists so a checkout (or a Hugging Face Space) can start it
without installing the package's console script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from captioner.errors import CaptionerError  # noqa: E402
from captioner.cli import add_demo_arguments  # noqa: E402
from captioner.webapp import run_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser(description="Image captioning web demo."))
    try:
        return run_demo(parser.parse_args(argv))
    except CaptionerError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
