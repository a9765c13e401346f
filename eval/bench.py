#!/usr/bin/env python
"""Benchmarks of the captioner: every figure is measured beside a baseline in the same process, with their ratio.

    python eval/bench.py <what> [options]        # python eval/bench.py <what> --help lists its options
    python eval/bench.py latency --model bundled --model runs/f8k/best.safetensors --precision int8 float32

latency        one photo captioned as shipped, per model/precision/views/threads/decoding: what a user waits for
decode         batched beam search vs one image at a time, int8/bf16 vs float32 weights: why evaluation is fast
features       extract_features vs the bare forward, each encoder vs the first: what caching and a bigger CNN cost
train-step     a training step in fp32 vs --amp bf16, fine-tuning, the encoder in the loop: what each option costs
memory         peak RSS of a short training run with vs without heap trimming: why long CPU runs do not grow
gpu            COCO-sized costs on CUDA (step, SCST batch, extraction, beam search): what the COCO recipe costs
decoding-grid  dev scores over length penalty x rerank F-mean share vs the shipped setting: where its values come from
seeds          scores of several checkpoints, their mean and spread: how much of a difference the seed alone makes
onnx           one photo captioned with onnxruntime (the model exported to ONNX) vs the torch path, same process

Each subcommand prints its rows and appends them to --results-file (default eval/bench.csv; the header is written
when the file is new): date, commit, subcommand, case, metric, value, unit, baseline_value, ratio (value divided
by baseline_value), machine, notes. Timings are medians of --repeats runs taken in interleaved rounds, so that a
change in the machine's load hits every case alike; the load average at the start is in each row's notes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner import Decoding, consensus  # noqa: E402
from captioner.cli import run_reporting_errors  # noqa: E402
from captioner.config import PRECISIONS, VIEWS  # noqa: E402
from captioner.data import load_dataset  # noqa: E402
from captioner.decoding import beam_search, beam_search_reference, precision_dtype, set_precision  # noqa: E402
from captioner.distributed import bfloat16_is_native  # noqa: E402
from captioner.encoders import ENCODER_DIMS, POOLS, Trunk, TunedTop, attended_regions, create_encoder  # noqa: E402
from captioner.evaluate import METRIC_ORDER, evaluate, view_features  # noqa: E402
from captioner.features import extract_features  # noqa: E402
from captioner.inference import Captioner, resolve_precision  # noqa: E402
from captioner.metrics import all_metrics  # noqa: E402
from captioner.model import DecoderConfig, ShowAndTell  # noqa: E402
from captioner.train import TrainConfig, optimizer_step  # noqa: E402
from captioner.vocab import Vocabulary, tokenize  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FLICKR8K, COCO_MINI = DATA / "flickr8k", DATA / "coco-val2017-mini"
PHOTO = next(iter(sorted((DATA / "photos").glob("*.jpg"))), ROOT / "captioner" / "assets" / "examples" / "pizza.jpg")
COLUMNS = ["date", "commit", "subcommand", "case", "metric", "value", "unit", "baseline_value", "ratio", "machine",
           "notes"]
COCO_STEPS, COCO_SCST_BATCHES = 8_856, 3_541  # a COCO Karpathy-train epoch: batches of 64 captions; of 32 images
SHIPPED = Decoding()  # what the CLI, the demo and `captioner evaluate` decode with
DECODINGS = {"shipped": {}, "beam3": dict(beam_size=3, rerank=0, block_trigrams=False, length_penalty=0.0)}


# --- results ----------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Row:
    case: str
    metric: str
    value: float
    unit: str
    baseline_value: float
    notes: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else math.nan


class Results:
    """Prints each row and appends it to a CSV file, with the header when the file is new."""

    def __init__(self, path: Path, subcommand: str):
        self.path = path
        self.stamp = [datetime.datetime.now().isoformat(timespec="seconds"), commit(), subcommand]
        self.machine = machine()
        self.load = f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
        print(f"{subcommand}: {self.machine}; torch {torch.__version__}; commit {self.stamp[1]}; {self.load}",
              flush=True)

    def add(self, case: str, metric: str, value: float, unit: str, baseline: float, notes: str = "") -> Row:
        row = Row(case, metric, value, unit, baseline, "; ".join(n for n in (notes, self.load) if n))
        print(f"  {case} | {metric} {value:.4g} {unit} | baseline {baseline:.4g} | ratio {row.ratio:.3f}"
              + (f" | {notes}" if notes else ""), flush=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(COLUMNS)
            w.writerow([*self.stamp, case, metric, f"{value:.6g}", unit, f"{baseline:.6g}", f"{row.ratio:.6g}",
                        self.machine, row.notes])
        return row


# --- shared helpers ---------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
          device: str = "cpu") -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function over `repeats` interleaved rounds, and each one's last result."""
    last: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            last[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            last[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, last


def model_arg(m: str | None) -> str | None:
    return None if m in (None, "bundled") else m


def model_name(m: str | None) -> str:
    return "bundled" if model_arg(m) is None else str(m)


def split_records(data: Path, split: str, limit: int) -> list:
    recs = load_dataset(data, split=split).records
    return recs[:limit] if limit else recs


def caption_lengths(data: Path) -> list[int]:
    """Token counts (with <start> and <end>) of a dataset's captions, cut as training cuts them."""
    return [min(len(tokenize(c)), TrainConfig.max_len) + 2 for r in load_dataset(data).records for c in r.captions]


def caption_batch(lengths: list[int], vocab: int, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word ids shaped like `batch` real captions: <start> w.. <end>, zero-padded."""
    lens = [rng.choice(lengths) for _ in range(batch)]
    caps = torch.zeros(batch, max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        caps[i, :n] = torch.tensor([1] + [rng.randrange(4, vocab) for _ in range(n - 2)] + [2])
    return caps, torch.tensor(lens)


def recipe_decoder(cfg: dict, vocab: int, feature_dim: int, device: str) -> ShowAndTell:
    """The decoder a training recipe (train/*.json) builds, in training mode, from seed 0."""
    get = lambda k: cfg.get(k, getattr(TrainConfig, k))  # noqa: E731
    torch.manual_seed(0)
    return ShowAndTell(DecoderConfig(vocab, feature_dim, get("embed_dim"), get("hidden_dim"), get("num_layers"),
                                     get("dropout"), attended_regions(get("pool")),
                                     att_dropout=get("att_dropout"))).to(device).train()


def beam_kwargs(beam: int) -> dict:
    return dict(beam_size=beam, max_len=SHIPPED.max_len, length_penalty=SHIPPED.length_penalty, suppress_unk=True,
                block_trigrams=SHIPPED.block_trigrams, block_repeats=SHIPPED.block_repeats)


def batched_beam(decoder, feats: torch.Tensor, vocab: Vocabulary, beam: int, batch: int) -> list:
    return [hs for i in range(0, len(feats), batch)
            for hs in beam_search(decoder, feats[i:i + batch], vocab, **beam_kwargs(beam))]


def beam_rows(out: Results, cap: Captioner, feats: torch.Tensor, beam: int, batch: int, ref_images: int,
              repeats: int, device: str) -> None:
    """Batched beam search against beam_search_reference (one image, one beam at a time) on its share."""
    ref = feats[:ref_images]
    with torch.inference_mode():
        batched_beam(cap.decoder, feats[:2], cap.vocab, beam, batch)  # warm-up
        t, res = timed({"batched": lambda: batched_beam(cap.decoder, feats, cap.vocab, beam, batch),
                        "reference": lambda: beam_search_reference(cap.decoder, ref, cap.vocab, **beam_kwargs(beam))},
                       repeats, 0, device)
    pairs = list(zip(res["batched"], res["reference"]))
    same = sum(a[0].tokens == b[0].tokens for a, b in pairs)
    diff = max(abs(a[0].logprob - b[0].logprob) for a, b in pairs)
    out.add(f"beam {beam}, {len(feats)} images in calls of {batch}, {cap.precision} weights", "throughput",
            len(feats) / t["batched"], "captions/s", len(ref) / t["reference"],
            f"baseline: beam_search_reference on {len(ref)} images; same captions {same}/{len(ref)}, "
            f"largest log-prob difference {diff:.1e}")


def extraction_rows(out: Results, enc, paths: list, batch: int, workers: int, repeats: int, device: str) -> None:
    """extract_features into a fresh cache against the encoder's bare forward on pre-decoded batches."""
    xs = torch.stack([enc.preprocess(p) for p in paths[:batch]]).to(device).contiguous(memory_format=torch.channels_last)

    def bare() -> None:  # as many images as extraction reads
        with torch.inference_mode():
            for i in range(0, len(paths), len(xs)):
                enc(xs[:len(paths) - i])

    def extract() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            extract_features(enc, paths, tmp, batch_size=batch, workers=workers, progress=False, device=device)
    t, _ = timed({"extract": extract, "bare": bare}, repeats, 1, device)
    out.add(f"{enc.name} --pool {enc.pool}, {len(paths)} images, batch {batch}, up to {workers} workers",
            "throughput", len(paths) / t["extract"], "images/s", len(paths) / t["bare"],
            "baseline: the bare forward on pre-decoded tensors")


def train_step_rows(out: Results, cfg: dict, lengths: list[int], vocab: int, device: str, repeats: int,
                    fine_tune: int = 0, in_loop: bool = False) -> dict[str, float]:
    """A recipe's training step (optimizer_step, as train() runs it): float32 on cached features is the
    baseline; then bf16 autocast, the last `fine_tune` encoder stages run on cached maps, the encoder in the loop."""
    batch, pool = cfg.get("batch_size", 64), cfg.get("pool", "avg")
    enc = create_encoder(cfg.get("encoder", TrainConfig.encoder), pool=pool).to(device)
    size = enc.preprocess.size
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = enc(images).half()  # the cache holds float16 rows
    ways: dict[str, tuple[Callable[[], torch.Tensor], bool]] = {
        "float32, cached features": (lambda: feats.float(), False),
        "bf16 autocast (--amp), cached features": (lambda: feats.float(), True)}
    if fine_tune:
        trunk = Trunk(enc, fine_tune)
        with torch.no_grad():
            maps = trunk(images).half()
        enc.freeze(fine_tune)
        enc.train(True)
        top = TunedTop(trunk)
        ways[f"float32, last {fine_tune} stage(s) fine-tuned on cached maps"] = (lambda: top(maps.float()), False)
    if in_loop:
        ways["float32, the encoder run in the loop on the images"] = (lambda: enc(images).float(), False)
    tuned = [p for p in enc.parameters() if p.requires_grad]
    models = {w: recipe_decoder(cfg, vocab, enc.dim, device) for w in ways}
    params = {w: list(m.parameters()) + (tuned if "cached features" not in w else []) for w, m in models.items()}
    optims = {w: torch.optim.AdamW(params[w], lr=cfg.get("lr", 1e-3)) for w in ways}
    rng, count = random.Random(0), itertools.count()
    batches = [caption_batch(lengths, vocab, batch, rng) for _ in range(8)]

    def step(way: str) -> None:
        features, amp = ways[way]
        caps, lens = batches[next(count) % len(batches)]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = models[way].loss(features(), caps.to(device), lens)
        optimizer_step(loss, optims[way], params[way], None, cfg.get("grad_clip", 5.0))
        loss.item()
    t, _ = timed({w: (lambda w=w: step(w)) for w in ways}, repeats, 2, device)
    base = t["float32, cached features"]
    for w, s in t.items():
        out.add(f"{w}, batch {batch}, hidden {models[w].cfg.hidden_dim}, --pool {pool}, vocabulary {vocab}",
                "step_time", s * 1e3, "ms", base * 1e3,
                f"median of {repeats}; random pixels and word ids, the dataset's caption lengths")
    return t


# --- subcommands ------------------------------------------------------------------------------------------------

def cmd_latency(a: argparse.Namespace, out: Results) -> None:
    def case(cap: Captioner, views: int, threads: int, decoding: str) -> Callable[[], list]:
        def run() -> list:
            torch.set_num_threads(threads)
            return cap.caption_full([a.image], views=views, **DECODINGS[decoding])
        return run
    caps = {(m, p): Captioner.load(model_arg(m), precision=p) for m in a.model for p in a.precision}
    cases = {f"model={model_name(m)} precision={cap.precision} views={v} threads={t} decoding={d}": case(cap, v, t, d)
             for ((m, _), cap), v, t, d in itertools.product(caps.items(), a.views, a.threads, a.decoding)}
    t, res = timed(cases, a.repeats, a.warmup)
    base = next(iter(t.values()))
    for name, s in t.items():
        out.add(name, "caption_time", s * 1e3, "ms", base * 1e3,
                f"{Path(a.image).name}, median of {a.repeats}: \"{res[name][0].text}\"")


def cmd_decode(a: argparse.Namespace, out: Results) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    cap = Captioner.load(model_arg(a.model), precision="float32")
    recs = split_records(a.data, a.split, a.images)
    feats, _, _ = view_features(cap, [r.image for r in recs], cache_dir=a.cache_dir, progress=False)
    beam_rows(out, cap, feats, a.beam_size, a.batch, a.ref_images, a.repeats, "cpu")
    decoders = {"float32": cap.decoder}
    for p in map(resolve_precision, a.precision):
        if p not in decoders:
            decoders[p] = copy.deepcopy(cap.decoder)
            set_precision(decoders[p], precision_dtype(p))
    with torch.inference_mode():
        t, res = timed({p: (lambda d=d: batched_beam(d, feats, cap.vocab, a.beam_size, a.batch))
                        for p, d in decoders.items()}, a.repeats)
        t1, _ = timed({p: (lambda d=d: beam_search(d, feats[:1], cap.vocab, **beam_kwargs(a.beam_size)))
                       for p, d in decoders.items()}, a.repeats * 10, 3)
    for p in decoders:
        same = sum(x[0].tokens == y[0].tokens for x, y in zip(res[p], res["float32"]))
        out.add(f"{p} decoder weights, beam {a.beam_size}, {len(feats)} images in calls of {a.batch}", "throughput",
                len(feats) / t[p], "captions/s", len(feats) / t["float32"],
                f"baseline: float32 weights; {same}/{len(feats)} captions identical to float32's")
        out.add(f"{p} decoder weights, beam {a.beam_size}, one image", "decode_time", t1[p] * 1e3, "ms",
                t1["float32"] * 1e3, f"baseline: float32 weights; median of {a.repeats * 10}")


def cmd_features(a: argparse.Namespace, out: Results) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    paths = [r.image for r in split_records(a.data, a.split, a.images)]
    encs = {n: create_encoder(n, pool=a.pool) for n in a.encoders}
    extraction_rows(out, encs[a.encoders[0]], paths, a.batch, a.workers, a.repeats, "cpu")
    threads = torch.get_num_threads()

    def inputs(batch: int) -> dict[str, torch.Tensor]:  # random images at each CNN's own size
        return {n: torch.randn(batch, 3, e.preprocess.size, e.preprocess.size).contiguous(
            memory_format=torch.channels_last) for n, e in encs.items()}
    for batch, n_threads in ((1, 1), (32, threads)):  # as the demo runs it; as feature extraction can
        xs = inputs(batch)
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            t, _ = timed({n: (lambda n=n: encs[n](xs[n])) for n in encs}, a.repeats, 1)
        torch.set_num_threads(threads)
        base = t[a.encoders[0]] / batch
        for n, s in t.items():
            out.add(f"{n} ({encs[n].preprocess.size} px) --pool {a.pool}, batch {batch}, {n_threads} thread(s)",
                    "forward_time", s / batch * 1e3, "ms/image", base * 1e3,
                    f"baseline: {a.encoders[0]}; bare forward to pooled features, median of {a.repeats}")
    if bfloat16_is_native():  # the encoders under bf16 autocast at the extraction batch (not what extraction uses)
        xs = inputs(a.batch)

        def bf16(n: str) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encs[n](xs[n]).float()
        with torch.inference_mode():
            t, res = timed({**{n: (lambda n=n: encs[n](xs[n])) for n in encs},
                            **{f"{n} bf16": (lambda n=n: bf16(n)) for n in encs}}, a.repeats, 1)
        for n in encs:
            diff = float((res[f"{n} bf16"] - res[n]).norm() / res[n].norm())
            out.add(f"{n} under bfloat16 autocast, batch {a.batch}, {threads} thread(s)", "forward_time",
                    t[f"{n} bf16"] / a.batch * 1e3, "ms/image", t[n] / a.batch * 1e3,
                    f"baseline: float32, same process; features differ by {diff:.1%} (relative norm)")


def cmd_train_step(a: argparse.Namespace, out: Results) -> None:
    torch.set_num_threads(a.threads)
    cfg = json.loads(Path(a.config).read_text())
    train_step_rows(out, cfg, caption_lengths(a.data), a.vocab, "cpu", a.repeats, a.fine_tune_blocks,
                    a.encoder_in_loop)


MEMORY_CHILD = """import json, sys
from captioner.memory import limit_onednn_cache
limit_onednn_cache()
from captioner.train import Interrupted, TrainConfig, train
try:
    train(TrainConfig(**json.loads(sys.argv[1])), progress=False)
except Interrupted:
    pass
"""
UNTRIMMED = {"CAPTIONER_TRIM_EVERY": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def cmd_memory(a: argparse.Namespace, out: Results) -> None:
    recipe = json.loads(Path(a.config).read_text())
    names = {f.name for f in fields(TrainConfig)}
    env = {k: v for k, v in os.environ.items() if k not in UNTRIMMED}
    env.update({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})
    runs = [("cache warm-up", {}), ("heap trimmed, oneDNN cache 16 kernels (shipped)", {}),
            ("not trimmed, oneDNN cache 1024 kernels", UNTRIMMED)]
    result: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cfg = {**{k: v for k, v in recipe.items() if k in names}, "data": str(a.data), "limit": a.train_images,
               "epochs": 1, "seed": 0, "dev_images": a.dev_images, "device": "cpu",
               "cache_dir": a.cache_dir or (f"{tmp}/cache" if a.train_images else None)}
        # one step fills the feature cache first; then the shipped way, while this process is still small
        for k, (name, extra) in enumerate(runs):
            run = {**cfg, "out": f"{tmp}/run-{k}", "stop_after_steps": a.steps if k else 1}
            with open(f"{tmp}/log.txt", "w+") as log:
                t = time.perf_counter()
                p = subprocess.Popen([sys.executable, "-c", MEMORY_CHILD, json.dumps(run)], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, env={**env, **extra})
                _, status, usage = os.wait4(p.pid, 0)  # this child's own peak, not earlier children's
                if os.waitstatus_to_exitcode(status):
                    log.seek(0)
                    sys.exit(f"bench memory: the training run failed:\n{log.read()[-2000:]}")
            result[name] = (usage.ru_maxrss / 1024, time.perf_counter() - t)
    base = result[runs[2][0]]
    what = f"{a.train_images or 'all'} training images, {a.steps or 'an epoch of'} steps, {Path(a.config).name}"
    for name, _ in runs[1:]:
        out.add(f"{name}; {what}", "peak_rss", result[name][0], "MB", base[0], "baseline: not trimmed; the child's")
        out.add(f"{name}; {what}", "run_time", result[name][1], "s", base[1], "baseline: not trimmed; warm cache")


def cmd_gpu(a: argparse.Namespace, out: Results) -> None:
    from captioner.scst import CiderD, policy_step, sample
    dev, cfg = a.device, json.loads(Path(a.config).read_text())
    t = train_step_rows(out, cfg, caption_lengths(a.coco), a.vocab, dev, a.repeats)
    xe = t["bf16 autocast (--amp), cached features"]
    print(f"  a COCO cross-entropy epoch ({COCO_STEPS:,} steps) at bf16: {xe * COCO_STEPS:.0f} s", flush=True)
    # SCST: 32 images x 5 sampled captions and the policy step on the device; the CIDEr-D reward on the CPU
    recs = load_dataset(a.coco).records
    vocab = Vocabulary.build([c for r in recs for c in r.captions], 1)
    dim = ENCODER_DIMS[cfg.get("encoder", TrainConfig.encoder)] * POOLS[cfg.get("pool", "avg")]
    model = recipe_decoder(cfg, a.vocab, dim, dev)
    optim = torch.optim.Adam(model.parameters(), lr=2e-5)
    gen, cider = torch.Generator(device=dev).manual_seed(0), CiderD([r.captions for r in recs])
    feats = torch.randn(32, dim, device=dev)
    refs = [[" ".join(tokenize(c)) for c in recs[i % len(recs)].captions] for i in range(32) for _ in range(5)]
    sampled: list[str] = []

    def scst_model() -> None:
        model.eval()  # as train_scst: sampled and updated without dropout
        with torch.no_grad():
            caps, lens = sample(model, feats, vocab, 5, 16, gen)
        sampled[:] = [vocab.decode(c) for c in caps.tolist()]
        policy_step(model, optim, feats, caps, lens, torch.rand(32, 5), vocab)
    ts, _ = timed({"model": scst_model, "reward": lambda: cider(sampled, refs)}, a.repeats, 1, dev)
    for part, what in (("model", "sampling and policy step on the device"), ("reward", "CIDEr-D reward on the CPU")):
        out.add(f"SCST batch of 32 images x 5 samples, {what}", "batch_time", ts[part] * 1e3, "ms", xe * 1e3,
                f"baseline: the bf16 cross-entropy step; a COCO epoch {ts[part] * COCO_SCST_BATCHES / 60:.1f} min; "
                "random weights sample every caption to full length (an upper bound)")
    images = sorted((a.coco / "images").glob("*.jpg"))[:a.images or None]
    extraction_rows(out, create_encoder().to(dev), images * a.copies, 64, a.workers, 1, dev)
    cap = Captioner.load(device=dev, precision="float32")
    feats = cap.encode(images).float()
    feats = feats.repeat(math.ceil(a.decode_images / len(feats)), 1)[:a.decode_images]
    beam_rows(out, cap, feats, SHIPPED.beam_size, a.decode_images, a.ref_images, 1, dev)


def cmd_decoding_grid(a: argparse.Namespace, out: Results) -> None:
    cap = Captioner.load(model_arg(a.model))
    recs = split_records(a.data, a.split, a.limit)
    feats, mask, _ = view_features(cap, [r.image for r in recs], a.views, a.cache_dir, progress=False)
    refs = [r.captions for r, ok in zip(recs, mask) if ok]
    lp0, share0, beam = SHIPPED.length_penalty, SHIPPED.rerank_fmean, SHIPPED.beam_size
    penalties, shares = [lp0] + [x for x in a.length_penalty if x != lp0], [share0] + [x for x in a.fmean if x != share0]
    base: dict[str, float] = {}
    for lp in penalties:  # each beam decoded once with its whole n-best list; every share reranks those lists
        nbest = [hs for i in range(0, len(feats), 100) for hs in beam_search(
            cap.decoder, feats[i:i + 100], cap.vocab, **{**beam_kwargs(beam), "length_penalty": lp}, n_best=beam)]
        for share in shares:
            picks = [cap.vocab.decode(hs[consensus.rerank([h.tokens for h in hs], a.rerank, len(hs), share)[0]].tokens)
                     for hs in nbest]
            scores = all_metrics(picks, refs)[0]
            base = base or scores
            words = statistics.mean(len(p.split()) for p in picks)
            for k in (m for m in METRIC_ORDER if m in scores):
                out.add(f"length penalty {lp}, F-mean share {share}", k, scores[k], "score 0-100", base[k],
                        f"baseline: shipped (length penalty {lp0}, share {share0}); beam {beam}, best of {a.rerank} "
                        f"reranked; {len(refs)} {a.split} images, {a.views} view(s), {cap.precision}; "
                        f"{words:.2f} words a caption")


def cmd_seeds(a: argparse.Namespace, out: Results) -> None:
    scores = [evaluate(model_arg(m), a.data, a.split, Decoding(views=a.views), limit=a.limit, cache_dir=a.cache_dir,
                       progress=False)["metrics"] for m in a.checkpoints]
    base = scores[0]
    note = (f"baseline: {model_name(a.checkpoints[0])}; {a.split} split{f', first {a.limit} images' if a.limit else ''}"
            f", {a.views} view(s), shipped decoding")
    for m, score in zip(a.checkpoints, scores):
        for k in (k for k in METRIC_ORDER if k in score):
            out.add(model_name(m), k, score[k], "score 0-100", base[k], note)
    for k in (k for k in METRIC_ORDER if k in base and len(scores) > 1):
        out.add(f"mean of {len(scores)}", k, statistics.mean(x[k] for x in scores), "score 0-100", base[k], note)
        out.add(f"standard deviation of {len(scores)}", k, statistics.stdev(x[k] for x in scores), "score 0-100",
                base[k], note)


def cmd_onnx(a: argparse.Namespace, out: Results) -> None:
    from captioner.onnx_export import export_onnx
    from captioner.onnx_runtime import OnnxCaptioner
    if a.threads:  # onnxruntime gets as many (0: each library's own default)
        torch.set_num_threads(a.threads)
    settings = DECODINGS[a.decoding]
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.onnx_dir or Path(tmp)
        if not a.onnx_dir:
            export_onnx(model_arg(a.model), folder)
        cap = Captioner.load(model_arg(a.model), precision=a.precision)
        ort_cap = OnnxCaptioner(folder, threads=a.threads)
        t, res = timed({"torch": lambda: cap.caption_full([a.image], **settings),
                        "onnx": lambda: ort_cap.caption_full([a.image], **settings)}, a.repeats, a.warmup)
    same = res["torch"][0].text == res["onnx"][0].text
    note = f"{Path(a.image).name}, median of {a.repeats}, decoding={a.decoding}"
    out.add(f"model={model_name(a.model)} torch precision={cap.precision} threads={a.threads}", "caption_time",
            t["torch"] * 1e3, "ms", t["torch"] * 1e3, f"{note}: \"{res['torch'][0].text}\"")
    out.add(f"model={model_name(a.model)} onnxruntime float32 threads={a.threads}", "caption_time", t["onnx"] * 1e3,
            "ms", t["torch"] * 1e3, f"{note}; baseline: torch; same caption as torch: {same}")


# --- command line -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True, metavar="what")

    def command(name: str, fn: Callable, text: str, threads: int | None = 0, repeats: int = 0, model: bool = False,
                data: bool = False) -> argparse.ArgumentParser:
        """A subcommand with --results-file, and the options it shares with others."""
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(fn=fn)
        p.add_argument("--results-file", type=Path, default=ROOT / "eval" / "bench.csv",
                       help="CSV the rows are appended to (default: eval/bench.csv)")
        if threads is not None:
            p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads}; 0: torch's)")
        if repeats:
            p.add_argument("--repeats", type=int, default=repeats, help=f"timed runs of each case (default {repeats})")
        if model:
            p.add_argument("--model", help="checkpoint (default: the bundled model)")
        if data:
            p.add_argument("--data", type=Path, default=FLICKR8K, help="dataset (default: ../shared/data/flickr8k)")
            p.add_argument("--split", default="dev", help="its split (default: dev)")
            p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/captioner/features)")
        return p

    p = command("latency", cmd_latency, "one photo's captioning time per model and setting", None, 20)
    p.add_argument("--model", action="append", help="checkpoint, or 'bundled'; repeat it, the first is the baseline")
    p.add_argument("--image", default=str(PHOTO), help="photo (default: the first of ../shared/data/photos)")
    p.add_argument("--views", type=int, nargs="+", choices=VIEWS, default=[1], help="test views averaged")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["auto"], help="decoder weights")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads (default: 1)")
    p.add_argument("--decoding", nargs="+", choices=list(DECODINGS), default=["shipped"],
                   help="shipped (beam 10, reranked, trigram blocking) or beam3 (plain beam 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each case first")

    p = command("decode", cmd_decode, "batched beam search vs one image at a time; decoder precisions vs float32",
                repeats=3, model=True, data=True)
    p.add_argument("--images", type=int, default=200, help="images decoded batched")
    p.add_argument("--ref-images", type=int, default=20, help="images decoded one at a time")
    p.add_argument("--batch", type=int, default=100, help="images per batched call (as captioner evaluate)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["auto"], help="compared with float32")

    p = command("features", cmd_features, "feature extraction vs bare forward; each encoder's forward", repeats=5,
                data=True)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"],
                   help="the first is the baseline")
    p.add_argument("--pool", choices=list(POOLS), default="regions")
    p.add_argument("--batch", type=int, default=4, help="extraction batch (extract_features' CPU default)")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")

    p = command("train-step", cmd_train_step, "a training step: fp32 vs --amp bf16, fine-tuning, encoder in the loop",
                threads=1, repeats=5)
    p.add_argument("--config", default=str(ROOT / "train" / "flickr8k.json"), help="recipe whose decoder is timed")
    p.add_argument("--data", type=Path, default=FLICKR8K, help="dataset whose caption lengths are used")
    p.add_argument("--vocab", type=int, default=2541, help="vocabulary size (the bundled model's)")
    p.add_argument("--fine-tune-blocks", type=int, default=0, help="also time fine-tuning the last N stages")
    p.add_argument("--encoder-in-loop", action="store_true", help="also time the whole encoder run in the loop")

    p = command("memory", cmd_memory, "peak RSS of a short training run, with vs without heap trimming", data=True)
    p.add_argument("--config", default=str(ROOT / "train" / "flickr8k.json"), help="recipe trained")
    p.add_argument("--train-images", type=int, default=0, help="train on this many images (0: all)")
    p.add_argument("--dev-images", type=int, default=100, help="dev images scored at the epoch's end")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: one epoch)")

    p = command("gpu", cmd_gpu, "COCO-sized costs on a CUDA device", None, repeats=50)
    p.add_argument("--coco", type=Path, default=COCO_MINI, help="COCO captions and images")
    p.add_argument("--config", default=str(ROOT / "train" / "coco.json"), help="recipe whose decoder is timed")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run")
    p.add_argument("--vocab", type=int, default=10_000, help="vocabulary size (COCO's at min count 5: ~9,500)")
    p.add_argument("--images", type=int, default=0, help="COCO images read (0: all in --coco)")
    p.add_argument("--copies", type=int, default=16, help="times the extraction reads each image")
    p.add_argument("--workers", type=int, default=8, help="image decoding workers")
    p.add_argument("--decode-images", type=int, default=5000, help="images beam-searched in one call")
    p.add_argument("--ref-images", type=int, default=100, help="images decoded one at a time")

    p = command("decoding-grid", cmd_decoding_grid, "scores over length penalty x rerank F-mean share", None,
                model=True, data=True)
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (0: all)")
    p.add_argument("--views", type=int, choices=VIEWS, default=1, help="test views averaged")
    p.add_argument("--length-penalty", type=float, nargs="+", default=[0.5, SHIPPED.length_penalty, 0.9])
    p.add_argument("--fmean", type=float, nargs="+", default=[0.0, SHIPPED.rerank_fmean, 1.0], help="F-mean's share")
    p.add_argument("--rerank", type=int, default=SHIPPED.rerank, help="the beam's best that compete (0 or 1: none)")

    p = command("seeds", cmd_seeds, "mean and spread of several checkpoints' scores", None, data=True)
    p.add_argument("checkpoints", nargs="+", help="checkpoints or run folders, one per seed (or 'bundled'; an ensemble "
                                                  "from train/bundle.py scores a pair); the first is the baseline")
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (0: all)")
    p.add_argument("--views", type=int, choices=VIEWS, default=1, help="test views averaged")

    p = command("onnx", cmd_onnx, "one photo's captioning time: onnxruntime vs torch", 1, 20, model=True)
    p.add_argument("--image", default=str(PHOTO), help="photo (default: the first of ../shared/data/photos)")
    p.add_argument("--onnx-dir", type=Path, help="a `captioner export --format onnx` folder (default: export "
                                                 "--model to a temporary one first)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="the torch path's decoder weights "
                                                                            "(default: float32, as exported)")
    p.add_argument("--decoding", choices=list(DECODINGS), default="shipped", help="shipped or beam3")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each case first")

    a = ap.parse_args(argv)
    if a.what == "latency":
        a.model = a.model or [None]
    if a.what == "gpu" and a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench gpu: needs a CUDA device, and this machine has none (--device cpu runs it as a smoke test)",
              file=sys.stderr)
        return 2
    return run_reporting_errors(lambda: a.fn(a, Results(a.results_file, a.what)) or 0, prog=f"bench {a.what}")


if __name__ == "__main__":
    sys.exit(main())
