"""eval/bench.py: the smallest latency run writes a well-formed results row; the features run writes a row per
case with its baseline; the decoding grid's shipped setting scores what `captioner evaluate` scores."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import Decoding
from captioner.distributed import bfloat16_is_native
from captioner.evaluate import evaluate
from conftest import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "eval" / "bench.py"
PHOTO = ROOT / "captioner" / "assets" / "examples" / "pizza.jpg"
COLUMNS = ["date", "commit", "subcommand", "case", "metric", "value", "unit", "baseline_value", "ratio", "machine",
           "notes"]


def run_latency(results: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "latency", "--repeats", "1", "--warmup", "0",
                           "--image", str(PHOTO), "--results-file", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not PHOTO.is_file(), reason="bundled example photo missing")
def test_latency_appends_rows_with_header_once(tmp_path: Path) -> None:
    results = tmp_path / "bench.csv"
    for _ in range(2):
        done = run_latency(results)
        assert done.returncode == 0, done.stderr[-2000:]
    with open(results, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COLUMNS  # the header once, then one row per run
    assert len(rows) == 3 and all(len(r) == len(COLUMNS) for r in rows)
    row = dict(zip(COLUMNS, rows[1]))
    assert row["subcommand"] == "latency" and row["metric"] == "caption_time" and row["unit"] == "ms"
    assert row["commit"] and row["machine"] and "cores" in row["machine"]
    value, baseline, ratio = float(row["value"]), float(row["baseline_value"]), float(row["ratio"])
    assert value > 0 and baseline > 0
    assert math.isfinite(ratio) and ratio > 0 and ratio == pytest.approx(1.0)  # the baseline against itself
    assert "model=bundled" in row["case"] and "pizza.jpg" in row["notes"]


def test_features_times_extraction_and_each_cnn_against_its_baseline(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "tiny") / "caps.csv"
    results = tmp_path / "bench.csv"

    def features(data: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH), "features", "--data", str(data), "--split", "train",
                               "--images", "4", "--batch", "2", "--repeats", "1", "--workers", "0",
                               "--results-file", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    wrong = features(tmp_path)  # a folder with no dataset in it: one line, no traceback, no rows
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith("bench features: ") and len(wrong.stderr.strip().splitlines()) == 1
    assert not results.exists()
    done = features(data)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    extraction = [r for r in rows if r["metric"] == "throughput"]
    assert len(extraction) == 1 and "4 images, batch 2" in extraction[0]["case"]
    forward = [r for r in rows if r["metric"] == "forward_time" and "autocast" not in r["case"]]
    assert len(forward) == 4  # each CNN, one image on one thread and a batch of 32
    bf16 = [r for r in rows if "autocast" in r["case"]]
    assert len(bf16) == (2 if bfloat16_is_native() else 0)
    for r in rows:
        value, baseline = float(r["value"]), float(r["baseline_value"])
        assert value > 0 and baseline > 0 and float(r["ratio"]) == pytest.approx(value / baseline, rel=0.01)
    assert all("features differ by" in r["notes"] for r in bf16)


def test_decoding_grid_shipped_setting_matches_evaluate(tmp_path: Path, coco_mini: Path) -> None:
    shipped = Decoding()
    results = tmp_path / "grid.csv"  # the first 24 photos hold captions that the repeat rule changes
    done = subprocess.run([sys.executable, str(BENCH), "decoding-grid", "--data", str(coco_mini), "--limit", "24",
                           "--length-penalty", str(shipped.length_penalty), "--fmean", str(shipped.rerank_fmean),
                           "--results-file", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(results, newline="") as f:
        grid = {r["metric"]: float(r["value"]) for r in csv.DictReader(f)}
    want = evaluate(None, coco_mini, "dev", shipped, limit=24, progress=False)["metrics"]
    assert grid.keys() == want.keys()
    for k, v in want.items():  # the same captions, so the same scores: the grid's baseline is what ships
        assert grid[k] == pytest.approx(v, abs=0.0051), k  # evaluate rounds to 2 decimals
