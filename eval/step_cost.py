"""Cost of one decoding step, and of decoding one image, on one CPU thread.

Part 1: the first LSTM layer at 3, 300 and 3000 rows through decoding's precomputed word-input table,
against torch.lstm_cell and nn.LSTM (the baselines, same weights, same process).
Part 2: `Captioner.decode` of one image (beam 3, 3 alternatives, as the demo) with the bundled model
against one of its decoders alone (same thing for a single model), and one 3-row step of each, in float32;
then the same model with bfloat16 decoder weights (`--precision bfloat16`).

    python eval/step_cost.py [--model CKPT] [--image JPG]
"""
from __future__ import annotations

import argparse

import torch

from bench import PHOTO, median_ms  # eval/bench.py, beside this script
from captioner.decoding import _step, _step_weights, set_precision
from captioner.inference import Captioner
from captioner.model import Ensemble

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--image", default=str(PHOTO), help="image for part 2 (default: the first of ../shared/data/photos)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cap = Captioner.load(args.model, precision="float32")
    members = list(cap.decoder.members) if isinstance(cap.decoder, Ensemble) else [cap.decoder]
    m = members[0]
    lstm = m.lstm
    table = _step_weights(m)[0]

    def with_table(tok, h, c):
        i, f, g, o = torch.addmm(table[tok], h, lstm.weight_hh_l0.t()).chunk(4, 1)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c2), c2

    def with_cell(tok, h, c):
        return torch.lstm_cell(m.word_embed(tok), (h, c), lstm.weight_ih_l0, lstm.weight_hh_l0,
                               lstm.bias_ih_l0, lstm.bias_hh_l0)

    def with_nn(tok, h, c):
        _, (h2, c2) = lstm(m.word_embed(tok).unsqueeze(1), (h[None], c[None]))
        return h2[0], c2[0]

    print("first LSTM layer, one step (median ms, 1 thread):")
    with torch.inference_mode():
        for n in (3, 300, 3000):
            H = lstm.hidden_size
            tok, h, c = torch.randint(4, m.cfg.vocab_size, (n,)), torch.randn(n, H), torch.randn(n, H)
            reps = 200 if n < 100 else 20
            t, cell, nn_ = (median_ms(lambda f=f: f(tok, h, c), reps) for f in (with_table, with_cell, with_nn))
            print(f"  {n:5d} rows: table {t:.3f}  lstm_cell {cell:.3f} ({cell / t:.2f}x)  nn.LSTM {nn_:.3f} ({nn_ / t:.2f}x)")
        f = cap.encode([args.image])
        one = Captioner(m, cap.vocab, cap.encoder, precision="float32")
        print(f"decode one image, beam 3, 3 alternatives ({len(members)} decoder(s) in the model):")
        full = median_ms(lambda: cap.decode(f, 3, 20, 3, rerank=0), 30)
        single = median_ms(lambda: one.decode(f, 3, 20, 3, rerank=0), 30)
        print(f"  model {full:.1f} ms, one decoder {single:.1f} ms ({full / single:.2f}x)")
        tok = torch.tensor([4, 5, 6])
        st, st1 = cap.decoder.init_state(f.repeat(3, 1)), m.init_state(f.repeat(3, 1))
        s_full = median_ms(lambda: _step(cap.decoder, tok, st), 200)
        s_one = median_ms(lambda: _step(m, tok, st1), 200)
        print(f"  one 3-row step: model {s_full:.2f} ms, one decoder {s_one:.2f} ms ({s_full / s_one:.2f}x)")
        set_precision(cap.decoder, torch.bfloat16)
        low = median_ms(lambda: cap.decode(f, 3, 20, 3, rerank=0), 30)
        s_low = median_ms(lambda: _step(cap.decoder, tok, st), 200)
        print(f"  bfloat16 decoder weights: decode {low:.1f} ms ({full / low:.2f}x faster than float32), "
              f"3-row step {s_low:.2f} ms ({s_full / s_low:.2f}x)")


if __name__ == "__main__":
    main()
