"""`captioner evaluate`: decode a split with a trained model and score it like the papers do.

Writes metrics.json (0-100 scale, with the settings used), predictions.json in the COCO results format,
and report.html (thumbnails, prediction, references, per-image scores, worst first) that opens offline.
"""
from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import atomic_write_text, check_out_dir, prepare_out_dir
from .data import load_dataset
from .config import Decoding
from .encoders import average_views, parts_of, test_views
from .errors import CaptionerError
from .features import model_features
from .inference import Captioner
from .metrics import all_metrics, repetition

METRIC_ORDER = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def decode_features(cap: Captioner, feats: torch.Tensor, decoding: Decoding, batch_size: int = 100,
                    progress: bool = True) -> list[str]:
    out: list[str] = []
    bar = tqdm(total=len(feats), desc=f"decoding (beam {decoding.beam_size})", unit="img", disable=not progress,
               dynamic_ncols=True)
    if cap.device != "cpu":  # a GPU decodes thousands of images at once about 2x faster than hundreds
        batch_size = max(batch_size, 5000)
    for i in range(0, len(feats), batch_size):
        caps = cap.decode(feats[i:i + batch_size].to(cap.device), decoding)
        out += [c.text for c in caps]
        bar.update(len(caps))
    bar.close()
    return out


def view_features(cap: Captioner, images: list, views: int = 1, cache_dir: str | None = None, workers: int = 2,
                  progress: bool = True, device: str = "cpu") -> tuple[torch.Tensor, np.ndarray, list]:
    """Cached features of the images' `views` test views, averaged, for the images every view could read
    (the mask), and the paths of those it could not; each view is cached on its own."""
    parts = []
    for enc in parts_of(cap.encoder):  # a stack's CNNs each read the images at their own size
        pres = test_views(enc.preprocess, views)
        sets = [model_features(enc, images, cache_dir, workers=workers, progress=progress, device=device,
                               preprocess=pre) for pre in pres]
        parts.append((sets, pres, enc))
    all_sets = [s for sets, _, _ in parts for s in sets]
    mask = np.logical_and.reduce([s.valid_mask() for s in all_sets])
    feats = torch.cat([average_views([torch.from_numpy(np.asarray(s.features[mask], dtype=np.float32)) for s in sets],
                                     enc.pool, pres, enc.parts) for sets, pres, enc in parts], -1)
    return feats, mask, sorted(set().union(*(s.bad for s in all_sets)))


def evaluate(model: str | Path | None, data: str | Path, split: str = "test", decoding: Decoding | None = None,
             out_dir: str | Path | None = None, images: str | None = None, cache_dir: str | None = None,
             limit: int = 0, workers: int = 2, progress: bool = True, precision: str = "auto", device: str = "cpu",
             results_file: str | Path | None = None) -> dict:
    """Metrics (name -> 0-100 score) and the settings they were measured with; files are written when
    `out_dir` is given, and one row is appended to the CSV `results_file` when given."""
    t0 = time.time()
    decoding = (decoding or Decoding()).validate()
    if limit < 0 or workers < 0:
        raise CaptionerError("--limit and --workers must be >= 0")
    if out_dir is not None:
        check_out_dir(out_dir)  # say so before the long decoding
    cap = Captioner.load(model, device=device, precision=precision)
    ds = load_dataset(data, split=split, images=images)
    records = ds.records[:limit] if limit else ds.records
    feats, mask, bad = view_features(cap, [r.image for r in records], decoding.views, cache_dir, workers, progress,
                                     device)
    kept = [r for r, ok in zip(records, mask) if ok]
    if not kept:
        raise CaptionerError("no readable images to evaluate")
    hyps = decode_features(cap, feats, decoding, progress=progress)
    refs = [r.captions for r in kept]
    scores, per_image, notes = all_metrics(hyps, refs, per_image=out_dir is not None)
    result = {"metrics": {k: round(scores[k], 2) for k in METRIC_ORDER if k in scores},
              "repetition": repetition(hyps, refs),
              "settings": {"model": str(model or "bundled"), "model_name": model_name(cap.meta, model),
                           "data": str(data), "split": split, **asdict(decoding), "device": device,
                           "precision": cap.precision, "images": len(kept), "skipped_images": bad, "scale": "0-100",
                           "tokenization": "captioner.vocab.tokenize (lowercase, punctuation stripped)",
                           "seconds": round(time.time() - t0, 1)},
              "notes": notes}
    if out_dir is not None:
        out = prepare_out_dir(out_dir)
        atomic_write_text(out / "metrics.json", json.dumps({**result["metrics"], "repetition": result["repetition"],
                                                            "settings": result["settings"], "notes": notes}, indent=2))
        atomic_write_text(out / "predictions.json", json.dumps(
            [{"image_id": r.image_id, "caption": h} for r, h in zip(kept, hyps)], indent=1))
        atomic_write_text(out / "report.html", render_report(kept, hyps, per_image, result, decoding))
    if results_file is not None:
        append_result(results_file, result)
    result["captions"] = hyps
    return result


def model_name(meta: dict, path: str | Path | None) -> str:
    """The name a model's card gives it, else its file name."""
    card = meta.get("card") or {}
    if card.get("name"):
        return f"{card['name']}-{card['version']}" if card.get("version") else card["name"]
    return Path(path).stem if path else "bundled"


def _commit() -> str:
    """The source's git commit, for provenance of a results row ("unknown" outside a checkout)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RESULT_COLUMNS = ["date", "commit", "model", "data", "split", "beam_size", "max_len", "length_penalty", "rerank",
                  "rerank_fmean", "block_trigrams", "block_repeats", "views", "precision", *METRIC_ORDER, "repeats",
                  "reference_repeats", "degenerate", "images", "seconds"]


def append_result(path: str | Path, result: dict) -> None:
    """One row per evaluation, appended (a header first when the file is new), so that a results CSV is the
    record of what was measured, when, on which code."""
    s, m = result["settings"], result["metrics"]
    row = {"date": datetime.date.today().isoformat(), "commit": _commit(), "model": s["model_name"],
           **{k: s[k] for k in RESULT_COLUMNS if k in s and k != "model"}, **m, **result["repetition"]}
    path = Path(path)
    new = not path.is_file() or path.stat().st_size == 0
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _thumbnail(path: Path, size: int = 160) -> str:
    from .images import load_image
    try:
        img = load_image(path, draft_size=size)
    except CaptionerError:
        return ""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render_report(records, hyps: list[str], per_image: dict[str, list[float]], result: dict,
                  decoding: Decoding) -> str:
    """One self-contained HTML page: thumbnails are embedded, so it opens offline from anywhere."""
    key = "CIDEr" if "CIDEr" in per_image else "BLEU-4"
    order = sorted(range(len(hyps)), key=lambda i: per_image.get(key, [0.0] * len(hyps))[i])
    names = [k for k in ("BLEU-4", "METEOR", "CIDEr") if k in per_image]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in names)
    rows = []
    for i in order:
        r = records[i]
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in r.captions)
        cells = "".join(f"<td>{per_image[k][i]:.1f}</td>" for k in names)
        src = _thumbnail(r.image)
        img = f'<img src="{src}" alt="">' if src else "(unreadable)"
        rows.append(f"<tr><td>{img}<br><small>{html.escape(str(r.image_id))}</small></td>"
                    f"<td><b>{html.escape(hyps[i])}</b></td><td><ul>{refs}</ul></td>{cells}</tr>")
    metrics = " \u00b7 ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
    s = result["settings"]
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in result["notes"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>captioner evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:6px;vertical-align:top}}img{{max-width:160px}}ul{{margin:0;padding-left:1.2em}}.note{{color:#a60}}</style>
</head><body><h1>captioner evaluation</h1>
<p><b>{html.escape(metrics)}</b> (0-100 scale)</p>
<p>model {html.escape(s['model'])}; data {html.escape(s['data'])} split {html.escape(s['split'])};
{s['images']} images; {html.escape(decoding.describe())}; max length {decoding.max_len};
{s['precision']} decoder weights.
Sorted worst first by per-image {key}.</p>{notes}
<table><tr><th>image</th><th>prediction</th><th>references</th>{head}</tr>
{''.join(rows)}</table></body></html>
"""
