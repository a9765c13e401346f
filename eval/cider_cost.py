"""Cost of the SCST reward: pycocoevalcap-style CIDEr-D (captioner.scst.CiderD) for one SCST batch
(32 images x 5 sampled captions, 5 references each), on one CPU core. It runs on the CPU even when
training runs on a GPU, so it bounds SCST on COCO (eval/RESULTS.md, "COCO on a GPU"). Then the same
batches' METEOR (captioner.scst.MeteorReward, `--meteor-weight`), when Java is there.

    OMP_NUM_THREADS=1 python eval/cider_cost.py
"""
import random
import shutil
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
batches = []
for b in range(20):
    rows = random.sample(range(len(recs)), 32)
    hyps = [" ".join(tokenize(recs[random.choice(rows)].captions[0])) for r in rows for _ in range(5)]
    batches.append((hyps, [refs_tok[r] for r in rows for _ in range(5)]))


def per_batch(reward) -> float:
    t = time.perf_counter()
    for hyps, refs in batches:
        reward(hyps, refs)
    return (time.perf_counter() - t) / len(batches)


dt = per_batch(cider)
print(f"CiderD df over {len(recs)} images: {t_init:.1f} s; reward for one batch of 32x5 captions: {dt*1e3:.1f} ms")
print(f"Flickr8k epoch (188 batches): {188*dt:.1f} s; COCO epoch (3541 batches): {3541*dt/60:.1f} min")
if shutil.which("java"):
    from captioner.scst import MeteorReward
    meteor = MeteorReward()
    meteor(*batches[0])  # the Java process starts here
    dm = per_batch(meteor)
    meteor.close()
    print(f"METEOR reward, same batches (--meteor-weight): {dm*1e3:.1f} ms a batch, {dm / dt:.1f}x CIDEr-D; "
          f"Flickr8k epoch: {188*dm:.1f} s")
