"""Decoding settings of the user-facing entry points (CLI, `Captioner`, demo, `captioner evaluate`).

Kept apart from decoding.py so that the CLI can show them in --help without importing torch.
Chosen on Flickr8k dev with the previous bundled model (a 512-unit ensemble) at beam 3: length penalty
0.5 gave BLEU-4 19.06, METEOR 18.08, CIDEr 41.24 against 18.65 / 17.84 / 40.52 at 0; with the 1024-unit
one after it, 19.60 / 18.84 / 44.97 against 19.65 / 18.55 / 44.26; with the one trained on six views,
19.73 / 18.72 / 44.74 against 19.59 / 18.50 / 43.86; with the attention model after it,
20.97 / 19.55 / 50.15 against 20.81 / 19.35 / 49.62 (eval/RESULTS.md). Session 32 moved it to 0.7 for the
Lite0 + Lite2 pair bundled in session 31 (with BLEU+1 reranking: 22.42 / 20.84 / 56.70 against 22.46 / 20.54 /
56.22 at 0.5; 0.8 loses 0.4 BLEU-4). The functions in decoding.py keep 0 (raw log-probability, as the paper)
as their own default.

Beam 10 with its 3 best reranked by their agreement with all 10 (consensus.py) replaced plain beam 3 in
session 20: BLEU-4 / METEOR / CIDEr 21.13 / 19.80 / 51.67 against 20.92 / 19.55 / 50.07 for the single
model bundled then, in float32, and up on every such model tried (eval/RESULTS.md, "Consensus reranking");
a wider beam alone scores lower (beam 10: 20.71 / 19.39 / 50.55). For the int8 pair bundled in
sessions 23-30: 21.47 / 20.48 / 53.62 against 21.12 / 19.80 / 52.44 at plain beam 3.
"""
BEAM_SIZE = 10
# Upper bounds for beam size, n-best and caption length anywhere (the demo's are lower): beam search holds
# beam x images rows, and `--n-best 1000000` asked the OOM killer for 24 GB, `--beam-size 20000` ran 102 s for
# one photo; beam 50 takes the time of beam 10.
MAX_BEAM = 100
MAX_LEN = 100
RERANK = 3  # the caption is the one of the beam's RERANK best that agrees most with all its results
# The unigram F-mean's share of that agreement, the rest BLEU+1 (consensus.py). With the length penalty at 0.7,
# an equal share took the session-31 pair to 22.37 / 21.09 / 56.71 from 22.42 / 20.84 / 56.70, and the recipe's
# second draw (seeds 3 + 4) to 22.30 / 21.48 / 57.78 from 22.74 / 21.35 / 58.23 (eval/RESULTS.md, session 32).
RERANK_FMEAN = 0.5
LENGTH_PENALTY = 0.7
# No caption repeats a word trigram ("a man wearing a cowboy hat and a cowboy hat"), as in
# ImageCaptioning.pytorch's option: with the pair bundled in sessions 23-30, BLEU-4 / METEOR / CIDEr
# 21.73 / 20.61 / 54.38 against 21.44 / 20.52 / 54.12 on Flickr8k dev (43 of 1000 captions change; the
# other pair +0.09 / +0.02 / +0.23, one decoder +0.11 / +0.02 / +0.20; eval/RESULTS.md, "Trigram blocking").
BLOCK_TRIGRAMS = True
# Decoder weights' precision in the decoding step: "auto" is int8 on x86 CPUs (fbgemm's kernels: on an
# AVX2-only EPYC 1.9x the captions/s batched and 2.6-2.9x faster one-photo captioning, on a Xeon with AMX as fast as
# bfloat16 batched and 1.3x faster for one photo; BLEU-4 within 0.1 on Flickr8k dev: eval/RESULTS.md), else
# bfloat16 on CPUs that multiply it in hardware (2.4x captions/s batched, 3.5x faster one-image decoding,
# BLEU-4 within 0.05), else float32.
PRECISION = "auto"
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
