#!/usr/bin/env python
"""COCO-sized costs on a GPU, each beside a baseline run in the same process.

The recipe on COCO (train/coco.json) was costed from CPU figures only; this times its parts on a GPU:

1. one cross-entropy epoch-equivalent: 8,856 steps of batch 64 (COCO Karpathy train's 566,747 captions,
   113,287 images' cached features) with the recipe's decoder and the loop's own step
   (captioner.train.optimizer_step), bf16 autocast; baselines: the same steps in fp32, and the
   tutorials' way with the encoder run inside the loop
2. feature extraction (captioner.features.extract_features) of real COCO JPEGs with N decoding workers,
   against the encoder's bare forward on pre-decoded batches
3. SCST's model side per batch (captioner.scst.sample and policy_step: 32 images x 5 sampled captions, then
   the policy-gradient step); the CIDEr-D reward runs on the CPU and is timed by eval/cider_cost.py
4. batched beam search (beam 3, the shipped decoding) of 5000 images, against one image at a time
5. the recipe's own step as train() runs it on a GPU (coco.json's pooling, its six views' feature table
   kept on the device in float16 and widened per batch, bf16 autocast), against global average pooling in
   the same process; with --barrier DIR --parties N, N copies of the script start timing together, as the
   recipe trains its seeds side by side on one GPU

Caption lengths and words are COCO's own (captions_val2017.json, tokenized as training does), repeated to
COCO train's size; the image features of section 1 are random (the cost does not depend on them), those
of sections 3-4 are the encoder's, of real COCO images, decoded by the bundled model.

    python eval/gpu_bench.py --coco ../shared/data/coco-val2017-mini
    python eval/gpu_bench.py --coco ../shared/data/coco-val2017-mini --device cpu --scale 0.002   # smoke run
    python eval/gpu_bench.py --coco C --only 5 --pools regions --barrier /tmp/b --parties 2 &   # twice: side by side
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner.decoding import beam_search, beam_search_reference  # noqa: E402
from captioner.defaults import BEAM_SIZE, LENGTH_PENALTY  # noqa: E402
from captioner.distributed import autocast, features_on_device, fits_on_device, to_device  # noqa: E402
from captioner.encoders import POOLS, attended_regions, create_encoder  # noqa: E402
from captioner.features import extract_features  # noqa: E402
from captioner.inference import BUNDLED_MODEL, load_model  # noqa: E402
from captioner.model import DecoderConfig, ShowAndTell  # noqa: E402
from captioner.scst import policy_step, sample  # noqa: E402
from captioner.train import _pad, optimizer_step  # noqa: E402
from captioner.vocab import Vocabulary  # noqa: E402

COCO_IMAGES, COCO_CAPTIONS, COCO_ALL_IMAGES = 113_287, 566_747, 123_287  # Karpathy train; train+val+test
COCO_VOCAB = 10_000  # Karpathy train at min count 5 gives about 9,500 words
RECIPE = json.loads((ROOT / "train" / "coco.json").read_text())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str, fn) -> float:
    """Seconds for fn(), the GPU's queued work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def recipe_decoder(pool: str, device: str) -> ShowAndTell:
    """coco.json's decoder for features pooled this way, with a COCO-sized vocabulary, in training mode."""
    torch.manual_seed(0)
    return ShowAndTell(DecoderConfig(COCO_VOCAB, 1280 * POOLS[pool], RECIPE["embed_dim"], RECIPE["hidden_dim"],
                                     RECIPE["num_layers"], RECIPE["dropout"], attended_regions(pool),
                                     att_dropout=RECIPE.get("att_dropout", 0.5))).to(device).train()


def coco_captions(coco: Path, max_len: int) -> tuple[list[list[int]], int]:
    caps = [a["caption"] for a in json.loads((coco / "captions_val2017.json").read_text())["annotations"]]
    vocab = Vocabulary.build(caps, 1)
    if len(vocab) > COCO_VOCAB:
        raise SystemExit(f"vocabulary of {len(vocab)} words is over {COCO_VOCAB}")
    out = []
    for c in caps:  # as train() cuts them: at most max_len words, then <end>
        ids = vocab.encode(c)
        if len(ids) > 2:
            out.append(ids[: max_len + 1] + ([vocab.end_id] if len(ids) > max_len + 1 else []))
    return out, len(vocab)


def section_epoch(args, caps: list[list[int]]) -> None:
    dev, B = args.device, RECIPE["batch_size"]
    n_caps, n_img = max(B, int(COCO_CAPTIONS * args.scale)), max(B, int(COCO_IMAGES * args.scale))
    steps = math.ceil(n_caps / B)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n_img, 1280, generator=g)  # cached features, on the host as in train()
    rows_of = torch.randint(0, n_img, (n_caps,), generator=g).tolist()
    cap_of = [caps[i % len(caps)] for i in range(n_caps)]
    print(f"\n1. cross-entropy epoch-equivalent: {n_caps:,} captions, {n_img:,} images, batch {B}, {steps:,} steps, "
          f"vocabulary {COCO_VOCAB:,}, LSTM {RECIPE['hidden_dim']}, mean caption {statistics.mean(map(len, cap_of)):.1f} "
          f"tokens", flush=True)

    def make(amp_on: bool):
        model = recipe_decoder("avg", dev)
        params = list(model.parameters())
        optim = torch.optim.AdamW(params, lr=RECIPE["lr"])
        amp, scaler = autocast(dev, amp_on)
        return model, params, optim, amp, scaler

    def run(amp_on: bool, n_steps: int, limit_s: float, image_batch=None, table: torch.Tensor = feats,
            profile: int = 0) -> tuple[int, float]:
        model, params, optim, amp, scaler = make(amp_on)
        order = torch.randperm(n_caps, generator=torch.Generator().manual_seed(1)).tolist()

        def step(b: int) -> None:
            idx = order[(b % steps) * B:(b % steps + 1) * B]
            c, lens = _pad([cap_of[i] for i in idx])
            with amp:
                if image_batch is not None:
                    f = image_batch(len(idx))
                else:  # from the host table, or from one already on the device
                    f = to_device(table[[rows_of[i] for i in idx]], dev)
                loss = model.loss(f, to_device(c, dev), lens)
            optimizer_step(loss, optim, params, scaler, RECIPE["grad_clip"])
            loss.item()  # train() reads the loss every step
        for b in range(5):  # warm-up: kernels chosen, allocator filled
            step(b)
        sync(dev)
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
            with prof(activities=acts) as pr:
                for b in range(profile):
                    step(b)
                sync(dev)
            for key in ["self_cpu_time_total"] + (["self_device_time_total"] if dev.startswith("cuda") else []):
                print(pr.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=45), flush=True)
        t0, done = time.perf_counter(), 0
        while done < n_steps and time.perf_counter() - t0 < limit_s:
            step(5 + done)
            done += 1
        sync(dev)
        return done, time.perf_counter() - t0

    n, s = run(True, steps, args.epoch_limit)
    epoch_s = s * steps / n
    what = "measured" if n == steps else f"{n:,} of {steps:,} steps measured, the rest extrapolated"
    print(f"   bf16 autocast (the recipe): {epoch_s:.1f} s an epoch, {s / n * 1e3:.2f} ms a step, "
          f"{n * B / s:,.0f} captions/s ({what})", flush=True)
    n32, s32 = run(False, min(steps, args.base_steps), args.epoch_limit)
    print(f"   fp32 baseline, {n32:,} steps: {s32 / n32 * 1e3:.2f} ms a step -> {s32 * steps / n32:.1f} s an epoch; "
          f"bf16 is {(s32 / n32) / (s / n):.2f}x fp32", flush=True)
    resident = features_on_device(feats, dev)
    nr, sr = run(True, min(steps, args.base_steps), args.epoch_limit, table=resident)
    print(f"   features kept on the device (train() does so on CUDA), {nr:,} steps: {sr / nr * 1e3:.2f} ms a step -> {sr * steps / nr:.1f} s an "
          f"epoch; {(s / n) / (sr / nr):.2f}x the recipe's step", flush=True)
    del resident
    if args.profile:
        print(f"   profile of {args.profile} bf16 steps (host features, as train() does):", flush=True)
        run(True, 0, 0, profile=args.profile)
    encoder = create_encoder(pretrained=False).to(dev).eval()
    x = torch.randn(B, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)

    def online(k: int) -> torch.Tensor:  # pre-decoded images: the encoder's share alone, a lower bound
        with torch.no_grad():
            return encoder(x[:k]).float()
    no, so = run(True, min(steps, args.base_steps // 4), args.epoch_limit, image_batch=online)
    print(f"   encoder inside the loop (pre-decoded images, bf16), {no:,} steps: {so / no * 1e3:.2f} ms a step -> "
          f"{so * steps / no:.1f} s an epoch; cached features are {(so / no) / (s / n):.1f}x faster", flush=True)
    print(f"   10 epochs, 2 seeds one after the other: {2 * 10 * epoch_s / 60:.1f} min", flush=True)


def barrier(args, tag: str) -> None:
    """Wait until --parties copies of this script reach the same point (files in --barrier)."""
    if not args.barrier:
        return
    folder = Path(args.barrier)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tag}.{os.getpid()}").touch()
    t = time.time()
    while len(list(folder.glob(f"{tag}.*"))) < args.parties:
        if time.time() - t > 300:
            raise RuntimeError(f"barrier {tag}: the other copies never arrived")
        time.sleep(0.01)


def section_step(args, caps: list[list[int]]) -> None:
    dev, B = args.device, RECIPE["batch_size"]
    views = 1 + RECIPE.get("flip_augment", False) + 4 * RECIPE.get("crop_augment", False)
    n_caps, n_img = max(B, int(COCO_CAPTIONS * args.scale)), max(B, int(COCO_IMAGES * args.scale))
    steps, n = math.ceil(n_caps / B), min(args.steps, math.ceil(n_caps / B))
    g = torch.Generator().manual_seed(0)
    rows_of = torch.randint(0, n_img * views, (n_caps,), generator=g).tolist()  # a caption's view drawn at random
    cap_of = [caps[i % len(caps)] for i in range(n_caps)]
    order = torch.randperm(n_caps, generator=g).tolist()
    print(f"\n5. the recipe's step (train() on a GPU): {n_img:,} images x {views} views in a float16 table on the "
          f"device, batch {B}, {n:,} of an epoch's {steps:,} steps timed; pid {os.getpid()}", flush=True)
    ms = {}
    for pool in args.pools:
        dim = 1280 * POOLS[pool]
        size = n_img * views * dim * 2  # float16
        cuda = dev.startswith("cuda")
        free = torch.cuda.mem_get_info()[0] if cuda else 0
        kept = "kept on the device (under half the free memory)" if not cuda or fits_on_device(size, dev) \
            else "over half the free memory: train() would keep it on the host"
        table = torch.randn(n_img * views, dim, device=dev, dtype=torch.float16)
        model = recipe_decoder(pool, dev)
        params = list(model.parameters())
        optim = torch.optim.AdamW(params, lr=RECIPE["lr"])
        amp, scaler = autocast(dev, RECIPE["amp"])

        def step(b: int) -> None:  # as train()'s loop: feature_batch, model.loss, optimizer_step, loss.item()
            idx = order[(b % steps) * B:(b % steps + 1) * B]
            c, lens = _pad([cap_of[i] for i in idx])
            with amp:
                f = table[[rows_of[i] for i in idx]].float()
                loss = model.loss(f, to_device(c, dev), lens)
            optimizer_step(loss, optim, params, scaler, RECIPE["grad_clip"])
            loss.item()
        for b in range(min(10, n)):  # warm-up
            step(b)
        barrier(args, pool)
        t0 = time.time()
        s = clock(dev, lambda: [step(10 + b) for b in range(n)])
        ms[pool] = s / n * 1e3
        print(f"   pool {pool} ({dim:,}-d rows, table {size / 2**30:.1f} GiB, {kept}; {free / 2**30:.1f} GiB were free): "
              f"{ms[pool]:.2f} ms a step -> {ms[pool] * steps / 1e3:.1f} s an epoch, 10 epochs {ms[pool] * steps / 6e4:.1f} min "
              f"(timed {time.strftime('%H:%M:%S', time.localtime(t0))}-{time.strftime('%H:%M:%S')})", flush=True)
        del table, model, optim, params
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    if len(ms) > 1:
        base = next(iter(ms))
        print("   " + ", ".join(f"{p} {ms[p] / ms[base]:.2f}x {base}" for p in ms if p != base), flush=True)


def section_features(args, images: list[Path]) -> torch.Tensor:
    dev = args.device
    encoder = create_encoder().to(dev).eval()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    paths = []
    for k in range(args.copies):  # the same JPEGs under new names: the cache is keyed by path
        for p in images:
            q = tmp / "img" / f"{k:03d}_{p.name}"
            q.parent.mkdir(exist_ok=True)
            q.symlink_to(p.resolve())
            paths.append(q)
    print(f"\n2. feature extraction: {len(paths):,} COCO JPEGs ({len(images)} distinct, "
          f"{statistics.mean(p.stat().st_size for p in images) / 1e3:.0f} kB on average)", flush=True)
    x = torch.stack([encoder.preprocess(p) for p in images[:64]]).to(dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            encoder(x)
        reps = max(1, len(paths) // len(x))
        bare = clock(dev, lambda: [encoder(x) for _ in range(reps)]) / (reps * len(x))
    print(f"   bare encoder forward, batch {len(x)}, pre-decoded: {1 / bare:,.0f} images/s", flush=True)
    feats = None
    for workers in args.workers:
        cache = tmp / f"cache-{workers}"
        s = clock(dev, lambda: extract_features(encoder, paths, cache, batch_size=64, workers=workers,
                                                progress=False, device=dev))
        fs = extract_features(encoder, paths, cache, progress=False, device=dev)
        feats = torch.from_numpy(fs.features[: len(images)].astype("float32"))
        print(f"   extract_features, {workers} decoding workers: {len(paths) / s:,.0f} images/s ({s:.1f} s), "
              f"{100 * (len(paths) / s) * bare:.0f}% of the bare forward's rate; COCO's {COCO_ALL_IMAGES:,} images: "
              f"{COCO_ALL_IMAGES / (len(paths) / s) / 60:.1f} min", flush=True)
    return feats


def section_scst(args, model, vocab, feats: torch.Tensor) -> None:
    dev, bsz, n = args.device, 32, 5
    batches = math.ceil(COCO_IMAGES / bsz)
    optim = torch.optim.Adam(model.parameters(), lr=2e-5)
    gen = torch.Generator(device=dev).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    f_all = feats.repeat(math.ceil(bsz * 4 / len(feats)), 1)
    print(f"\n3. SCST, model side: {bsz} images x {n} samples a batch, {batches:,} batches an epoch on COCO; "
          f"vocabulary {len(vocab):,} (the bundled model's)", flush=True)

    def one(b: int) -> None:
        f = f_all[(b % 4) * bsz:(b % 4 + 1) * bsz].to(dev)
        model.eval()  # as train_scst: sampled and updated without dropout
        with torch.no_grad():
            caps, lens = sample(model, f, vocab, n, 16, gen)
        caps.tolist()  # the reward needs the captions as text on the host
        rewards = torch.rand(bsz, n, generator=cpu_gen)  # CIDEr-D's place
        policy_step(model, optim, f, caps, lens, rewards, vocab)
    for b in range(3):
        one(b)
    k = args.scst_batches
    s = clock(dev, lambda: [one(b) for b in range(k)]) / k
    print(f"   {s * 1e3:.1f} ms a batch -> {s * batches / 60:.1f} min an epoch for the model's share "
          f"(plus the CIDEr-D reward's, on the CPU)", flush=True)


def section_beam(args, model, vocab, feats: torch.Tensor) -> None:
    dev = args.device
    n = max(1, int(5000 * min(1.0, args.scale * 50)))
    f = feats.repeat(math.ceil(n / len(feats)), 1)[:n].to(dev)
    model.eval()
    print(f"\n4. beam search, beam {BEAM_SIZE}, length penalty {LENGTH_PENALTY}: {n:,} images (the Karpathy "
          f"test split has 5,000)", flush=True)
    with torch.inference_mode():
        beam_search(model, f[:50], vocab, BEAM_SIZE, 20, LENGTH_PENALTY, suppress_unk=True)
        for bs in (500, n):
            s = clock(dev, lambda: [beam_search(model, f[i:i + bs], vocab, BEAM_SIZE, 20, LENGTH_PENALTY,
                                                suppress_unk=True) for i in range(0, n, bs)])
            print(f"   batches of {bs:,}: {n / s:,.0f} captions/s ({s:.1f} s)", flush=True)
        m = min(n, args.ref_images)
        r = clock(dev, lambda: beam_search_reference(model, f[:m], vocab, BEAM_SIZE, 20, LENGTH_PENALTY,
                                                     suppress_unk=True))
        print(f"   one image at a time (beam_search_reference), {m} images: {m / r:,.1f} captions/s; batched is "
              f"{(n / s) / (m / r):.0f}x faster", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coco", required=True, help="folder with captions_val2017.json and images/ (../shared/data/coco-val2017-mini)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of a COCO epoch (smoke runs)")
    p.add_argument("--epoch-limit", type=float, default=240.0, help="seconds; past them the epoch is extrapolated")
    p.add_argument("--base-steps", type=int, default=1000, help="steps of the fp32 baseline (a quarter for the encoder-in-loop one)")
    p.add_argument("--copies", type=int, default=64, help="times each JPEG is read in section 2")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 14])
    p.add_argument("--scst-batches", type=int, default=100)
    p.add_argument("--ref-images", type=int, default=100)
    p.add_argument("--profile", type=int, default=0, help="steps of section 1 to profile (torch.profiler tables)")
    p.add_argument("--only", default="1,2,3,4", help="sections to run; 5 (the recipe's step) runs only when named")
    p.add_argument("--pools", nargs="+", default=["avg", RECIPE["pool"]], choices=list(POOLS), help="section 5's poolings")
    p.add_argument("--steps", type=int, default=1500, help="section 5's timed steps")
    p.add_argument("--barrier", default="", help="section 5: a folder where --parties copies meet before timing")
    p.add_argument("--parties", type=int, default=1)
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; Python {platform.python_version()}")
    coco = Path(args.coco)
    images = sorted((coco / "images").glob("*.jpg"))
    caps, n_words = coco_captions(coco, RECIPE["max_len"])
    print(f"COCO captions: {len(caps):,} from captions_val2017.json ({n_words:,} distinct words), {len(images)} images")
    only = {int(s) for s in args.only.split(",")}
    failed = 0
    feats = None
    for k, fn in [(1, lambda: section_epoch(args, caps)), (2, lambda: section_features(args, images)),
                  (5, lambda: section_step(args, caps))]:
        if k in only:
            try:
                out = fn()
                feats = out if out is not None else feats
            except Exception as e:  # one section's failure must not cost the others their device time
                failed += 1
                print(f"   section {k} failed: {type(e).__name__}: {e}", flush=True)
    for k, fn in [(3, section_scst), (4, section_beam)]:
        if k in only:
            try:
                model, vocab, encoder, _ = load_model(BUNDLED_MODEL)  # afresh: SCST's steps change the weights
                model = model.float().to(dev)
                if feats is None:
                    encoder = encoder.to(dev).eval()
                    with torch.inference_mode():
                        x = torch.stack([encoder.preprocess(p) for p in images]).to(dev)
                        feats = encoder(x.contiguous(memory_format=torch.channels_last)).float().cpu()
                fn(args, model, vocab, feats)
            except Exception as e:
                failed += 1
                print(f"   section {k} failed: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
