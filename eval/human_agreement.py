"""How far a model's captions are from people's: each reference caption scored against the image's other
references (leave one out), and the model's captions against the same references, so both have one fewer
reference than `captioner evaluate` gives the model and compare like with like. Also scores the model's
captions through the COCO toolkit's own pipeline (its PTB tokenizer on the raw text, then BLEU / METEOR /
ROUGE-L / CIDEr), to show that `captioner evaluate`'s tokenisation gives the published toolkit's figures.

    captioner evaluate --data ../shared/data/flickr8k --split dev --out runs/eval-dev
    python eval/human_agreement.py runs/eval-dev/predictions.json --data ../shared/data/flickr8k --split dev
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from captioner.data import load_dataset
from captioner.errors import CaptionerError
from captioner.evaluate import METRIC_ORDER
from captioner.metrics import all_metrics, toolkit_metrics
from captioner.vocab import tokenize


def _words(captions: list[str]) -> float:
    return statistics.mean(len(tokenize(c)) for c in captions)


def _row(name: str, m: dict, words: float) -> str:
    return f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in METRIC_ORDER) + f" | {words:.2f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", nargs="+", help="predictions.json files written by `captioner evaluate --out DIR`")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--no-toolkit", action="store_true", help="skip the COCO toolkit's own pipeline (needs Java)")
    args = p.parse_args()
    refs = {str(r.image_id): r.captions for r in load_dataset(args.data, split=args.split).records}
    models = {}
    for path in args.predictions:
        preds = json.loads(Path(path).read_text())
        if set(str(x["image_id"]) for x in preds) != set(refs):
            raise CaptionerError(f"{path}: its images are not the {args.split} split of {args.data}")
        caps = {str(x["image_id"]): x["caption"] for x in preds}
        models[Path(path).parent.name or path] = [caps[i] for i in refs]
    ids = list(refs)
    n = min(len(refs[i]) for i in ids)
    if n < 2:
        raise CaptionerError("leaving one reference out needs at least 2 references per image")
    head = ["| captions | " + " | ".join(METRIC_ORDER) + " | words |", "| --- " * (2 + len(METRIC_ORDER)) + "|"]
    print(f"{len(ids)} images; each row scores against {n - 1} references per image (the k-th of {n} left out)\n")
    rows, means = list(head), {}
    for k in range(n):
        others = [refs[i][:k] + refs[i][k + 1:n] for i in ids]
        human = [refs[i][k] for i in ids]
        for name, hyps in [("people", human)] + list(models.items()):
            m, words = all_metrics(hyps, others)[0], _words(hyps)
            rows.append(_row(f"{name}, reference {k + 1} left out", m, words))
            means.setdefault(name, []).append((m, words))
    for name, runs in means.items():
        mean = {key: statistics.mean(m[key] for m, _ in runs) for key in METRIC_ORDER}
        rows.append(_row(f"**{name}, mean**", mean, statistics.mean(w for _, w in runs)))
    print("\n".join(rows))
    if args.no_toolkit:
        return
    full = [refs[i] for i in ids]
    table = [f"| {name} | {how} | " + " | ".join(f"{m[k]:.2f}" for k in METRIC_ORDER) + " |"
             for name, hyps in models.items()
             for how, m in (("captioner", all_metrics(hyps, full)[0]), ("COCO toolkit", toolkit_metrics(hyps, full)))]
    print(f"\nThe models against all {n} references, captioner's tokenisation and the COCO toolkit's pipeline\n")
    print("| captions | scored by | " + " | ".join(METRIC_ORDER) + " |\n" + "| --- " * (2 + len(METRIC_ORDER)) + "|")
    print("\n".join(table))


if __name__ == "__main__":
    try:
        main()
    except CaptionerError as e:
        raise SystemExit(f"error: {e}")
