"""Cost of the SCST reward: pycocoevalcap-style CIDEr-D (captioner.scst.CiderD) for one SCST batch
(32 images x 5 sampled captions, 5 references each), on one CPU core. It runs on the CPU even when
training runs on a GPU, so it bounds SCST on COCO (eval/RESULTS.md, "COCO on a GPU").

    OMP_NUM_THREADS=1 python eval/cider_cost.py
"""
import random
import sys
import time

from captioner.data import load_dataset
from captioner.scst import CiderD
from captioner.vocab import tokenize
ds = load_dataset(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/flickr8k", split="train")
recs = ds.records
t = time.perf_counter(); cider = CiderD([r.captions for r in recs]); t_init = time.perf_counter() - t
refs_tok = [[" ".join(tokenize(c)) for c in r.captions] for r in recs]
random.seed(0)
n = 0; t = time.perf_counter()
for b in range(20):
    rows = random.sample(range(len(recs)), 32)
    hyps = [" ".join(tokenize(recs[random.choice(rows)].captions[0])) for r in rows for _ in range(5)]
    refs = [refs_tok[r] for r in rows for _ in range(5)]
    cider(hyps, refs); n += 1
dt = (time.perf_counter() - t) / n
print(f"CiderD df over {len(recs)} images: {t_init:.1f} s; reward for one batch of 32x5 captions: {dt*1e3:.1f} ms")
print(f"Flickr8k epoch (188 batches): {188*dt:.1f} s; COCO epoch (3541 batches): {3541*dt/60:.1f} min")
